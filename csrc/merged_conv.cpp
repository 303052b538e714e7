// Family 2b: a whole merged conv group of a TopoNAS edge (toponas_kernels/nas/forms.py) as one
// op. Forward: the group's kernel tensors, coefficients and normalization statistics turned into
// the conv input and kernel of its form, then the conv; backward: the same rebuilt, the convs'
// backward and the chain rule through the statistics, coefficients and merge. The formulas are
// those of forms.py (DenseGroup, FactoredGroup, _statistics and _statistics_backward), which the
// tests compare with this op in float64.
//
// toponas::merged_conv_fused is one dispatcher call per group in forward and one in backward (its
// autograd node is a C++ Function, so no Python runs in backward); it keeps only x, the
// coefficients and the kernel tensors, as the Python path does. The bodies compose ATen ops, the
// merge kernels (toponas::merge_kernels_kernel and its backward) and, for the stacked and
// separable forms, the group's statistics-to-1x1-kernel op (toponas::group_pointwise_kernel and
// its backward, csrc/group_pointwise.h) on whatever device the tensors are on, so this file has
// no device code.
//
// spec (ints): form (0 dense, 1 stacked, 2 separable), normalize (0 none, 1 channel, 2 tensor),
// stride, dilation, groups (of the dense conv), size (of the group's span: the shift channels'
// and the separable depthwise conv's 'same' padding is size / 2), channels_last (run the
// depthwise stage channels-last), n (parts); then per part: its kernel tensors (1: a dense conv's
// weight; 2: a separable unit's depthwise D [C, 1, k, k] and pointwise P [O, C, 1, 1]), stride,
// padding, dilation, and its dilation on the merged kernel's lattice.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/library.h>

#include <optional>
#include <tuple>
#include <vector>

namespace toponas {
namespace {

using at::Tensor;

struct Part {
  int64_t ntensors, stride, padding, dilation, lattice_dil;
};

struct Spec {
  int64_t form = 0, normalize = 0, stride = 1, dilation = 1, groups = 1, size = 1;
  bool channels_last = false;
  std::vector<Part> parts;
  std::vector<int64_t> lattice_dils;
};

constexpr int64_t kHead = 8, kPerPart = 5;

Spec parse_spec(at::IntArrayRef s, size_t ntensors) {
  TORCH_CHECK(s.size() >= static_cast<size_t>(kHead), "merged_conv: spec has ", s.size(), " entries, expected at least ",
              kHead);
  Spec p;
  p.form = s[0];
  p.normalize = s[1];
  p.stride = s[2];
  p.dilation = s[3];
  p.groups = s[4];
  p.size = s[5];
  p.channels_last = s[6] != 0;
  const int64_t n = s[7];
  TORCH_CHECK(n >= 1 && static_cast<int64_t>(s.size()) == kHead + kPerPart * n, "merged_conv: spec has ", s.size(),
              " entries, but ", n, " parts need ", kHead + kPerPart * n);
  TORCH_CHECK(p.form >= 0 && p.form <= 2, "merged_conv: form must be 0 (dense), 1 (stacked) or 2 (separable), got ",
              p.form);
  TORCH_CHECK(p.normalize >= 0 && p.normalize <= 2, "merged_conv: normalize must be 0, 1 or 2, got ", p.normalize);
  TORCH_CHECK(p.stride >= 1 && p.dilation >= 1 && p.groups >= 1 && p.size >= 1,
              "merged_conv: stride, dilation, groups and size must be >= 1");
  size_t total = 0;
  for (int64_t i = 0; i < n; ++i) {
    const int64_t* q = s.data() + kHead + kPerPart * i;
    Part part{q[0], q[1], q[2], q[3], q[4]};
    TORCH_CHECK(part.ntensors == 1 || part.ntensors == 2, "merged_conv: part ", i, " has ", part.ntensors,
                " kernel tensors; expected 1 (dense) or 2 (depthwise, pointwise)");
    TORCH_CHECK(p.form == 0 || part.ntensors == 2, "merged_conv: the stacked and separable forms take "
                "depthwise+pointwise parts only (part ", i, ")");
    TORCH_CHECK(part.stride >= 1 && part.padding >= 0 && part.dilation >= 1 && part.lattice_dil >= 1,
                "merged_conv: part ", i, " has a bad stride, padding or dilation");
    total += part.ntensors;
    p.parts.push_back(part);
    p.lattice_dils.push_back(part.lattice_dil);
  }
  TORCH_CHECK(total == ntensors, "merged_conv: spec names ", total, " kernel tensors, got ", ntensors);
  return p;
}

std::vector<int64_t> two(int64_t v) { return {v, v}; }

void check_inputs(const Tensor& x, const Tensor& coefs, at::TensorList tensors, const Spec& s) {
  TORCH_CHECK(x.dim() == 4, "merged_conv: x must be [B, C, H, W], got shape ", x.sizes());
  TORCH_CHECK(coefs.dim() == 1 && coefs.size(0) == static_cast<int64_t>(s.parts.size()),
              "merged_conv: coefs must have one entry per part (", s.parts.size(), "), got shape ", coefs.sizes());
  TORCH_CHECK(coefs.scalar_type() == x.scalar_type() && coefs.device() == x.device(),
              "merged_conv: coefs must have x's dtype and device");
  for (const auto& t : tensors)
    TORCH_CHECK(t.dim() == 4 && t.scalar_type() == x.scalar_type() && t.device() == x.device(),
                "merged_conv: every kernel tensor must be 4-D with x's dtype and device");
}

Tensor merge_kernels_op(at::TensorList kernels, const Tensor& w, at::IntArrayRef dil, int64_t mode, double eps) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("toponas::merge_kernels_kernel", "")
                             .typed<Tensor(at::TensorList, const Tensor&, at::IntArrayRef, int64_t, double)>();
  return op.call(kernels, w, dil, mode, eps);
}

std::vector<Tensor> merge_kernels_backward_op(const Tensor& grad, at::TensorList kernels, const Tensor& w,
                                              at::IntArrayRef dil, int64_t mode, double eps) {
  static const auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("toponas::merge_kernels_backward_kernel", "")
          .typed<std::vector<Tensor>(const Tensor&, at::TensorList, const Tensor&, at::IntArrayRef, int64_t, double)>();
  return op.call(grad, kernels, w, dil, mode, eps);
}

// The factored group's 1x1 kernel (and separable merge weights) from its coefficients and kernel
// tensors, and the backward of that: csrc/group_pointwise.h, one launch each.
std::tuple<Tensor, Tensor> group_pointwise_op(const Tensor& c, at::TensorList tensors, int64_t form, int64_t normalize,
                                              double eps) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("toponas::group_pointwise_kernel", "")
                             .typed<std::tuple<Tensor, Tensor>(const Tensor&, at::TensorList, int64_t, int64_t, double)>();
  return op.call(c, tensors, form, normalize, eps);
}

