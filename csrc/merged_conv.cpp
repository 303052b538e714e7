// Family 2b: a whole merged conv group of a TopoNAS edge (toponas_kernels/nas/forms.py) as one
// op. Forward: the group's kernel tensors, coefficients and normalization statistics turned into
// the conv input and kernel of its form, then the conv; backward: the same rebuilt, the convs'
// backward and the chain rule through the statistics, coefficients and merge. The formulas are
// those of forms.py (DenseGroup, FactoredGroup, _statistics and _statistics_backward), which the
// tests compare with this op in float64.
//
// toponas::merged_conv_fused is one dispatcher call per group in forward and one in backward (its
// autograd node is a C++ Function, so no Python runs in backward); it keeps only x, the
// coefficients and the kernel tensors, as the Python path does. The bodies compose ATen ops and
// the merge kernels (toponas::merge_kernels_kernel and its backward) on whatever device the
// tensors are on, so this file has no device code.
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

at::ScalarType acc_type(at::ScalarType t) {
  return (t == at::kHalf || t == at::kBFloat16) ? at::kFloat : t;
}

// ----------------------------------------------------------------------- normalization statistics
// Per part i and output channel o of W_i[o, c, t] = P_i[o, c] D_i[c, t] (T taps): with m1[c] and
// v[c] the mean and variance of D's taps of channel c and u[o, c] = P[o, c] m1[c],
//   mean_o = mean_c u[o, c],   var_o = mean_c (u[o, c] - mean_o)^2 + mean_c P[o, c]^2 v[c]
// (the cross term vanishes: D's centred taps sum to 0). Both variance terms are sums of squares of
// centred values, so float32 loses nothing to cancellation (E[W^2] - mean^2 would, for kernels
// whose mean is large against their spread). "tensor" mode combines the channels' means and
// variances (var = mean_o (var_o + (mean_o - mean)^2)).
struct Stats {
  Tensor P;                // [n, O, C] stacked pointwise kernels, parameters' dtype
  Tensor p;                // the same in the accumulation dtype
  std::vector<Tensor> d;   // per part D [C, T], accumulation dtype
  Tensor m1, v;            // [n, C]
  Tensor dev;              // [n, O, C]: u - mean_o
  Tensor mo;               // [n, O]: per-channel means
  Tensor mean, stdv, a_acc;  // [n, O]: the statistics applied (mode 2: the part's, expanded)
  Tensor a, b;             // [n, O] in the parameters' dtype: standardize(W) = a W + b
};

Stats statistics(const std::vector<Tensor>& Ps, const std::vector<Tensor>& Ds, int64_t normalize, double eps) {
  Stats st;
  std::vector<Tensor> flat, m1s, vs;
  for (const auto& P : Ps) flat.push_back(P.flatten(1));
  st.P = at::stack(flat);
  const auto acc = acc_type(st.P.scalar_type());
  st.p = st.P.to(acc);
  for (const auto& D : Ds) {
    Tensor d = D.flatten(1).to(acc);
    Tensor m1 = d.mean(1);
    Tensor c = d - m1.unsqueeze(1);
    vs.push_back((c * c).mean(1));
    m1s.push_back(m1);
    st.d.push_back(d);
  }
  st.m1 = at::stack(m1s);
  st.v = at::stack(vs);
  Tensor u = st.p * st.m1.unsqueeze(1);
  st.mo = u.mean(2);
  st.dev = u - st.mo.unsqueeze(2);
  Tensor var = (st.dev * st.dev).mean(2) + (st.p * st.p * st.v.unsqueeze(1)).mean(2);
  Tensor mean = st.mo;
  if (normalize == 2) {
    Tensor mt = st.mo.mean(1, true);
    Tensor dm = st.mo - mt;
    var = (var + dm * dm).mean(1, true).expand_as(st.mo);
    mean = mt.expand_as(st.mo);
  }
  st.mean = mean;
  st.stdv = var.clamp_min(0).sqrt();
  st.a_acc = (st.stdv + eps).reciprocal();
  st.a = st.a_acc.to(st.P.scalar_type());
  st.b = (-(mean * st.a_acc)).to(st.P.scalar_type());
  return st;
}

