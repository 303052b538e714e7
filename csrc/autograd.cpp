// Autograd in C++ for the compiled mixed_sum kernels: the eager fast path of
// toponas_kernels.ops.mixed_sum calls toponas::mixed_sum_fused, one dispatcher call whose
// autograd node is a C++ Function, so neither the forward nor the backward passes through
// Python. A search step calls mixed_sum once per edge and per step; with Python's
// autograd.Function around the kernel the host side cost more than the eager sum it replaces at
// small K (issue 9, bench/ops.py's host_us column).
//
// The forward and backward are the kernel ops themselves (toponas::mixed_sum_kernel and
// toponas::mixed_sum_backward_kernel, CPU and CUDA), reached through the dispatcher, so this file
// has no device code. Under torch.compile the package uses the Python custom op
// toponas::mixed_sum instead, which carries the fake implementation and the autograd formula
// torch.compile needs; this op has a fake too (ops/mixed.py), so opcheck covers it.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/library.h>

#include <vector>

namespace toponas {
namespace {

at::Tensor mixed_sum_kernel(at::TensorList outputs, const at::Tensor& weights) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("toponas::mixed_sum_kernel", "")
                             .typed<at::Tensor(at::TensorList, const at::Tensor&)>();
  return op.call(outputs, weights);
}

std::vector<at::Tensor> mixed_sum_backward_kernel(const at::Tensor& grad, at::TensorList outputs,
                                                  const at::Tensor& weights) {
  static const auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("toponas::mixed_sum_backward_kernel", "")
          .typed<std::vector<at::Tensor>(const at::Tensor&, at::TensorList, const at::Tensor&)>();
  return op.call(grad, outputs, weights);
}

class MixedSumFunction : public torch::autograd::Function<MixedSumFunction> {
 public:
  static at::Tensor forward(torch::autograd::AutogradContext* ctx, at::TensorList outputs,
                            const at::Tensor& weights) {
    std::vector<at::Tensor> saved(outputs.begin(), outputs.end());
    saved.push_back(weights);
    ctx->save_for_backward(saved);
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    return mixed_sum_kernel(outputs, weights);
  }

  // One gradient per forward input: the K outputs (a TensorList counts element by element),
  // then the weights.
  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    std::vector<at::Tensor> saved = ctx->get_saved_variables();
    const at::Tensor weights = saved.back();
    saved.pop_back();
    return mixed_sum_backward_kernel(grads[0], saved, weights);
  }
};

at::Tensor mixed_sum_fused_autograd(at::TensorList outputs, const at::Tensor& weights) {
  return MixedSumFunction::apply(outputs, weights);
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(toponas, m) {
  m.def("mixed_sum_fused(Tensor[] outputs, Tensor weights) -> Tensor");
}

// Below autograd (inference mode, or tensors without autograd) it is the kernel op.
TORCH_LIBRARY_IMPL(toponas, CompositeExplicitAutograd, m) {
  m.impl("mixed_sum_fused", &mixed_sum_kernel);
}

TORCH_LIBRARY_IMPL(toponas, Autograd, m) {
  m.impl("mixed_sum_fused", &mixed_sum_fused_autograd);
}

}  // namespace toponas