std::vector<Tensor> group_pointwise_backward_op(const Tensor& gk, const Tensor& gdw, const Tensor& c,
                                                at::TensorList tensors, int64_t form, int64_t normalize, double eps) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("toponas::group_pointwise_backward_kernel", "")
                             .typed<std::vector<Tensor>(const Tensor&, const Tensor&, const Tensor&, at::TensorList,
                                                        int64_t, int64_t, double)>();
  return op.call(gk, gdw, c, tensors, form, normalize, eps);
}

// ----------------------------------------------------------------------- pieces of the forms
Tensor depthwise_layout(const Tensor& x, const Spec& s) {
  return s.channels_last ? x.contiguous(at::MemoryFormat::ChannelsLast) : x;
}

// Per part, the box sum of the channel sum of x over its taps: one conv with a 0/1 pattern.
Tensor shift_channels(const Tensor& xl, const Tensor& pattern, const Spec& s) {
  return at::conv2d(xl.sum(1, true), pattern, {}, two(s.stride), two(s.size / 2));
}

Tensor shift_input_grad(const Tensor& g, const Tensor& x, const Tensor& pattern, const Spec& s) {
  const int64_t st = s.stride;
  std::vector<int64_t> extra{x.size(2) - 1 - (g.size(2) - 1) * st, x.size(3) - 1 - (g.size(3) - 1) * st};
  return at::conv_transpose2d(g, pattern, {}, two(st), two(s.size / 2), extra);
}

std::vector<Tensor> depthwise_kernels(at::TensorList tensors) {
  std::vector<Tensor> Ds;
  for (size_t i = 0; i + 1 < tensors.size(); i += 2) Ds.push_back(tensors[i]);
  return Ds;
}

// ----------------------------------------------------------------------- dense form
// D [C, 1, k, k] as the row [1, C, k, k] of a dense kernel (a view where D is contiguous: one op
// fewer than a transpose, which also records its as_strided).
Tensor depthwise_row(const Tensor& D) {
  return D.is_contiguous() ? D.view({1, D.size(0), D.size(2), D.size(3)}) : D.transpose(0, 1);
}

