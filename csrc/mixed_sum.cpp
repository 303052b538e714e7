// Family 1 on the CPU: the weighted sum of K candidate outputs, its backward, and the masked
// softmax that produces the weights. Accumulation in at::opmath_type (float for half types,
// double for double). Reductions are split into fixed-size blocks whose partial sums are added
// in block order, so the result does not depend on the number of threads.
//
// Also toponas::mixed_sum_fused, the op the eager fast path of ops.mixed_sum calls on the
// compiled backends (a search step calls it once per edge): one dispatcher call whose autograd
// node is a C++ Function around the kernel ops, so neither forward nor backward runs Python.
// Its forward and backward reach toponas::mixed_sum_kernel and its backward through the
// dispatcher (CPU here, CUDA in cuda/mixed_sum.cu). Under torch.compile the package uses the
// Python custom op instead (ops/mixed.py); this op has a fake there too, so opcheck covers it.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "common.h"

namespace toponas {
namespace {

constexpr int64_t kTile = 256;          // elements accumulated together in registers/stack
constexpr int64_t kReduceBlock = 4096;  // fixed block of the deterministic reductions
// Below this many elements per thread, splitting costs more than it gains (and on a busy
// machine a parallel region can stall waiting for a core).
constexpr int64_t kGrain = 32768;

at::Tensor mixed_sum_cpu(at::TensorList outputs, const at::Tensor& weights) {
  check_candidates(outputs, weights);
  auto ys = contiguous_all(outputs);
  auto w = weights.contiguous();
  auto out = at::empty_like(ys[0], at::MemoryFormat::Contiguous);
  const int64_t n = out.numel();
  const int64_t num = static_cast<int64_t>(ys.size());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, out.scalar_type(), "mixed_sum_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    std::vector<const scalar_t*> ptrs(num);
    std::vector<acc_t> wv(num);
    for (int64_t k = 0; k < num; ++k) {
      ptrs[k] = ys[k].data_ptr<scalar_t>();
      wv[k] = static_cast<acc_t>(w.data_ptr<scalar_t>()[k]);
    }
    scalar_t* o = out.data_ptr<scalar_t>();
    at::parallel_for(0, n, kGrain, [&](int64_t begin, int64_t end) {
      acc_t acc[kTile];
      for (int64_t s = begin; s < end; s += kTile) {
        const int64_t len = std::min(kTile, end - s);
        std::fill(acc, acc + len, acc_t(0));
        for (int64_t k = 0; k < num; ++k) {
          const scalar_t* y = ptrs[k] + s;
          const acc_t wk = wv[k];
          for (int64_t i = 0; i < len; ++i) acc[i] += wk * static_cast<acc_t>(y[i]);
        }
        for (int64_t i = 0; i < len; ++i) o[s + i] = static_cast<scalar_t>(acc[i]);
      }
    });
  });
  return out;
}

std::vector<at::Tensor> mixed_sum_backward_cpu(const at::Tensor& grad, at::TensorList outputs,
                                               const at::Tensor& weights) {
  check_candidates(outputs, weights);
  check_grad_like(grad, outputs[0], "outputs[0]");
  auto g = grad.contiguous();
  auto ys = contiguous_all(outputs);
  auto w = weights.contiguous();
  const int64_t n = g.numel();
  const int64_t num = static_cast<int64_t>(ys.size());
  std::vector<at::Tensor> result;
  for (int64_t k = 0; k < num; ++k) result.push_back(at::empty_like(ys[k], at::MemoryFormat::Contiguous));
  auto grad_w = at::empty_like(w);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, g.scalar_type(), "mixed_sum_backward_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const int64_t nblocks = std::max<int64_t>(1, (n + kReduceBlock - 1) / kReduceBlock);
    std::vector<acc_t> parts(num * nblocks, acc_t(0));
    const scalar_t* gp = g.data_ptr<scalar_t>();
    at::parallel_for(0, nblocks, kGrain / kReduceBlock, [&](int64_t b0, int64_t b1) {
      for (int64_t b = b0; b < b1; ++b) {
        const int64_t s = b * kReduceBlock, e = std::min(n, s + kReduceBlock);
        for (int64_t k = 0; k < num; ++k) {
          const acc_t wk = static_cast<acc_t>(w.data_ptr<scalar_t>()[k]);
          const scalar_t* y = ys[k].data_ptr<scalar_t>();
          scalar_t* gy = result[k].data_ptr<scalar_t>();
          acc_t dot = 0;
          for (int64_t i = s; i < e; ++i) {
            const acc_t gi = static_cast<acc_t>(gp[i]);
            gy[i] = static_cast<scalar_t>(wk * gi);
            dot += gi * static_cast<acc_t>(y[i]);
          }
          parts[k * nblocks + b] = dot;
        }
      }
    });
    scalar_t* gw = grad_w.data_ptr<scalar_t>();
    for (int64_t k = 0; k < num; ++k) {
      acc_t total = 0;
      for (int64_t b = 0; b < nblocks; ++b) total += parts[k * nblocks + b];
      gw[k] = static_cast<scalar_t>(total);
    }
  });
  result.push_back(grad_w);
  return result;
}

