// Family 3 on the CPU: channel_shuffle and the PC-DARTS partial-channel shuffle as one row
// permutation (the plan and its formula are in channel_shuffle.h), plus the schemas of the
// family's three kernel ops.
//
// Pure data movement, dtype-agnostic: each destination row (b, c) of S elements is one memcpy
// of S * element_size bytes from its source row; rows are spread over threads in blocks of about
// 64 KiB. There is no concatenation buffer: the source (or, for the backward, destination) row
// is looked up in whichever of the two tensors holds that channel.
//
// Also the three toponas::*_fused ops, which the eager fast paths of ops.channel_shuffle and
// ops.partial_channel_shuffle call on the compiled backends: one dispatcher call each whose
// autograd node is a C++ Function around the kernel ops (reached through the dispatcher: CPU
// here, CUDA in cuda/channel_shuffle.cu), so no Python runs in forward or backward. Each
// backward is again a fused op, so they differentiate any number of times. Under
// torch.compile the package uses the Python custom ops instead (ops/shuffle.py), where these
// ops have fakes too, so opcheck covers them.
#include <ATen/Parallel.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/library.h>

#include <algorithm>
#include <cstring>

#include "channel_shuffle.h"
#include "common.h"

namespace toponas {
namespace {

constexpr int64_t kGrainBytes = 64 * 1024;  // bytes per parallel_for grain

// The spatial dims [2, dim) can be walked as one run of contiguous elements.
bool spatial_dense(const at::Tensor& t) {
  int64_t expected = 1;
  for (int64_t i = t.dim() - 1; i >= 2; --i) {
    if (t.size(i) != 1 && t.stride(i) != expected) return false;
    expected *= t.size(i);
  }
  return true;
}

// Rows of a side: in place when the spatial dims are dense (batch and channel strides are free:
// x[:, :C/k] is read without a copy), else a contiguous copy. Strides of size-1 dims are set
// to 0 (never multiplied by a non-zero index), so they cannot spoil the CUDA vector width.
RowSide as_rows(const at::Tensor& t) {
  RowSide side;
  side.tensor = spatial_dense(t) ? t : t.contiguous();
  side.stride_b = side.tensor.size(0) == 1 ? 0 : side.tensor.stride(0);
  side.stride_c = side.tensor.size(1) == 1 ? 0 : side.tensor.stride(1);
  return side;
}

// A fresh contiguous [B, channels, *spatial] tensor like `like`.
at::Tensor fresh(const at::Tensor& like, int64_t channels) {
  auto sizes = like.sizes().vec();
  sizes[1] = channels;
  return at::empty(sizes, like.options().memory_format(at::MemoryFormat::Contiguous));
}

int64_t spatial_numel(const at::Tensor& t) {
  int64_t n = 1;
  for (int64_t i = 2; i < t.dim(); ++i) n *= t.size(i);
  return n;
}

// Fills side[0..1] and split from the two parts of a channel-split side; a part with no
// channels is dropped, so the kernels see one tensor whenever they can.
void set_sides(RowSide (&side)[2], int64_t& split, const RowSide& first, const RowSide& second,
               int64_t first_channels, int64_t channels) {
  if (first_channels == 0) {
    side[0] = side[1] = second;
    split = channels;
  } else if (first_channels == channels) {
    side[0] = side[1] = first;
    split = channels;
  } else {
    side[0] = first;
    side[1] = second;
    split = first_channels;
  }
}

void check_groups(int64_t channels, int64_t groups, const char* what) {
  TORCH_CHECK(groups > 0, "groups must be positive, got ", groups);
  TORCH_CHECK(channels % groups == 0, what, ": C=", channels, " is not divisible by groups=", groups);
}

RowPermutation base_plan(const at::Tensor& like, int64_t channels) {
  RowPermutation p;
  p.batch = like.size(0);
  p.channels = channels;
  p.row_elems = spatial_numel(like);
  p.elem_size = static_cast<int64_t>(like.element_size());
  return p;
}

// The bytes of row (b, c) of a (possibly split) side.
template <typename Ptr>
inline Ptr row_ptr(Ptr base0, Ptr base1, const RowSide (&side)[2], int64_t split, int64_t b,
                   int64_t c, int64_t elem_size) {
  if (c < split) return base0 + (b * side[0].stride_b + c * side[0].stride_c) * elem_size;
  return base1 + (b * side[1].stride_b + (c - split) * side[1].stride_c) * elem_size;
}

void permute_rows_cpu(const RowPermutation& p) {
  const int64_t rows = p.rows(), row_bytes = p.row_bytes();
  if (rows == 0 || row_bytes == 0) return;
  const char* s0 = static_cast<const char*>(p.src[0].tensor.const_data_ptr());
  const char* s1 = static_cast<const char*>(p.src[1].tensor.const_data_ptr());
  char* d0 = static_cast<char*>(p.dst[0].tensor.mutable_data_ptr());
  char* d1 = static_cast<char*>(p.dst[1].tensor.mutable_data_ptr());
  const int64_t C = p.channels, G = p.groups, CG = p.channels / p.groups;
  const int64_t grain = std::max<int64_t>(1, kGrainBytes / row_bytes);
  at::parallel_for(0, rows, grain, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t b = r / C, d = r - b * C;
      const int64_t s = (d % G) * CG + d / G;
      std::memcpy(row_ptr(d0, d1, p.dst, p.dst_split, b, d, p.elem_size),
                  row_ptr(s0, s1, p.src, p.src_split, b, s, p.elem_size), static_cast<size_t>(row_bytes));
    }
  });
}

at::Tensor channel_shuffle_cpu(const at::Tensor& x, int64_t groups) {
  auto p = plan_channel_shuffle(x, groups);
  permute_rows_cpu(p);
  return p.outputs[0];
}

