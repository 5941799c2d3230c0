// device.cu — CUDA runtime queries for build_info; must not crash on a machine without a driver or GPU.
#include "common.cuh"

extern "C" int pyllm_cuda_device_count(void) {
    int n = 0;
    cudaError_t e = cudaGetDeviceCount(&n);
    if (e != cudaSuccess) {  // no driver / no device: report 0 and clear the sticky-free error state
        cudaGetLastError();
        return 0;
    }
    return n;
}