at::Tensor masked_softmax_cpu(const at::Tensor& logits, const at::Tensor& mask, double tau) {
  check_softmax_args(logits, mask, tau);
  auto x = logits.contiguous();
  auto m = mask.contiguous();
  auto p = at::empty_like(x, at::MemoryFormat::Contiguous);
  const int64_t K = x.size(-1), rows = x.numel() / K;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "masked_softmax_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* xp = x.data_ptr<scalar_t>();
    const bool* mp = m.data_ptr<bool>();
    scalar_t* pp = p.data_ptr<scalar_t>();
    const acc_t inv_tau = static_cast<acc_t>(1.0 / tau);
    at::parallel_for(0, rows, 64, [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) {
        const scalar_t* xr = xp + r * K;
        const bool* mr = mp + r * K;
        scalar_t* pr = pp + r * K;
        acc_t mx = -std::numeric_limits<acc_t>::infinity();
        for (int64_t k = 0; k < K; ++k)
          if (mr[k]) mx = std::max(mx, static_cast<acc_t>(xr[k]) * inv_tau);
        acc_t sum = 0;
        for (int64_t k = 0; k < K; ++k)
          if (mr[k]) sum += std::exp(static_cast<acc_t>(xr[k]) * inv_tau - mx);
        for (int64_t k = 0; k < K; ++k)
          pr[k] = mr[k] ? static_cast<scalar_t>(std::exp(static_cast<acc_t>(xr[k]) * inv_tau - mx) / sum)
                        : static_cast<scalar_t>(0);
      }
    });
  });
  return p;
}

at::Tensor masked_softmax_backward_cpu(const at::Tensor& grad, const at::Tensor& probs, double tau) {
  check_grad_like(grad, probs, "probs");
  auto g = grad.contiguous();
  auto p = probs.contiguous();
  auto gx = at::empty_like(p, at::MemoryFormat::Contiguous);
  const int64_t K = p.size(-1), rows = K == 0 ? 0 : p.numel() / K;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, p.scalar_type(), "masked_softmax_backward_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* gp = g.data_ptr<scalar_t>();
    const scalar_t* pp = p.data_ptr<scalar_t>();
    scalar_t* op = gx.data_ptr<scalar_t>();
    const acc_t inv_tau = static_cast<acc_t>(1.0 / tau);
    at::parallel_for(0, rows, 64, [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) {
        acc_t dot = 0;
        for (int64_t k = 0; k < K; ++k)
          dot += static_cast<acc_t>(gp[r * K + k]) * static_cast<acc_t>(pp[r * K + k]);
        for (int64_t k = 0; k < K; ++k) {
          const acc_t pk = static_cast<acc_t>(pp[r * K + k]);
          op[r * K + k] = static_cast<scalar_t>(pk * (static_cast<acc_t>(gp[r * K + k]) - dot) * inv_tau);
        }
      }
    });
  });
  return gx;
}

// ------------------------------------------------------------------------------- fused op
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
  // then the weights. Differentiable once, like the custom op.
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
  m.def("mixed_sum_kernel(Tensor[] outputs, Tensor weights) -> Tensor");
  m.def("mixed_sum_backward_kernel(Tensor grad, Tensor[] outputs, Tensor weights) -> Tensor[]");
  m.def("masked_softmax_kernel(Tensor logits, Tensor mask, float tau) -> Tensor");
  m.def("masked_softmax_backward_kernel(Tensor grad, Tensor probs, float tau) -> Tensor");
  m.def("mixed_sum_fused(Tensor[] outputs, Tensor weights) -> Tensor");
}

TORCH_LIBRARY_IMPL(toponas, CPU, m) {
  m.impl("mixed_sum_kernel", &mixed_sum_cpu);
  m.impl("mixed_sum_backward_kernel", &mixed_sum_backward_cpu);
  m.impl("masked_softmax_kernel", &masked_softmax_cpu);
  m.impl("masked_softmax_backward_kernel", &masked_softmax_backward_cpu);
}

// Below autograd (inference mode, or tensors without autograd) the fused op is the kernel op.
TORCH_LIBRARY_IMPL(toponas, CompositeExplicitAutograd, m) { m.impl("mixed_sum_fused", &mixed_sum_kernel); }

TORCH_LIBRARY_IMPL(toponas, Autograd, m) { m.impl("mixed_sum_fused", &mixed_sum_fused_autograd); }

}  // namespace toponas