at::Tensor partial_channel_shuffle_cpu(const at::Tensor& processed, const at::Tensor& bypass, int64_t groups) {
  auto p = plan_partial_channel_shuffle(processed, bypass, groups);
  permute_rows_cpu(p);
  return p.outputs[0];
}

std::vector<at::Tensor> partial_channel_unshuffle_cpu(const at::Tensor& grad, int64_t processed_channels,
                                                      int64_t groups) {
  auto p = plan_partial_channel_unshuffle(grad, processed_channels, groups);
  permute_rows_cpu(p);
  return p.outputs;
}

}  // namespace

RowPermutation plan_channel_shuffle(const at::Tensor& x, int64_t groups) {
  TORCH_CHECK(x.dim() >= 2, "x must have at least 2 dims [B, C, *spatial], got shape ", x.sizes());
  const int64_t C = x.size(1);
  check_groups(C, groups, "x");
  RowPermutation p = base_plan(x, C);
  p.groups = groups;
  const RowSide src = as_rows(x);
  p.src[0] = p.src[1] = src;
  p.src_split = C;
  const RowSide dst = as_rows(fresh(x, C));
  p.dst[0] = p.dst[1] = dst;
  p.dst_split = C;
  p.outputs = {dst.tensor};
  return p;
}

RowPermutation plan_partial_channel_shuffle(const at::Tensor& processed, const at::Tensor& bypass,
                                            int64_t groups) {
  TORCH_CHECK(processed.dim() >= 2, "processed must have at least 2 dims [B, Cp, *spatial], got shape ",
              processed.sizes());
  TORCH_CHECK(bypass.dim() == processed.dim(), "bypass has shape ", bypass.sizes(), " but processed has ",
              processed.sizes(), ": they must agree in every dim but the channels");
  check_same_like(bypass, processed, "bypass");
  for (int64_t i = 0; i < processed.dim(); ++i)
    TORCH_CHECK(i == 1 || bypass.size(i) == processed.size(i), "bypass has shape ", bypass.sizes(),
                " but processed has ", processed.sizes(), ": they must agree in every dim but the channels");
  const int64_t Cp = processed.size(1), C = Cp + bypass.size(1);
  check_groups(C, groups, "processed and bypass together");
  RowPermutation p = base_plan(processed, C);
  p.groups = groups;
  set_sides(p.src, p.src_split, as_rows(processed), as_rows(bypass), Cp, C);
  const RowSide dst = as_rows(fresh(processed, C));
  p.dst[0] = p.dst[1] = dst;
  p.dst_split = C;
  p.outputs = {dst.tensor};
  return p;
}

RowPermutation plan_partial_channel_unshuffle(const at::Tensor& grad, int64_t processed_channels,
                                              int64_t groups) {
  TORCH_CHECK(grad.dim() >= 2, "grad must have at least 2 dims [B, C, *spatial], got shape ", grad.sizes());
  const int64_t C = grad.size(1);
  check_groups(C, groups, "grad");
  TORCH_CHECK(processed_channels >= 0 && processed_channels <= C, "processed_channels must be in [0, ", C,
              "], got ", processed_channels);
  RowPermutation p = base_plan(grad, C);
  // The inverse of a shuffle with `groups` groups is a shuffle with C / groups groups.
  p.groups = C == 0 ? 1 : C / groups;
  const RowSide src = as_rows(grad);
  p.src[0] = p.src[1] = src;
  p.src_split = C;
  const RowSide parts[2] = {as_rows(fresh(grad, processed_channels)),
                            as_rows(fresh(grad, C - processed_channels))};
  set_sides(p.dst, p.dst_split, parts[0], parts[1], processed_channels, C);
  p.outputs = {parts[0].tensor, parts[1].tensor};
  return p;
}

namespace {

// ------------------------------------------------------------------------------- fused ops
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
  m.def("channel_shuffle_kernel(Tensor x, int groups) -> Tensor");
  m.def("partial_channel_shuffle_kernel(Tensor processed, Tensor bypass, int groups) -> Tensor");
  m.def("partial_channel_unshuffle_kernel(Tensor grad, int processed_channels, int groups) -> Tensor[]");
  m.def("channel_shuffle_fused(Tensor x, int groups) -> Tensor");
  m.def("partial_channel_shuffle_fused(Tensor processed, Tensor bypass, int groups) -> Tensor");
  m.def("partial_channel_unshuffle_fused(Tensor grad, int processed_channels, int groups) -> Tensor[]");
}

TORCH_LIBRARY_IMPL(toponas, CPU, m) {
  m.impl("channel_shuffle_kernel", &channel_shuffle_cpu);
  m.impl("partial_channel_shuffle_kernel", &partial_channel_shuffle_cpu);
  m.impl("partial_channel_unshuffle_kernel", &partial_channel_unshuffle_cpu);
}

// Below autograd (inference mode, or tensors without autograd) the fused ops are the kernel ops.
TORCH_LIBRARY_IMPL(toponas, CompositeExplicitAutograd, m) {
  m.impl("channel_shuffle_fused", &channel_shuffle_kernel);
  m.impl("partial_channel_shuffle_fused", &partial_channel_shuffle_kernel);
  m.impl("partial_channel_unshuffle_fused", &partial_channel_unshuffle_kernel);
}

TORCH_LIBRARY_IMPL(toponas, Autograd, m) {
  m.impl("channel_shuffle_fused", &channel_shuffle_fused_autograd);
  m.impl("partial_channel_shuffle_fused", &partial_channel_shuffle_fused_autograd);
  m.impl("partial_channel_unshuffle_fused", &partial_channel_unshuffle_fused_autograd);
}

}  // namespace toponas