// The gradients of the stacked P [n, O, C] and of each D for the gradients ga, gb [n, O] of
// (a, b). A constant channel (std 0) passes no gradient through its std.
std::pair<Tensor, std::vector<Tensor>> statistics_backward(const Stats& st, const Tensor& ga_in, const Tensor& gb_in,
                                                           int64_t normalize, const std::vector<Tensor>& Ds) {
  const auto acc = st.a_acc.scalar_type();
  Tensor ga = ga_in.to(acc), gb = gb_in.to(acc);
  const Tensor& a = st.a_acc;
  Tensor g_mean = -(a * gb);
  Tensor g_std = -((ga - st.mean * gb) * a * a);  // b = -mean a, da/dstd = -a^2
  Tensor pos = st.stdv > 0;
  Tensor g_var = at::where(pos, g_std / (at::where(pos, st.stdv, at::ones_like(st.stdv)) * 2), at::zeros_like(g_std));
  if (normalize == 2) {
    const double O = static_cast<double>(st.mo.size(1));
    Tensor gvt = g_var.sum(1, true);
    g_mean = g_mean.sum(1, true) / O + gvt * (st.mo - st.mean) * (2.0 / O);
    g_var = (gvt / O).expand_as(g_var);
  }
  const double C = static_cast<double>(st.p.size(2));
  Tensor gm3 = g_mean.unsqueeze(2), gv3 = g_var.unsqueeze(2);
  Tensor m13 = st.m1.unsqueeze(1);
  Tensor gp = (gm3 * m13 + gv3 * (st.dev * m13 + st.p * st.v.unsqueeze(1)) * 2) / C;
  Tensor g_m1 = ((gm3 + gv3 * st.dev * 2) * st.p).sum(1) / C;  // [n, C]
  Tensor g_v = (gv3 * st.p * st.p).sum(1) / C;
  std::vector<Tensor> gDs;
  for (size_t i = 0; i < Ds.size(); ++i) {
    const Tensor& d = st.d[i];
    const double T = static_cast<double>(d.size(1));
    Tensor gd = (g_m1[i].unsqueeze(1) + g_v[i].unsqueeze(1) * (d - st.m1[i].unsqueeze(1)) * 2) / T;
    gDs.push_back(gd.view(Ds[i].sizes()).to(Ds[i].scalar_type()));
  }
  return {gp.to(st.P.scalar_type()), gDs};
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

void split(at::TensorList tensors, std::vector<Tensor>& Ds, std::vector<Tensor>& Ps) {
  for (size_t i = 0; i + 1 < tensors.size(); i += 2) {
    Ds.push_back(tensors[i]);
    Ps.push_back(tensors[i + 1]);
  }
}

Tensor stack_pointwise(const std::vector<Tensor>& Ps) {
  std::vector<Tensor> flat;
  for (const auto& P : Ps) flat.push_back(P.flatten(1));
  return at::stack(flat);
}

// ----------------------------------------------------------------------- dense form
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
      b.kernels.push_back(tensors[t + 1] * tensors[t].transpose(0, 1));  // P * D^T: [O, C, k, k]
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
      out.push_back((g[i] * P).sum(0, true).transpose(0, 1));
      out.push_back((g[i] * D.transpose(0, 1)).sum({2, 3}, true));
    } else {
      out.push_back(g[i]);
    }
    t += s.parts[i].ntensors;
  }
  return out;
}

// ----------------------------------------------------------------------- stacked and separable
struct Factored {
  Tensor z, kernel, xl;
  Tensor P;  // [n, O, C] stacked pointwise kernels
  std::optional<Stats> st;
  // separable only
  Tensor q, total, safe, rms, scale, D;
  std::vector<Tensor> Dn;
};

Factored stacked_build(const Tensor& x, const Tensor& c, at::TensorList tensors, const Tensor& pattern, const Spec& s,
                       double eps) {
  Factored f;
  std::vector<Tensor> Ds, Ps;
  split(tensors, Ds, Ps);
  f.xl = depthwise_layout(x, s);
  const int64_t C = x.size(1), n = static_cast<int64_t>(Ds.size());
  std::vector<Tensor> zs;
  for (int64_t i = 0; i < n; ++i) {
    const Part& p = s.parts[i];
    zs.push_back(at::conv2d(f.xl, Ds[i], {}, two(p.stride), two(p.padding), two(p.dilation), C));
  }
  Tensor cols;
  if (s.normalize == 0) {
    f.P = stack_pointwise(Ps);
    cols = c.view({n, 1, 1}) * f.P;
  } else {
    f.st = statistics(Ps, Ds, s.normalize, eps);
    f.P = f.st->P;
    cols = (c.unsqueeze(1) * f.st->a).unsqueeze(2) * f.P;
  }
  const int64_t O = cols.size(1);
  Tensor kernel = cols.transpose(0, 1).reshape({O, -1});
  if (f.st) {
    zs.push_back(shift_channels(f.xl, pattern, s));
    kernel = at::cat({kernel, (c.unsqueeze(1) * f.st->b).t()}, 1);
  }
  f.z = at::cat(zs, 1);
  f.kernel = kernel.unsqueeze(-1).unsqueeze(-1);
  return f;
}

