// Family 2d on NVIDIA GPUs: the factored merged group's 1x1 kernel and its backward
// (csrc/group_pointwise.h has the math and says what it computes) in ONE launch each: a single
// block whose threads stride over each phase's indices, a barrier between phases. The tensors
// are small (parts x channels), so one block suffices; what it saves is the hundred-odd launches
// the same work took as ATen ops.
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "../group_pointwise.h"

namespace toponas {
namespace {

constexpr int kThreads = 256;

template <typename S, typename A_>
__global__ void group_pointwise_cuda_kernel(group::Args<S, A_> A, bool backward) {
  auto run = [](auto&& phase, int64_t count) {
    for (int64_t k = threadIdx.x; k < count; k += blockDim.x) phase(k);
    __syncthreads();
  };
  if (backward)
    group::backward_phases(A, run);
  else
    group::kernel_phases(A, run);
}

struct CudaLaunch {
  template <typename S, typename A_>
  void operator()(const group::Args<S, A_>& A, bool backward) const {
    group_pointwise_cuda_kernel<S, A_><<<1, kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(A, backward);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
};

std::tuple<at::Tensor, at::Tensor> group_pointwise_cuda(const at::Tensor& coefs, at::TensorList tensors, int64_t form,
                                                        int64_t normalize, double eps) {
  const c10::cuda::CUDAGuard guard(coefs.device());
  return group::pointwise(coefs, tensors, form, normalize, eps, CudaLaunch{});
}

std::vector<at::Tensor> group_pointwise_backward_cuda(const at::Tensor& grad_kernel, const at::Tensor& grad_dw,
                                                      const at::Tensor& coefs, at::TensorList tensors, int64_t form,
                                                      int64_t normalize, double eps) {
  const c10::cuda::CUDAGuard guard(coefs.device());
  return group::pointwise_backward(grad_kernel, grad_dw, coefs, tensors, form, normalize, eps, CudaLaunch{});
}

}  // namespace

TORCH_LIBRARY_IMPL(toponas, CUDA, m) {
  m.impl("group_pointwise_kernel", &group_pointwise_cuda);
  m.impl("group_pointwise_backward_kernel", &group_pointwise_backward_cuda);
}

}  // namespace toponas
