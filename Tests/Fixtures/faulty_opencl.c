// faulty_opencl: a stand-in for libOpenCL.so.1 that fails chosen calls on demand.
//
// A test fixture for AttentionKit's OpenCL fault handling (Tests/AttentionBackendTests/
// OpenCLFaultTests.swift compiles it with the system C compiler and loads it through
// ATTENTIONKIT_OPENCL_LIBRARY's code path). Every entry point AttentionKit uses is forwarded to the
// real ICD loader (libOpenCL.so.1, or the file named by FAULTY_OPENCL_REAL), so kernels really run;
// on top of that the fixture
//   - fails the calls a test arms with faulty_fail(), returning the status it names (and, for
//     clBuildProgram, a build log of its own);
//   - counts every context, queue, buffer, program and kernel created and released, so a test can
//     check that each object made on a failed path was released;
//   - can present the device as a discrete GPU (faulty_pretend_gpu), so that the copy paths
//     (clEnqueueReadBuffer read-back) run on a CPU driver.
// Programs that cannot call faulty_fail() (attnbench, the C ABI test) arm one fault through the
// environment: FAULTY_OPENCL_FAIL=<call>:<status>[:<skip>], e.g. clEnqueueNDRangeKernel:-5.
// Not thread-safe for arming; the counters are atomic.

#define CL_TARGET_OPENCL_VERSION 120
#define CL_USE_DEPRECATED_OPENCL_1_2_APIS
#include <CL/cl.h>
#include <CL/cl_ext.h>

#include <dlfcn.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

enum { KIND_CONTEXT, KIND_QUEUE, KIND_MEM, KIND_PROGRAM, KIND_KERNEL, KIND_COUNT };
static const char *const kind_names[KIND_COUNT] = {"context", "queue", "mem", "program", "kernel"};
static atomic_long live[KIND_COUNT];
static atomic_long created[KIND_COUNT];

// One armed fault: the call's name, the status to return, how many matching calls to let through
// first, and how many to fail (-1: until disarmed).
static char fault_call[64];
static cl_int fault_status;
static atomic_int fault_skip;
static atomic_int fault_times;
static atomic_long fault_hits;
static int pretend_gpu;
static const char injected_log[] = "faulty_opencl: injected build failure (line 1: error: this is a test)";

static void *real_handle;

static void *real(const char *name) {
    if (real_handle == NULL) {
        const char *path = getenv("FAULTY_OPENCL_REAL");
        real_handle = dlopen(path != NULL && path[0] != '\0' ? path : "libOpenCL.so.1", RTLD_NOW | RTLD_LOCAL);
        if (real_handle == NULL) return NULL;
    }
    return dlsym(real_handle, name);
}

// Whether this call to `name` is to fail (consumes one armed failure).
static int should_fail(const char *name) {
    if (strcmp(fault_call, name) != 0) return 0;
    if (atomic_load(&fault_times) == 0) return 0;
    if (atomic_fetch_sub(&fault_skip, 1) > 0) return 0;
    atomic_store(&fault_skip, 0);
    if (atomic_load(&fault_times) > 0) atomic_fetch_sub(&fault_times, 1);
    atomic_fetch_add(&fault_hits, 1);
    return 1;
}

static void made(int kind) {
    atomic_fetch_add(&live[kind], 1);
    atomic_fetch_add(&created[kind], 1);
}

#define FORWARD(name, ...) ((__typeof__(&name))real(#name))(__VA_ARGS__)

