// Family 2c: the parameter-free tails of a TopoNAS edge (toponas_kernels/nas/mixed_op.py,
// ``_recomputed_sum``) as one op: out = sum_k w_k * tail_k(x_k), each tail an optional 3x3-style
// pooling (max, or average without the padding) then an optional non-affine BatchNorm. Forward
// runs the tails as the modules would (the BNs' running statistics advance once, here) and keeps
// only the weights and the inputs; backward runs the tails again (batch statistics, nothing
// advanced) and takes their backward: the pool's, the BN's and the weighted sum's. So the
// recomputed tails cost one dispatcher call each way, and no Python runs in their backward.
//
// spec (ints), per tail: pool (0 none, 1 max, 2 average), kernel, stride, padding,
// bn (0 none, 1 batch statistics only, 2 with running statistics: the next entry of
// running_means / running_vars / counters), channels_last (pool and BN channels-last, as the
// modules run on a CPU; the output is contiguous). floats, per tail: the BN's momentum and eps.
// The bodies compose ATen ops and toponas::mixed_sum_kernel, so they serve every device.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/library.h>

#include <tuple>
#include <vector>

namespace toponas {
namespace {

using at::Tensor;

struct Tail {
  int64_t pool, kernel, stride, padding, bn, channels_last;
  double momentum, eps;
};

std::vector<Tail> parse_tails(at::IntArrayRef spec, at::ArrayRef<double> floats, size_t n) {
  TORCH_CHECK(spec.size() == 6 * n && floats.size() == 2 * n,
              "light_sum: spec must hold 6 ints and floats 2 per input (", n, " inputs), got ", spec.size(), " and ",
              floats.size());
  std::vector<Tail> tails;
  for (size_t i = 0; i < n; ++i) {
    const int64_t* s = spec.data() + 6 * i;
    TORCH_CHECK(s[0] >= 0 && s[0] <= 2 && s[4] >= 0 && s[4] <= 2 && s[1] >= 1 && s[2] >= 1 && s[3] >= 0 &&
                    2 * s[3] <= s[1],
                "light_sum: bad spec for input ", i, " (pool, kernel, stride, padding, bn, channels_last)");
    tails.push_back({s[0], s[1], s[2], s[3], s[4], s[5], floats[2 * i], floats[2 * i + 1]});
  }
  return tails;
}

Tensor mixed_sum(at::TensorList ys, const Tensor& w) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("toponas::mixed_sum_kernel", "")
                             .typed<Tensor(at::TensorList, const Tensor&)>();
  return op.call(ys, w);
}

std::vector<Tensor> mixed_sum_backward(const Tensor& grad, at::TensorList ys, const Tensor& w) {
  static const auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("toponas::mixed_sum_backward_kernel", "")
          .typed<std::vector<Tensor>(const Tensor&, at::TensorList, const Tensor&)>();
  return op.call(grad, ys, w);
}

// The layout a tail's pool and BN run in.
Tensor layout_in(const Tensor& t, const Tail& tail) {
  return tail.channels_last ? t.contiguous(at::MemoryFormat::ChannelsLast) : t;
}

// layout_in of every input, converting a tensor that several tails read (an edge's max and
// average pools share their input) once.
std::vector<Tensor> layouts_in(at::TensorList inputs, const std::vector<Tail>& tails) {
  std::vector<Tensor> out(inputs.size());
  for (size_t i = 0; i < inputs.size(); ++i) {
    for (size_t j = 0; j < i && !out[i].defined(); ++j)
      if (inputs[j].is_same(inputs[i]) && tails[j].channels_last == tails[i].channels_last) out[i] = out[j];
    if (!out[i].defined()) out[i] = layout_in(inputs[i], tails[i]);
  }
  return out;
}

Tensor layout_out(const Tensor& t, const Tail& tail) { return tail.channels_last ? t.contiguous() : t; }

// A non-affine BN straight through native_batch_norm: what at::batch_norm ends in on every
// backend here (it would add two dispatcher calls per BN to pick it).
Tensor batch_norm(const Tensor& y, const Tensor& running_mean, const Tensor& running_var, bool training,
                  double momentum, double eps) {
  return std::get<0>(at::native_batch_norm(y, {}, {}, running_mean, running_var, training, momentum, eps));
}

Tensor pool_forward(const Tensor& x, const Tail& t) {
  const int64_t k = t.kernel, s = t.stride, p = t.padding;
  if (t.pool == 1) return at::max_pool2d(x, {k, k}, {s, s}, {p, p});
  return at::avg_pool2d(x, {k, k}, {s, s}, {p, p}, false, /*count_include_pad=*/false);
}

Tensor light_sum_kernel(const Tensor& weights, at::TensorList inputs, at::TensorList running_means,
                        at::TensorList running_vars, at::TensorList counters, at::IntArrayRef spec,
                        at::ArrayRef<double> floats, bool training) {
  TORCH_CHECK(!inputs.empty() && weights.dim() == 1 && weights.size(0) == static_cast<int64_t>(inputs.size()),
              "light_sum: one weight per input");
  const auto tails = parse_tails(spec, floats, inputs.size());
  const std::vector<Tensor> xs = layouts_in(inputs, tails);
  std::vector<Tensor> ys;
  size_t next = 0;
  for (size_t i = 0; i < inputs.size(); ++i) {
    const Tail& t = tails[i];
    Tensor y = t.pool ? pool_forward(xs[i], t) : xs[i];
    if (t.bn == 1) {
      y = batch_norm(y, {}, {}, true, t.momentum, t.eps);
    } else if (t.bn == 2) {
      TORCH_CHECK(next < running_means.size() && next < running_vars.size() && next < counters.size(),
                  "light_sum: fewer running statistics than BNs that keep them");
      if (training) counters[next].add_(1);  // as BatchNorm2d.forward counts its batches
      y = batch_norm(y, running_means[next], running_vars[next], training, t.momentum, t.eps);
      ++next;
    }
    ys.push_back(layout_out(y, t));
  }
  return mixed_sum(ys, weights);
}

// [grad of each input, grad of the weights]. Nothing advances: batch statistics in training, the
// running ones (as they were in forward) otherwise.
std::vector<Tensor> light_sum_backward_kernel(const Tensor& grad, const Tensor& weights, at::TensorList inputs,
                                              at::TensorList running_means, at::TensorList running_vars,
                                              at::IntArrayRef spec, at::ArrayRef<double> floats, bool training) {
  const auto tails = parse_tails(spec, floats, inputs.size());
  const size_t n = inputs.size();
  const std::vector<Tensor> xs = layouts_in(inputs, tails);
  std::vector<Tensor> zs(n), idx(n), mean(n), invstd(n), ys(n);
  std::vector<int64_t> stat(n, -1);
  int64_t next = 0;
  for (size_t i = 0; i < n; ++i) {
    const Tail& t = tails[i];
    const int64_t k = t.kernel, s = t.stride, p = t.padding;
    if (t.pool == 1) {
      std::tie(zs[i], idx[i]) = at::max_pool2d_with_indices(xs[i], {k, k}, {s, s}, {p, p});
    } else if (t.pool == 2) {
      zs[i] = pool_forward(xs[i], t);
    } else {
      zs[i] = xs[i];
    }
    Tensor y = zs[i];
    if (t.bn == 2) stat[i] = next++;
    if (t.bn == 1 || (t.bn == 2 && training)) {
      std::tie(y, mean[i], invstd[i]) = at::native_batch_norm(zs[i], {}, {}, {}, {}, true, 0.0, t.eps);
    } else if (t.bn == 2) {
      y = batch_norm(zs[i], running_means[stat[i]], running_vars[stat[i]], false, 0.0, t.eps);
    }
    ys[i] = layout_out(y, t);
  }
  std::vector<Tensor> g = mixed_sum_backward(grad, ys, weights);  // [grad of each tail's output, grad of w]
  std::vector<Tensor> out;
  for (size_t i = 0; i < n; ++i) {
    const Tail& t = tails[i];
    const int64_t k = t.kernel, s = t.stride, p = t.padding;
    Tensor gz = layout_in(g[i], t);
    if (t.bn == 1 || (t.bn == 2 && training)) {
      gz = std::get<0>(at::native_batch_norm_backward(gz, zs[i], {}, {}, {}, mean[i], invstd[i], true, t.eps,
                                                      {true, false, false}));
    } else if (t.bn == 2) {
      gz = std::get<0>(at::native_batch_norm_backward(gz, zs[i], {}, running_means[stat[i]], running_vars[stat[i]],
                                                      {}, {}, false, t.eps, {true, false, false}));
    }
    Tensor gx = gz;
    if (t.pool == 1) {
      gx = at::max_pool2d_with_indices_backward(gz, xs[i], {k, k}, {s, s}, {p, p}, {1, 1}, false, idx[i]);
    } else if (t.pool == 2) {
      gx = at::avg_pool2d_backward(gz, xs[i], {k, k}, {s, s}, {p, p}, false, false, std::nullopt);
    }
    // gx is a fresh tensor (a pool's, a BN's or mixed_sum's backward made it), so no output aliases
    // another or an input; contiguous copies only where it is not already.
    out.push_back(layout_out(gx, t).contiguous());
  }
  out.push_back(g.back());
  return out;
}

class LightSumFunction : public torch::autograd::Function<LightSumFunction> {
 public:
  static Tensor forward(torch::autograd::AutogradContext* ctx, const Tensor& weights, at::TensorList inputs,
                        at::TensorList running_means, at::TensorList running_vars, at::TensorList counters,
                        at::IntArrayRef spec, at::ArrayRef<double> floats, bool training) {
    std::vector<Tensor> saved{weights};
    saved.insert(saved.end(), inputs.begin(), inputs.end());
    ctx->save_for_backward(saved);
    ctx->saved_data["spec"] = spec.vec();
    ctx->saved_data["floats"] = floats.vec();
    ctx->saved_data["training"] = training;
    ctx->saved_data["buffers"] = static_cast<int64_t>(running_means.size() + running_vars.size() + counters.size());
    if (!training) {  // read again in backward; in training they advance here and are not needed
      ctx->saved_data["running_means"] = running_means.vec();
      ctx->saved_data["running_vars"] = running_vars.vec();
    }
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    return light_sum_kernel(weights, inputs, running_means, running_vars, counters, spec, floats, training);
  }