struct Dense {
  std::vector<Tensor> kernels;
  Tensor merged;
  int64_t padding = 0;
};

Dense dense_build(const Tensor& coefs, at::TensorList tensors, const Spec& s, double eps) {
  Dense b;
  size_t t = 0;
  for (const auto& part : s.parts) {
    if (part.ntensors == 2)
      b.kernels.push_back(tensors[t + 1] * depthwise_row(tensors[t]));  // P * D^T: [O, C, k, k]
    else
      b.kernels.push_back(tensors[t]);
    t += part.ntensors;
  }
  b.merged = merge_kernels_op(b.kernels, coefs, s.lattice_dils, s.normalize, eps);
  b.padding = s.dilation * (b.merged.size(-1) / 2);
  return b;
}

Tensor dense_forward(const Tensor& x, const Tensor& coefs, at::TensorList tensors, const Spec& s, double eps) {
  Dense b = dense_build(coefs, tensors, s, eps);
  return at::conv2d(x, b.merged, {}, two(s.stride), two(b.padding), two(s.dilation), s.groups);
}

std::vector<Tensor> dense_backward(const Tensor& grad, const Tensor& x, const Tensor& coefs, at::TensorList tensors,
                                   const Spec& s, double eps, bool need_x) {
  Dense b = dense_build(coefs, tensors, s, eps);
  auto r = at::convolution_backward(grad, x, b.merged, std::nullopt, two(s.stride), two(b.padding), two(s.dilation),
                                    false, {0, 0}, s.groups, {need_x, true, false});
  auto g = merge_kernels_backward_op(std::get<1>(r), b.kernels, coefs, s.lattice_dils, s.normalize, eps);
  std::vector<Tensor> out{need_x ? std::get<0>(r) : x.new_empty({0}), g.back()};
  size_t t = 0;
  for (size_t i = 0; i < s.parts.size(); ++i) {
    if (s.parts[i].ntensors == 2) {
      const Tensor &D = tensors[t], &P = tensors[t + 1];
      out.push_back((g[i] * P).sum(0, true).view(D.sizes()));
      out.push_back((g[i] * depthwise_row(D)).sum({2, 3}, true));
    } else {
      out.push_back(g[i]);
    }
    t += s.parts[i].ntensors;
  }
  return out;
}

// ----------------------------------------------------------------------- stacked and separable
// z: the conv input (stacked depthwise outputs, or the merged depthwise conv's output; then the
// shift channels when normalized); kernel: the 1x1 conv over z; D, dw: the separable form's
// merged depthwise kernel and its merge weights.
struct Factored {
  Tensor z, kernel, xl, D, dw;
};

Factored factored_build(const Tensor& x, const Tensor& c, at::TensorList tensors, const Tensor& pattern, const Spec& s,
                        double eps) {
  Factored f;
  const std::vector<Tensor> Ds = depthwise_kernels(tensors);
  f.xl = depthwise_layout(x, s);
  std::vector<Tensor> zs;
  if (s.form == 1) {
    std::tie(f.kernel, std::ignore) = group_pointwise_op(c, tensors, 1, s.normalize, eps);
    for (size_t i = 0; i < Ds.size(); ++i) {
      const Part& p = s.parts[i];
      zs.push_back(at::conv2d(f.xl, Ds[i], {}, two(p.stride), two(p.padding), two(p.dilation), x.size(1)));
    }
  } else {
    std::tie(f.kernel, f.dw) = group_pointwise_op(c, tensors, 2, s.normalize, eps);
    f.D = merge_kernels_op(Ds, f.dw, s.lattice_dils, 0, eps);
    zs.push_back(at::conv2d(f.xl, f.D, {}, two(s.stride), two(s.size / 2), two(s.dilation), x.size(1)));
  }
  if (s.normalize != 0) zs.push_back(shift_channels(f.xl, pattern, s));
  f.z = zs.size() == 1 ? zs[0] : at::cat(zs, 1);
  return f;
}