/// In a stand-in that returns an object or pointer (clCreate*, clEnqueueMapBuffer): an armed fault
/// returns NULL with its status in `*status`.
#define FAIL_CREATE(name)                                                                                   \
    do {                                                                                                    \
        if (should_fail(#name)) {                                                                           \
            if (status != NULL) *status = fault_status;                                                     \
            return NULL;                                                                                    \
        }                                                                                                   \
    } while (0)

/// The body of a clRelease* stand-in: forwards, and counts the object gone when the driver agrees.
#define RELEASE(name, kind, object)                                                                         \
    do {                                                                                                    \
        cl_int released = FORWARD(name, object);                                                            \
        if (released == CL_SUCCESS) atomic_fetch_sub(&live[kind], 1);                                       \
        return released;                                                                                    \
    } while (0)
#define MISSING_REAL(name) (real(#name) == NULL)

// MARK: Control (called by the tests through dlsym)

void faulty_fail(const char *call, cl_int status, int skip, int times) {
    strncpy(fault_call, call, sizeof fault_call - 1);
    fault_call[sizeof fault_call - 1] = '\0';
    fault_status = status;
    atomic_store(&fault_skip, skip);
    atomic_store(&fault_times, times);
    atomic_store(&fault_hits, 0);
}

__attribute__((constructor)) static void arm_from_environment(void) {
    const char *spec = getenv("FAULTY_OPENCL_FAIL");
    if (spec == NULL || spec[0] == '\0') return;
    char call[64];
    int status = 0, skip = 0;
    if (sscanf(spec, "%63[^:]:%d:%d", call, &status, &skip) >= 2) faulty_fail(call, status, skip, -1);
}

void faulty_clear(void) {
    fault_call[0] = '\0';
    atomic_store(&fault_times, 0);
}

long faulty_hits(void) { return atomic_load(&fault_hits); }

void faulty_pretend_gpu(int on) { pretend_gpu = on; }

static int kind_index(const char *kind) {
    for (int i = 0; i < KIND_COUNT; i++)
        if (strcmp(kind_names[i], kind) == 0) return i;
    return -1;
}

long faulty_live(const char *kind) {
    int i = kind_index(kind);
    return i < 0 ? -1 : atomic_load(&live[i]);
}

long faulty_created(const char *kind) {
    int i = kind_index(kind);
    return i < 0 ? -1 : atomic_load(&created[i]);
}

// MARK: Platforms and devices

cl_int clGetPlatformIDs(cl_uint entries, cl_platform_id *platforms, cl_uint *count) {
    if (MISSING_REAL(clGetPlatformIDs)) return CL_PLATFORM_NOT_FOUND_KHR;
    if (should_fail("clGetPlatformIDs")) return fault_status;
    return FORWARD(clGetPlatformIDs, entries, platforms, count);
}

cl_int clGetPlatformInfo(cl_platform_id platform, cl_platform_info param, size_t size, void *value, size_t *ret) {
    return FORWARD(clGetPlatformInfo, platform, param, size, value, ret);
}

cl_int clGetDeviceIDs(cl_platform_id platform, cl_device_type type, cl_uint entries, cl_device_id *devices,
                      cl_uint *count) {
    if (should_fail("clGetDeviceIDs")) return fault_status;
    return FORWARD(clGetDeviceIDs, platform, type, entries, devices, count);
}

cl_int clGetDeviceInfo(cl_device_id device, cl_device_info param, size_t size, void *value, size_t *ret) {
    if (pretend_gpu && (param == CL_DEVICE_TYPE || param == CL_DEVICE_HOST_UNIFIED_MEMORY)) {
        size_t need = param == CL_DEVICE_TYPE ? sizeof(cl_device_type) : sizeof(cl_bool);
        if (ret != NULL) *ret = need;
        if (value != NULL) {
            if (size < need) return CL_INVALID_VALUE;
            if (param == CL_DEVICE_TYPE)
                *(cl_device_type *)value = CL_DEVICE_TYPE_GPU;
            else
                *(cl_bool *)value = CL_FALSE;
        }
        return CL_SUCCESS;
    }
    return FORWARD(clGetDeviceInfo, device, param, size, value, ret);
}

// MARK: Contexts and queues

cl_context clCreateContext(const cl_context_properties *properties, cl_uint count, const cl_device_id *devices,
                           void(CL_CALLBACK *notify)(const char *, const void *, size_t, void *), void *user,
                           cl_int *status) {
    FAIL_CREATE(clCreateContext);
    cl_context context = FORWARD(clCreateContext, properties, count, devices, notify, user, status);
    if (context != NULL) made(KIND_CONTEXT);
    return context;
}

cl_int clReleaseContext(cl_context context) {
    RELEASE(clReleaseContext, KIND_CONTEXT, context);
}

cl_command_queue clCreateCommandQueue(cl_context context, cl_device_id device, cl_command_queue_properties properties,
                                      cl_int *status) {
    FAIL_CREATE(clCreateCommandQueue);
    cl_command_queue queue = FORWARD(clCreateCommandQueue, context, device, properties, status);
    if (queue != NULL) made(KIND_QUEUE);
    return queue;
}

cl_int clReleaseCommandQueue(cl_command_queue queue) {
    RELEASE(clReleaseCommandQueue, KIND_QUEUE, queue);
}

// MARK: Buffers

cl_mem clCreateBuffer(cl_context context, cl_mem_flags flags, size_t size, void *host, cl_int *status) {
    FAIL_CREATE(clCreateBuffer);
    cl_mem mem = FORWARD(clCreateBuffer, context, flags, size, host, status);
    if (mem != NULL) made(KIND_MEM);
    return mem;
}

cl_int clReleaseMemObject(cl_mem mem) {
    RELEASE(clReleaseMemObject, KIND_MEM, mem);
}

cl_int clEnqueueWriteBuffer(cl_command_queue queue, cl_mem buffer, cl_bool blocking, size_t offset, size_t size,
                            const void *host, cl_uint waits, const cl_event *list, cl_event *event) {
    if (should_fail("clEnqueueWriteBuffer")) return fault_status;
    return FORWARD(clEnqueueWriteBuffer, queue, buffer, blocking, offset, size, host, waits, list, event);
}

cl_int clEnqueueReadBuffer(cl_command_queue queue, cl_mem buffer, cl_bool blocking, size_t offset, size_t size,
                           void *host, cl_uint waits, const cl_event *list, cl_event *event) {
    if (should_fail("clEnqueueReadBuffer")) return fault_status;
    return FORWARD(clEnqueueReadBuffer, queue, buffer, blocking, offset, size, host, waits, list, event);
}

cl_int clEnqueueFillBuffer(cl_command_queue queue, cl_mem buffer, const void *pattern, size_t pattern_size,
                           size_t offset, size_t size, cl_uint waits, const cl_event *list, cl_event *event) {
    if (should_fail("clEnqueueFillBuffer")) return fault_status;
    return FORWARD(clEnqueueFillBuffer, queue, buffer, pattern, pattern_size, offset, size, waits, list, event);
}

void *clEnqueueMapBuffer(cl_command_queue queue, cl_mem buffer, cl_bool blocking, cl_map_flags flags, size_t offset,
                         size_t size, cl_uint waits, const cl_event *list, cl_event *event, cl_int *status) {
    FAIL_CREATE(clEnqueueMapBuffer);
    return FORWARD(clEnqueueMapBuffer, queue, buffer, blocking, flags, offset, size, waits, list, event, status);
}

cl_int clEnqueueUnmapMemObject(cl_command_queue queue, cl_mem mem, void *mapped, cl_uint waits, const cl_event *list,
                               cl_event *event) {
    if (should_fail("clEnqueueUnmapMemObject")) return fault_status;
    return FORWARD(clEnqueueUnmapMemObject, queue, mem, mapped, waits, list, event);
}

// MARK: Programs and kernels

// Programs whose build this fixture failed, so that their log is the injected one.
static cl_program failed_builds[64];
static atomic_int failed_build_count;

cl_program clCreateProgramWithSource(cl_context context, cl_uint count, const char **strings, const size_t *lengths,
                                     cl_int *status) {
    FAIL_CREATE(clCreateProgramWithSource);
    cl_program program = FORWARD(clCreateProgramWithSource, context, count, strings, lengths, status);
    if (program != NULL) made(KIND_PROGRAM);
    return program;
}

cl_program clCreateProgramWithBinary(cl_context context, cl_uint count, const cl_device_id *devices,
                                     const size_t *lengths, const unsigned char **binaries, cl_int *binary_status,
                                     cl_int *status) {
    if (should_fail("clCreateProgramWithBinary")) {
        if (binary_status != NULL) *binary_status = fault_status;
        if (status != NULL) *status = fault_status;
        return NULL;
    }
    cl_program program =
        FORWARD(clCreateProgramWithBinary, context, count, devices, lengths, binaries, binary_status, status);
    if (program != NULL) made(KIND_PROGRAM);
    return program;
}

cl_int clBuildProgram(cl_program program, cl_uint count, const cl_device_id *devices, const char *options,
                      void(CL_CALLBACK *notify)(cl_program, void *), void *user) {
    if (should_fail("clBuildProgram")) {
        int slot = atomic_fetch_add(&failed_build_count, 1);
        if (slot < 64) failed_builds[slot] = program;
        return fault_status;
    }
    return FORWARD(clBuildProgram, program, count, devices, options, notify, user);
}

static int build_was_failed(cl_program program) {
    int count = atomic_load(&failed_build_count);
    for (int i = 0; i < count && i < 64; i++)
        if (failed_builds[i] == program) return 1;
    return 0;
}

cl_int clGetProgramBuildInfo(cl_program program, cl_device_id device, cl_program_build_info param, size_t size,
                             void *value, size_t *ret) {
    if (param == CL_PROGRAM_BUILD_LOG && build_was_failed(program)) {
        if (ret != NULL) *ret = sizeof injected_log;
        if (value != NULL) {
            if (size < sizeof injected_log) return CL_INVALID_VALUE;
            memcpy(value, injected_log, sizeof injected_log);
        }
        return CL_SUCCESS;
    }
    return FORWARD(clGetProgramBuildInfo, program, device, param, size, value, ret);
}

cl_int clGetProgramInfo(cl_program program, cl_program_info param, size_t size, void *value, size_t *ret) {
    return FORWARD(clGetProgramInfo, program, param, size, value, ret);
}

cl_int clReleaseProgram(cl_program program) {
    int count = atomic_load(&failed_build_count);
    for (int i = 0; i < count && i < 64; i++)
        if (failed_builds[i] == program) failed_builds[i] = NULL;
    RELEASE(clReleaseProgram, KIND_PROGRAM, program);
}

cl_kernel clCreateKernel(cl_program program, const char *name, cl_int *status) {
    FAIL_CREATE(clCreateKernel);
    cl_kernel kernel = FORWARD(clCreateKernel, program, name, status);
    if (kernel != NULL) made(KIND_KERNEL);
    return kernel;
}

cl_int clReleaseKernel(cl_kernel kernel) {
    RELEASE(clReleaseKernel, KIND_KERNEL, kernel);
}

cl_int clSetKernelArg(cl_kernel kernel, cl_uint index, size_t size, const void *value) {
    if (should_fail("clSetKernelArg")) return fault_status;
    return FORWARD(clSetKernelArg, kernel, index, size, value);
}

cl_int clGetKernelWorkGroupInfo(cl_kernel kernel, cl_device_id device, cl_kernel_work_group_info param, size_t size,
                                void *value, size_t *ret) {
    return FORWARD(clGetKernelWorkGroupInfo, kernel, device, param, size, value, ret);
}

cl_int clEnqueueNDRangeKernel(cl_command_queue queue, cl_kernel kernel, cl_uint dims, const size_t *offset,
                              const size_t *global, const size_t *local, cl_uint waits, const cl_event *list,
                              cl_event *event) {
    if (should_fail("clEnqueueNDRangeKernel")) return fault_status;
    return FORWARD(clEnqueueNDRangeKernel, queue, kernel, dims, offset, global, local, waits, list, event);
}

cl_int clFinish(cl_command_queue queue) {
    if (should_fail("clFinish")) return fault_status;
    return FORWARD(clFinish, queue);
}
