// Family 2d on the CPU: the factored merged group's 1x1 kernel and its backward
// (csrc/group_pointwise.h has the math and says what it computes), each phase a loop.
#include <torch/library.h>

#include "group_pointwise.h"

namespace toponas {
namespace {

struct CpuLaunch {
  template <typename S, typename A_>
  void operator()(const group::Args<S, A_>& A, bool backward) const {
    auto run = [](auto&& phase, int64_t count) {
      for (int64_t k = 0; k < count; ++k) phase(k);
    };
    if (backward)
      group::backward_phases(A, run);
    else
      group::kernel_phases(A, run);
  }
};

std::tuple<at::Tensor, at::Tensor> group_pointwise_cpu(const at::Tensor& coefs, at::TensorList tensors, int64_t form,
                                                       int64_t normalize, double eps) {
  return group::pointwise(coefs, tensors, form, normalize, eps, CpuLaunch{});
}

std::vector<at::Tensor> group_pointwise_backward_cpu(const at::Tensor& grad_kernel, const at::Tensor& grad_dw,
                                                     const at::Tensor& coefs, at::TensorList tensors, int64_t form,
                                                     int64_t normalize, double eps) {
  return group::pointwise_backward(grad_kernel, grad_dw, coefs, tensors, form, normalize, eps, CpuLaunch{});
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(toponas, m) {
  m.def("group_pointwise_kernel(Tensor coefs, Tensor[] tensors, int form, int normalize, float eps) -> (Tensor, Tensor)");
  m.def(
      "group_pointwise_backward_kernel(Tensor grad_kernel, Tensor grad_dw, Tensor coefs, Tensor[] tensors, int form, "
      "int normalize, float eps) -> Tensor[]");
}

TORCH_LIBRARY_IMPL(toponas, CPU, m) {
  m.impl("group_pointwise_kernel", &group_pointwise_cpu);
  m.impl("group_pointwise_backward_kernel", &group_pointwise_backward_cpu);
}

}  // namespace toponas