  // One gradient per forward input: the weights, each input, each running statistic and counter
  // (none), then spec, floats and training.
  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    std::vector<Tensor> saved = ctx->get_saved_variables();
    const Tensor weights = saved[0];
    std::vector<Tensor> inputs(saved.begin() + 1, saved.end());
    const bool training = ctx->saved_data["training"].toBool();
    std::vector<Tensor> means, vars;
    if (!training) {
      means = ctx->saved_data["running_means"].toTensorVector();
      vars = ctx->saved_data["running_vars"].toTensorVector();
    }
    const std::vector<int64_t> spec = ctx->saved_data["spec"].toIntVector();
    const std::vector<double> floats = ctx->saved_data["floats"].toDoubleVector();
    static const auto op = c10::Dispatcher::singleton()
                               .findSchemaOrThrow("toponas::light_sum_backward_kernel", "")
                               .typed<std::vector<Tensor>(const Tensor&, const Tensor&, at::TensorList, at::TensorList,
                                                          at::TensorList, at::IntArrayRef, at::ArrayRef<double>,
                                                          bool)>();
    std::vector<Tensor> g;
    {
      at::AutoDispatchBelowADInplaceOrView below_autograd;
      g = op.call(grads[0], weights, inputs, means, vars, spec, floats, training);
    }
    const size_t n = inputs.size();
    torch::autograd::variable_list out{g[n]};
    out.insert(out.end(), g.begin(), g.begin() + n);
    out.resize(out.size() + ctx->saved_data["buffers"].toInt() + 3);  // no gradient for the rest
    return out;
  }
};

