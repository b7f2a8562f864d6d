// OpenCL 1.2 API, loaded at run time with dlopen so that binaries start on machines with no OpenCL.
// Types and constants come from the Khronos headers (Debian: opencl-headers); nothing links libOpenCL.
#ifndef ATTENTIONKIT_COPENCL_H
#define ATTENTIONKIT_COPENCL_H

#define CL_TARGET_OPENCL_VERSION 120
#define CL_USE_DEPRECATED_OPENCL_1_2_APIS
#include <CL/cl.h>
#include <CL/cl_ext.h>
#include <stddef.h>

/// Every OpenCL entry point AttentionKit uses, typed from the real prototypes.
typedef struct AKCLFunctions {
    __typeof__(&clGetPlatformIDs) GetPlatformIDs;
    __typeof__(&clGetPlatformInfo) GetPlatformInfo;
    __typeof__(&clGetDeviceIDs) GetDeviceIDs;
    __typeof__(&clGetDeviceInfo) GetDeviceInfo;
    __typeof__(&clCreateContext) CreateContext;
    __typeof__(&clReleaseContext) ReleaseContext;
    __typeof__(&clCreateCommandQueue) CreateCommandQueue;
    __typeof__(&clReleaseCommandQueue) ReleaseCommandQueue;
    __typeof__(&clCreateBuffer) CreateBuffer;
    __typeof__(&clReleaseMemObject) ReleaseMemObject;
    __typeof__(&clEnqueueWriteBuffer) EnqueueWriteBuffer;
    __typeof__(&clEnqueueReadBuffer) EnqueueReadBuffer;
    __typeof__(&clEnqueueFillBuffer) EnqueueFillBuffer;
    __typeof__(&clEnqueueMapBuffer) EnqueueMapBuffer;
    __typeof__(&clEnqueueUnmapMemObject) EnqueueUnmapMemObject;
    __typeof__(&clCreateProgramWithSource) CreateProgramWithSource;
    __typeof__(&clCreateProgramWithBinary) CreateProgramWithBinary;
    __typeof__(&clBuildProgram) BuildProgram;
    __typeof__(&clGetProgramBuildInfo) GetProgramBuildInfo;
    __typeof__(&clGetProgramInfo) GetProgramInfo;
    __typeof__(&clReleaseProgram) ReleaseProgram;
    __typeof__(&clCreateKernel) CreateKernel;
    __typeof__(&clReleaseKernel) ReleaseKernel;
    __typeof__(&clSetKernelArg) SetKernelArg;
    __typeof__(&clGetKernelWorkGroupInfo) GetKernelWorkGroupInfo;
    __typeof__(&clEnqueueNDRangeKernel) EnqueueNDRangeKernel;
    __typeof__(&clFinish) Finish;
} AKCLFunctions;

/// The problem parameters every kernel takes by value; the same layout as `Params` in
/// Kernels/common.cl (all members 4 bytes, so host and device agree).
typedef struct AKParams {
    cl_int B, Hq, Hkv, Nq, Nk, D, Dv;
    cl_int NkPad;
    cl_float scale;
    cl_float softcap;
    cl_int causal;
    cl_int winLeft, winRight;
    cl_int maskKind;
    cl_int maskBatchStride, maskHeadStride;
    cl_int kStrideB, kStrideH, kStrideS;
    cl_int vStrideB, vStrideH, vStrideS;
    cl_int qStrideB, qStrideH, qStrideS;
    cl_int oStrideB, oStrideH, oStrideS;
} AKParams;

/// Opens the OpenCL ICD loader at `path` (NULL: "libOpenCL.so.1", then "libOpenCL.so") and fills
/// `functions`. Returns 0 on success; otherwise writes a reason into `error` and returns -1.
/// The library handle is kept open for the life of the process.
int akcl_load(const char *path, AKCLFunctions *functions, char *error, size_t error_length);

#endif