Factored separable_build(const Tensor& x, const Tensor& c, at::TensorList tensors, const Tensor& pattern,
                         const Spec& s, double eps) {
  Factored f;
  std::vector<Tensor> Ds, Ps;
  split(tensors, Ds, Ps);
  const int64_t n = static_cast<int64_t>(Ds.size());
  f.total = c.sum();
  f.safe = at::where(f.total == 0, at::ones_like(f.total), f.total);
  f.q = c / f.safe;
  f.xl = depthwise_layout(x, s);
  Tensor pw;
  if (s.normalize != 0) {
    // Each depthwise kernel enters the merged one at unit RMS, its scale moving to the pointwise
    // side (forms.py: the sum then depends on P_i D_i only).
    f.st = statistics(Ps, Ds, s.normalize, eps);
    f.P = f.st->P;
    std::vector<Tensor> ms;
    for (const auto& D : Ds) ms.push_back((D * D).mean());
    f.rms = at::stack(ms).sqrt();
    for (int64_t i = 0; i < n; ++i) f.Dn.push_back(Ds[i] / f.rms[i]);
    f.scale = f.st->a * f.rms.unsqueeze(1);
    pw = ((c.unsqueeze(1) * f.scale).unsqueeze(2) * f.P).sum(0);
  } else {
    f.P = stack_pointwise(Ps);
    pw = (c.view({n, 1, 1}) * f.P).sum(0);
    f.Dn = Ds;
  }
  f.D = merge_kernels_op(f.Dn, f.q, s.lattice_dils, 0, eps);
  f.z = at::conv2d(f.xl, f.D, {}, two(s.stride), two(s.size / 2), two(s.dilation), x.size(1));
  Tensor kernel = pw;
  if (f.st) {
    f.z = at::cat({f.z, shift_channels(f.xl, pattern, s)}, 1);
    kernel = at::cat({pw, (c.unsqueeze(1) * f.st->b).t()}, 1);
  }
  f.kernel = kernel.unsqueeze(-1).unsqueeze(-1);
  return f;
}

Factored factored_build(const Tensor& x, const Tensor& c, at::TensorList tensors, const Tensor& pattern,
                        const Spec& s, double eps) {
  return s.form == 1 ? stacked_build(x, c, tensors, pattern, s, eps) : separable_build(x, c, tensors, pattern, s, eps);
}

std::tuple<Tensor, Tensor> pointwise_backward(const Tensor& grad, const Factored& f) {
  auto r = at::convolution_backward(grad, f.z, f.kernel, std::nullopt, {1, 1}, {0, 0}, {1, 1}, false, {0, 0}, 1,
                                    {true, true, false});
  return {std::get<0>(r), std::get<1>(r).flatten(1)};
}

// What both factored backwards start from: the group's conv input and 1x1 kernel rebuilt, the
// 1x1 conv's gradients, and the candidates' parameters split into depthwise and pointwise.
struct FactoredBackward {
  Factored f;
  Tensor gz, gk;
  std::vector<Tensor> Ds, Ps;
};

FactoredBackward factored_backward_start(const Tensor& grad, const Tensor& x, const Tensor& c, at::TensorList tensors,
                                         const Tensor& pattern, const Spec& s, double eps) {
  FactoredBackward b{factored_build(x, c, tensors, pattern, s, eps), {}, {}, {}, {}};
  std::tie(b.gz, b.gk) = pointwise_backward(grad, b.f);
  split(tensors, b.Ds, b.Ps);
  return b;
}

// [gD_0, gP_0, gD_1, gP_1, ...] in the parameters' shapes; each its own storage (an op's outputs
// may not alias each other).
void push_part_grads(std::vector<Tensor>& out, const std::vector<Tensor>& gDs, const Tensor& gP,
                     const std::vector<Tensor>& Ps) {
  for (size_t i = 0; i < gDs.size(); ++i) {
    out.push_back(gDs[i]);
    out.push_back(gP[i].clone(at::MemoryFormat::Contiguous).view(Ps[i].sizes()));
  }
}