// [grad x (empty when not needed), grad coefs, grad D_0, grad P_0, ...]. Rebuilds z and the 1x1
// kernel, then: the 1x1 conv's backward, the depthwise convs' (stacked: one per part; separable:
// the merged one, then the merge's), the shift channels' transposed box sums, and the pointwise
// kernel's backward (group_pointwise), whose gradients of D the depthwise convs' add to.
std::vector<Tensor> factored_backward(const Tensor& grad, const Tensor& x, const Tensor& c, at::TensorList tensors,
                                      const Tensor& pattern, const Spec& s, double eps, bool need_x) {
  const Factored f = factored_build(x, c, tensors, pattern, s, eps);
  auto r1 = at::convolution_backward(grad, f.z, f.kernel, std::nullopt, {1, 1}, {0, 0}, {1, 1}, false, {0, 0}, 1,
                                     {true, true, false});
  const Tensor gz = std::get<0>(r1), gk = std::get<1>(r1);
  const std::vector<Tensor> Ds = depthwise_kernels(tensors);
  const int64_t C = x.size(1), n = static_cast<int64_t>(Ds.size());
  Tensor gx;
  std::vector<Tensor> gDs;
  Tensor gdw;
  auto add_x = [&](const Tensor& g) { gx = gx.defined() ? gx.add_(g) : g; };
  // gz split by what produced its channels (one op for all the pieces)
  std::vector<int64_t> sizes(s.form == 1 ? n : 1, C);
  if (s.normalize != 0) sizes.push_back(n);  // one shift channel per part
  const std::vector<Tensor> gzs = sizes.size() == 1 ? std::vector<Tensor>{gz} : gz.split_with_sizes(sizes, 1);
  if (s.form == 1) {
    for (int64_t i = 0; i < n; ++i) {
      const Part& p = s.parts[i];
      auto r = at::convolution_backward(gzs[i], f.xl, Ds[i], std::nullopt, two(p.stride),
                                        two(p.padding), two(p.dilation), false, {0, 0}, C, {need_x, true, false});
      if (need_x) add_x(std::get<0>(r));
      gDs.push_back(std::get<1>(r));
    }
  } else {
    auto r = at::convolution_backward(gzs[0], f.xl, f.D, std::nullopt, two(s.stride), two(s.size / 2), two(s.dilation),
                                      false, {0, 0}, C, {need_x, true, false});
    if (need_x) add_x(std::get<0>(r));
    gDs = merge_kernels_backward_op(std::get<1>(r), Ds, f.dw, s.lattice_dils, 0, eps);
    gdw = gDs.back();
    gDs.pop_back();
  }
  if (need_x && s.normalize != 0) add_x(shift_input_grad(gzs.back(), x, pattern, s));
  std::vector<Tensor> g = group_pointwise_backward_op(gk, gdw, c, tensors, s.form, s.normalize, eps);
  std::vector<Tensor> out{need_x ? gx : x.new_empty({0}), g[0]};
  for (int64_t i = 0; i < n; ++i) {
    out.push_back(g[1 + 2 * i].add_(gDs[i]));
    out.push_back(g[2 + 2 * i]);
  }
  return out;
}

Tensor pattern_for(const std::optional<Tensor>& pattern, const Spec& s) {
  const bool needed = s.form != 0 && s.normalize != 0;
  TORCH_CHECK(!needed || (pattern.has_value() && pattern->defined()),
              "merged_conv: the stacked and separable forms with normalization need the shift pattern");
  return needed ? *pattern : Tensor();
}

// ----------------------------------------------------------------------- the ops
Tensor merged_conv_kernel(const Tensor& x, const Tensor& coefs, at::TensorList tensors,
                          const std::optional<Tensor>& pattern, at::IntArrayRef spec, double eps) {
  const Spec s = parse_spec(spec, tensors.size());
  check_inputs(x, coefs, tensors, s);
  if (s.form == 0) return dense_forward(x, coefs, tensors, s, eps);
  Factored f = factored_build(x, coefs, tensors, pattern_for(pattern, s), s, eps);
  return at::conv2d(f.z, f.kernel);
}

std::vector<Tensor> merged_conv_backward_kernel(const Tensor& grad, const Tensor& x, const Tensor& coefs,
                                                at::TensorList tensors, const std::optional<Tensor>& pattern,
                                                at::IntArrayRef spec, double eps, bool need_x) {
  const Spec s = parse_spec(spec, tensors.size());
  check_inputs(x, coefs, tensors, s);
  TORCH_CHECK(grad.dim() == 4 && grad.scalar_type() == x.scalar_type(), "merged_conv: grad must be 4-D in x's dtype");
  if (s.form == 0) return dense_backward(grad, x, coefs, tensors, s, eps, need_x);
  const Tensor p = pattern_for(pattern, s);
  return factored_backward(grad, x, coefs, tensors, p, s, eps, need_x);
}

