// Autograd in C++ for the compiled kernels that a search step calls on every edge: the eager
// fast paths of toponas_kernels.ops.mixed_sum, channel_shuffle and partial_channel_shuffle call
// toponas::*_fused, one dispatcher call whose autograd node is a C++ Function, so neither the
// forward nor the backward passes through Python. With Python's autograd.Function around the
// kernels the host side cost about as much as the eager code they replace at small sizes
// (bench/ops.py's host_us column).
//
// The forwards and backwards are the kernel ops themselves (toponas::*_kernel, CPU and CUDA),
// reached through the dispatcher, so this file has no device code. The shuffles' backwards are
// again fused ops, so they differentiate any number of times (mixed_sum's backward, like its
// custom op's, once). Under torch.compile the package uses the Python custom ops instead, which
// carry the fake implementations and autograd formulas torch.compile needs; these ops have fakes
// too (ops/mixed.py, ops/shuffle.py), so opcheck covers them.
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

// ------------------------------------------------------------------------------- shuffles
at::Tensor channel_shuffle_kernel(const at::Tensor& x, int64_t groups) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("toponas::channel_shuffle_kernel", "")
                             .typed<at::Tensor(const at::Tensor&, int64_t)>();
  return op.call(x, groups);
}

at::Tensor partial_channel_shuffle_kernel(const at::Tensor& processed, const at::Tensor& bypass,
                                          int64_t groups) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("toponas::partial_channel_shuffle_kernel", "")
                             .typed<at::Tensor(const at::Tensor&, const at::Tensor&, int64_t)>();
  return op.call(processed, bypass, groups);
}

std::vector<at::Tensor> partial_channel_unshuffle_kernel(const at::Tensor& grad, int64_t processed_channels,
                                                         int64_t groups) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("toponas::partial_channel_unshuffle_kernel", "")
                             .typed<std::vector<at::Tensor>(const at::Tensor&, int64_t, int64_t)>();
  return op.call(grad, processed_channels, groups);
}

// The fused ops through the dispatcher, so that a backward run with create_graph records them.
at::Tensor channel_shuffle_fused(const at::Tensor& x, int64_t groups) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("toponas::channel_shuffle_fused", "")
                             .typed<at::Tensor(const at::Tensor&, int64_t)>();
  return op.call(x, groups);
}

at::Tensor partial_channel_shuffle_fused(const at::Tensor& processed, const at::Tensor& bypass, int64_t groups) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("toponas::partial_channel_shuffle_fused", "")
                             .typed<at::Tensor(const at::Tensor&, const at::Tensor&, int64_t)>();
  return op.call(processed, bypass, groups);
}

std::vector<at::Tensor> partial_channel_unshuffle_fused(const at::Tensor& grad, int64_t processed_channels,
                                                        int64_t groups) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("toponas::partial_channel_unshuffle_fused", "")
                             .typed<std::vector<at::Tensor>(const at::Tensor&, int64_t, int64_t)>();
  return op.call(grad, processed_channels, groups);
}

// The inverse of a shuffle with g groups of C channels is the shuffle with C / g groups.
class ChannelShuffleFunction : public torch::autograd::Function<ChannelShuffleFunction> {
 public:
  static at::Tensor forward(torch::autograd::AutogradContext* ctx, const at::Tensor& x, int64_t groups) {
    const int64_t c = x.dim() > 1 ? x.size(1) : 0;
    ctx->saved_data["inverse_groups"] = (c > 0 && groups > 0) ? c / groups : int64_t(1);
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    return channel_shuffle_kernel(x, groups);
  }
  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    return {channel_shuffle_fused(grads[0], ctx->saved_data["inverse_groups"].toInt()), at::Tensor()};
  }
};

class PartialShuffleFunction : public torch::autograd::Function<PartialShuffleFunction> {
 public:
  static at::Tensor forward(torch::autograd::AutogradContext* ctx, const at::Tensor& processed,
                            const at::Tensor& bypass, int64_t groups) {
    ctx->saved_data["processed_channels"] = processed.dim() > 1 ? processed.size(1) : int64_t(0);
    ctx->saved_data["groups"] = groups;
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    return partial_channel_shuffle_kernel(processed, bypass, groups);
  }
  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    auto parts = partial_channel_unshuffle_fused(grads[0], ctx->saved_data["processed_channels"].toInt(),
                                                 ctx->saved_data["groups"].toInt());
    return {parts[0], parts[1], at::Tensor()};
  }
};

class PartialUnshuffleFunction : public torch::autograd::Function<PartialUnshuffleFunction> {
 public:
  static torch::autograd::variable_list forward(torch::autograd::AutogradContext* ctx, const at::Tensor& grad,
                                                int64_t processed_channels, int64_t groups) {
    ctx->saved_data["groups"] = groups;
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    return partial_channel_unshuffle_kernel(grad, processed_channels, groups);
  }
  // An absent gradient arrives as zeros (gradients are materialized by default).
  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    return {partial_channel_shuffle_fused(grads[0], grads[1], ctx->saved_data["groups"].toInt()), at::Tensor(),
            at::Tensor()};
  }
};

at::Tensor channel_shuffle_fused_autograd(const at::Tensor& x, int64_t groups) {
  return ChannelShuffleFunction::apply(x, groups);
}

at::Tensor partial_channel_shuffle_fused_autograd(const at::Tensor& processed, const at::Tensor& bypass,
                                                  int64_t groups) {
  return PartialShuffleFunction::apply(processed, bypass, groups);
}

std::vector<at::Tensor> partial_channel_unshuffle_fused_autograd(const at::Tensor& grad, int64_t processed_channels,
                                                                 int64_t groups) {
  return PartialUnshuffleFunction::apply(grad, processed_channels, groups);
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(toponas, m) {
  m.def("mixed_sum_fused(Tensor[] outputs, Tensor weights) -> Tensor");
  m.def("channel_shuffle_fused(Tensor x, int groups) -> Tensor");
  m.def("partial_channel_shuffle_fused(Tensor processed, Tensor bypass, int groups) -> Tensor");
  m.def("partial_channel_unshuffle_fused(Tensor grad, int processed_channels, int groups) -> Tensor[]");
}

// Below autograd (inference mode, or tensors without autograd) they are the kernel ops.
TORCH_LIBRARY_IMPL(toponas, CompositeExplicitAutograd, m) {
  m.impl("mixed_sum_fused", &mixed_sum_kernel);
  m.impl("channel_shuffle_fused", &channel_shuffle_kernel);
  m.impl("partial_channel_shuffle_fused", &partial_channel_shuffle_kernel);
  m.impl("partial_channel_unshuffle_fused", &partial_channel_unshuffle_kernel);
}

TORCH_LIBRARY_IMPL(toponas, Autograd, m) {
  m.impl("mixed_sum_fused", &mixed_sum_fused_autograd);
  m.impl("channel_shuffle_fused", &channel_shuffle_fused_autograd);
  m.impl("partial_channel_shuffle_fused", &partial_channel_shuffle_fused_autograd);
  m.impl("partial_channel_unshuffle_fused", &partial_channel_unshuffle_fused_autograd);
}

}  // namespace toponas