std::vector<Tensor> stacked_backward(const Tensor& grad, const Tensor& x, const Tensor& c, at::TensorList tensors,
                                     const Tensor& pattern, const Spec& s, double eps, bool need_x) {
  auto [f, gz, gk, Ds, Ps] = factored_backward_start(grad, x, c, tensors, pattern, s, eps);
  const int64_t C = x.size(1), n = static_cast<int64_t>(Ds.size()), O = gk.size(0);
  Tensor gx;
  std::vector<Tensor> gDs;
  for (int64_t i = 0; i < n; ++i) {
    const Part& p = s.parts[i];
    auto r = at::convolution_backward(gz.slice(1, i * C, (i + 1) * C), f.xl, Ds[i], std::nullopt, two(p.stride),
                                      two(p.padding), two(p.dilation), false, {0, 0}, C, {need_x, true, false});
    if (need_x) gx = gx.defined() ? gx + std::get<0>(r) : std::get<0>(r);
    gDs.push_back(std::get<1>(r));
  }
  Tensor G = gk.slice(1, 0, n * C).view({O, n, C}).transpose(0, 1);  // [n, O, C]
  Tensor h = (G * f.P).sum(2);                                        // [n, O]
  Tensor gP, gc;
  if (s.normalize == 0) {
    gP = c.view({n, 1, 1}) * G;
    gc = h.sum(1);
  } else {
    const Stats& st = *f.st;
    Tensor gs = gk.slice(1, n * C).t();  // [n, O]
    gP = (c.unsqueeze(1) * st.a).unsqueeze(2) * G;
    gc = (st.a * h).sum(1) + (st.b * gs).sum(1);
    auto [sP, sD] = statistics_backward(st, c.unsqueeze(1) * h, c.unsqueeze(1) * gs, s.normalize, Ds);
    gP = gP + sP;
    for (int64_t i = 0; i < n; ++i) gDs[i] = gDs[i] + sD[i];
    if (need_x) gx = gx + shift_input_grad(gz.slice(1, n * C), x, pattern, s);
  }
  std::vector<Tensor> out{need_x ? gx : x.new_empty({0}), gc};
  push_part_grads(out, gDs, gP, Ps);
  return out;
}

std::vector<Tensor> separable_backward(const Tensor& grad, const Tensor& x, const Tensor& c, at::TensorList tensors,
                                       const Tensor& pattern, const Spec& s, double eps, bool need_x) {
  auto [f, gz, gk, Ds, Ps] = factored_backward_start(grad, x, c, tensors, pattern, s, eps);
  const int64_t C = x.size(1), n = static_cast<int64_t>(Ds.size());
  auto r = at::convolution_backward(gz.slice(1, 0, C), f.xl, f.D, std::nullopt, two(s.stride), two(s.size / 2),
                                    two(s.dilation), false, {0, 0}, C, {need_x, true, false});
  Tensor gx = std::get<0>(r);
  auto g = merge_kernels_backward_op(std::get<1>(r), f.Dn, f.q, s.lattice_dils, 0, eps);
  Tensor gq = g.back();
  Tensor gpw = gk.slice(1, 0, C);  // [O, C]
  Tensor gP, gc;
  std::vector<Tensor> gDs;
  if (s.normalize == 0) {
    gc = (gpw * f.P).sum({1, 2});
    gP = c.view({n, 1, 1}) * gpw;
    for (int64_t i = 0; i < n; ++i) gDs.push_back(g[i]);
  } else {
    const Stats& st = *f.st;
    Tensor gs = gk.slice(1, C).t();  // [n, O]
    Tensor h = (gpw * st.P).sum(2);  // [n, O]
    gP = (c.unsqueeze(1) * f.scale).unsqueeze(2) * gpw;
    gc = (f.scale * h).sum(1) + (st.b * gs).sum(1);
    Tensor gt = c.unsqueeze(1) * h;  // gradient of a_i r_i
    std::vector<Tensor> dots;
    for (int64_t i = 0; i < n; ++i) dots.push_back((g[i] * Ds[i]).sum());
    Tensor gr = (gt * st.a).sum(1) - at::stack(dots) / (f.rms * f.rms);  // D_i / r_i, r_i = sqrt(mean(D_i^2))
    auto [sP, sD] = statistics_backward(st, gt * f.rms.unsqueeze(1), c.unsqueeze(1) * gs, s.normalize, Ds);
    gP = gP + sP;
    for (int64_t i = 0; i < n; ++i) {
      const Tensor r_i = f.rms[i];
      gDs.push_back(g[i] / r_i + gr[i] * Ds[i] / (r_i * static_cast<double>(Ds[i].numel())) + sD[i]);
    }
    if (need_x) gx = gx + shift_input_grad(gz.slice(1, C), x, pattern, s);
  }
  // q = c / T (T = sum c, or 1 when it is 0)
  gc = gc + (gq - (gq * f.q).sum() * (f.total != 0)) / f.safe;
  std::vector<Tensor> out{need_x ? gx : x.new_empty({0}), gc};
  push_part_grads(out, gDs, gP, Ps);
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
  if (s.form == 1) return stacked_backward(grad, x, coefs, tensors, p, s, eps, need_x);
  return separable_backward(grad, x, coefs, tensors, p, s, eps, need_x);
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