class MergedConvFunction : public torch::autograd::Function<MergedConvFunction> {
 public:
  static Tensor forward(torch::autograd::AutogradContext* ctx, const Tensor& x, const Tensor& coefs,
                        at::TensorList tensors, const std::optional<Tensor>& pattern, at::IntArrayRef spec,
                        double eps) {
    // Only the inputs (the kernel tensors are parameters, kept anyway): backward rebuilds the rest.
    std::vector<Tensor> saved{x, coefs};
    saved.insert(saved.end(), tensors.begin(), tensors.end());
    ctx->save_for_backward(saved);
    ctx->saved_data["spec"] = spec.vec();
    ctx->saved_data["eps"] = eps;
    if (pattern.has_value() && pattern->defined()) ctx->saved_data["pattern"] = *pattern;
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    static const auto op = c10::Dispatcher::singleton()
                               .findSchemaOrThrow("toponas::merged_conv_kernel", "")
                               .typed<Tensor(const Tensor&, const Tensor&, at::TensorList,
                                             const std::optional<Tensor>&, at::IntArrayRef, double)>();
    return op.call(x, coefs, tensors, pattern, spec, eps);
  }

  // One gradient per forward input: x, coefs, each kernel tensor, then pattern, spec and eps.
  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    std::vector<Tensor> saved = ctx->get_saved_variables();
    const Tensor x = saved[0], coefs = saved[1];
    std::vector<Tensor> tensors(saved.begin() + 2, saved.end());
    const std::vector<int64_t> spec = ctx->saved_data["spec"].toIntVector();
    const double eps = ctx->saved_data["eps"].toDouble();
    std::optional<Tensor> pattern;
    auto it = ctx->saved_data.find("pattern");
    if (it != ctx->saved_data.end()) pattern = it->second.toTensor();
    const bool need_x = ctx->needs_input_grad(0);
    static const auto op =
        c10::Dispatcher::singleton()
            .findSchemaOrThrow("toponas::merged_conv_backward_kernel", "")
            .typed<std::vector<Tensor>(const Tensor&, const Tensor&, const Tensor&, at::TensorList,
                                       const std::optional<Tensor>&, at::IntArrayRef, double, bool)>();
    std::vector<Tensor> g;
    {
      at::AutoDispatchBelowADInplaceOrView below_autograd;
      g = op.call(grads[0], x, coefs, tensors, pattern, spec, eps, need_x);
    }
    torch::autograd::variable_list out{need_x ? g[0] : Tensor()};
    out.insert(out.end(), g.begin() + 1, g.end());
    out.insert(out.end(), {Tensor(), Tensor(), Tensor()});
    return out;
  }
};

Tensor merged_conv_fused_autograd(const Tensor& x, const Tensor& coefs, at::TensorList tensors,
                                  const std::optional<Tensor>& pattern, at::IntArrayRef spec, double eps) {
  return MergedConvFunction::apply(x, coefs, tensors, pattern, spec, eps);
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(toponas, m) {
  m.def("merged_conv_kernel(Tensor x, Tensor coefs, Tensor[] tensors, Tensor? pattern, int[] spec, float eps) -> Tensor");
  m.def(
      "merged_conv_backward_kernel(Tensor grad, Tensor x, Tensor coefs, Tensor[] tensors, Tensor? pattern, "
      "int[] spec, float eps, bool need_x) -> Tensor[]");
  m.def("merged_conv_fused(Tensor x, Tensor coefs, Tensor[] tensors, Tensor? pattern, int[] spec, float eps) -> Tensor");
}

// The bodies run ATen ops and the merge kernels on the tensors' device: the same functions serve
// the CPU and (when the CUDA kernels are built) CUDA.
TORCH_LIBRARY_IMPL(toponas, CPU, m) {
  m.impl("merged_conv_kernel", &merged_conv_kernel);
  m.impl("merged_conv_backward_kernel", &merged_conv_backward_kernel);
}

#ifdef TOPONAS_WITH_CUDA
TORCH_LIBRARY_IMPL(toponas, CUDA, m) {
  m.impl("merged_conv_kernel", &merged_conv_kernel);
  m.impl("merged_conv_backward_kernel", &merged_conv_backward_kernel);
}
#endif

TORCH_LIBRARY_IMPL(toponas, CompositeExplicitAutograd, m) { m.impl("merged_conv_fused", &merged_conv_kernel); }

TORCH_LIBRARY_IMPL(toponas, Autograd, m) { m.impl("merged_conv_fused", &merged_conv_fused_autograd); }

}  // namespace toponas