Tensor light_sum_fused_autograd(const Tensor& weights, at::TensorList inputs, at::TensorList running_means,
                                at::TensorList running_vars, at::TensorList counters, at::IntArrayRef spec,
                                at::ArrayRef<double> floats, bool training) {
  return LightSumFunction::apply(weights, inputs, running_means, running_vars, counters, spec, floats, training);
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(toponas, m) {
  m.def(
      "light_sum_fused(Tensor weights, Tensor[] inputs, Tensor(a!)[] running_means, Tensor(b!)[] running_vars, "
      "Tensor(c!)[] counters, int[] spec, float[] floats, bool training) -> Tensor");
  m.def(
      "light_sum_backward_kernel(Tensor grad, Tensor weights, Tensor[] inputs, Tensor[] running_means, "
      "Tensor[] running_vars, int[] spec, float[] floats, bool training) -> Tensor[]");
}

// ATen ops and the mixed-sum kernels, on whatever device the tensors are on.
TORCH_LIBRARY_IMPL(toponas, CompositeExplicitAutograd, m) {
  m.impl("light_sum_fused", &light_sum_kernel);
  m.impl("light_sum_backward_kernel", &light_sum_backward_kernel);
}

TORCH_LIBRARY_IMPL(toponas, Autograd, m) { m.impl("light_sum_fused", &light_sum_fused_autograd); }

}  // namespace toponas
