#include "COpenCL.h"

#include <dlfcn.h>
#include <stdio.h>
#include <string.h>

#define LOAD(name)                                                                            \
    do {                                                                                      \
        *(void **)(&functions->name) = dlsym(handle, "cl" #name);                             \
        if (functions->name == NULL) {                                                        \
            snprintf(error, error_length, "%s has no symbol cl" #name, opened);               \
            dlclose(handle);                                                                  \
            return -1;                                                                        \
        }                                                                                     \
    } while (0)

int akcl_load(const char *path, AKCLFunctions *functions, char *error, size_t error_length) {
    const char *candidates[] = {"libOpenCL.so.1", "libOpenCL.so"};
    void *handle = NULL;
    const char *opened = NULL;
    if (path != NULL) {
        handle = dlopen(path, RTLD_NOW | RTLD_LOCAL);
        opened = path;
        if (handle == NULL) {
            snprintf(error, error_length, "cannot load OpenCL library %s: %s", path, dlerror());
            return -1;
        }
    } else {
        for (size_t i = 0; i < sizeof candidates / sizeof candidates[0] && handle == NULL; i++) {
            handle = dlopen(candidates[i], RTLD_NOW | RTLD_LOCAL);
            opened = candidates[i];
        }
        if (handle == NULL) {
            snprintf(error, error_length, "no OpenCL ICD loader (libOpenCL.so.1) found: %s", dlerror());
            return -1;
        }
    }
    LOAD(GetPlatformIDs);
    LOAD(GetPlatformInfo);
    LOAD(GetDeviceIDs);
    LOAD(GetDeviceInfo);
    LOAD(CreateContext);
    LOAD(ReleaseContext);
    LOAD(CreateCommandQueue);
    LOAD(ReleaseCommandQueue);
    LOAD(CreateBuffer);
    LOAD(ReleaseMemObject);
    LOAD(EnqueueWriteBuffer);
    LOAD(EnqueueReadBuffer);
    LOAD(EnqueueFillBuffer);
    LOAD(EnqueueMapBuffer);
    LOAD(EnqueueUnmapMemObject);
    LOAD(CreateProgramWithSource);
    LOAD(CreateProgramWithBinary);
    LOAD(BuildProgram);
    LOAD(GetProgramBuildInfo);
    LOAD(GetProgramInfo);
    LOAD(ReleaseProgram);
    LOAD(CreateKernel);
    LOAD(ReleaseKernel);
    LOAD(SetKernelArg);
    LOAD(GetKernelWorkGroupInfo);
    LOAD(EnqueueNDRangeKernel);
    LOAD(Finish);
    return 0;
}
