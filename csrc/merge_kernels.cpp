// Family 2 on the CPU: normalize K candidate conv kernels and merge them into one (docs/DESIGN.md
// sections 5, 6 and 9), and the backward to every candidate and to the weights. The math and
// the meaning of every statistic are in toponas_kernels/ops/merge.py.
//
// Every statistic is computed per (candidate, output channel) first: mean_c, the centred sum of
// squares M2_c and, in the backward, sum G and sum G (x - mean_c), G the merged gradient at the
// candidate's taps. "tensor" mode combines those rows over the channels in channel order
// (Chan's formula), so results do not depend on the number of threads. Accumulation in
// at::opmath_type (float for half types, double for double).
//
// Schemas of both kernel ops are declared here, once; csrc/cuda/merge_kernels.cu registers the
// CUDA implementations.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "common.h"
#include "merge_kernels.h"

namespace toponas {

MergeGeometry check_merge_args(at::TensorList kernels, const at::Tensor& weights,
                               at::IntArrayRef dilations, int64_t normalize, double eps) {
  TORCH_CHECK(!kernels.empty(), "kernels is empty: at least one candidate (K >= 1) is needed");
  const int64_t K = static_cast<int64_t>(kernels.size());
  MergeGeometry geo;
  for (int64_t j = 0; j < K; ++j) {
    const auto& k = kernels[j];
    TORCH_CHECK(k.dim() == 4, "kernels[", j, "] must be 4-D [O, I, k, k], got shape ", k.sizes());
    TORCH_CHECK(k.size(2) == k.size(3), "kernels[", j, "] must be square, got shape ", k.sizes());
    TORCH_CHECK(k.size(3) % 2 == 1, "kernels[", j, "]: unsupported kernel size ", k.size(3), ": must be odd");
    check_same_like(k, kernels[0], "kernels[j]");
    TORCH_CHECK(k.size(0) == kernels[0].size(0) && k.size(1) == kernels[0].size(1), "kernels[", j,
                "] has shape ", k.sizes(), " but kernels[0] has ", kernels[0].sizes(),
                "; O and I must agree");
  }
  TORCH_CHECK(weights.dim() == 1 && weights.size(0) == K, "weights must have shape [", K, "], got ",
              weights.sizes());
  check_same_like(weights, kernels[0], "weights");
  TORCH_CHECK(static_cast<int64_t>(dilations.size()) == K, "dilations has ", dilations.size(),
              " entries but there are ", K, " kernels");
  TORCH_CHECK(normalize >= 0 && normalize <= 2, "normalize must be 0 (none), 1 (channel) or 2 (tensor), got ",
              normalize);
  TORCH_CHECK(normalize == 0 || (eps > 0 && std::isfinite(eps)), "eps must be > 0 when normalizing, got ", eps);
  geo.O = kernels[0].size(0);
  geo.I = kernels[0].size(1);
  geo.kmax = 1;
  for (int64_t j = 0; j < K; ++j) {
    TORCH_CHECK(dilations[j] >= 1, "dilations[", j, "] must be >= 1, got ", dilations[j]);
    geo.kmax = std::max(geo.kmax, (kernels[j].size(3) - 1) * dilations[j] + 1);
  }
  for (int64_t j = 0; j < K; ++j) {
    const int64_t k = kernels[j].size(3), span = (k - 1) * dilations[j] + 1;
    geo.ks.push_back(k);
    geo.max_ks = std::max(geo.max_ks, k);
    geo.dil.push_back(dilations[j]);
    geo.start.push_back((geo.kmax - span) / 2);
  }
  return geo;
}

void check_merge_grad(const at::Tensor& grad, const at::Tensor& like, const MergeGeometry& geo) {
  check_same_like(grad, like, "grad");
  TORCH_CHECK(grad.sizes() == at::IntArrayRef({geo.O, geo.I, geo.kmax, geo.kmax}), "grad has shape ",
              grad.sizes(), " but the merged kernel is [", geo.O, ", ", geo.I, ", ", geo.kmax, ", ",
              geo.kmax, "]");
}

namespace {

// Work items are (candidate, channel) or channel slabs of a few hundred elements: threads are
// only worth starting for a few tens of thousands of elements (an OpenMP region over tiny
// kernels costs more than the work, and much more on a busy machine).
constexpr int64_t kGrainElems = 1 << 15;

int64_t grain_for(int64_t elems_per_item) {
  return std::max<int64_t>(1, kGrainElems / std::max<int64_t>(1, elems_per_item));
}

// Per (candidate j, channel o): mean_c, M2_c, sum G, sum G (x - mean_c) (the last two only with
// a gradient). In mode 0 nothing is centred: mean_c = 0 and M2_c is not computed.
template <typename scalar_t, typename acc_t>
void channel_rows(const std::vector<at::Tensor>& xs, const scalar_t* g, const MergeGeometry& geo,
                  int64_t mode, std::vector<acc_t>& rows) {
  const int64_t K = static_cast<int64_t>(xs.size()), O = geo.O, I = geo.I, km = geo.kmax;
  rows.assign(K * O * 4, acc_t(0));
  at::parallel_for(0, K * O, grain_for(I * geo.max_ks * geo.max_ks), [&](int64_t b, int64_t e) {
    for (int64_t jo = b; jo < e; ++jo) {
      const int64_t j = jo / O, o = jo % O, ks = geo.ks[j], d = geo.dil[j], st = geo.start[j];
      const int64_t n = I * ks * ks;
      const scalar_t* x = xs[j].data_ptr<scalar_t>() + o * n;
      acc_t mean = 0, m2 = 0, sg = 0, sgx = 0;
      if (mode != 0) {
        for (int64_t t = 0; t < n; ++t) mean += static_cast<acc_t>(x[t]);
        mean /= static_cast<acc_t>(n);
      }
      for (int64_t i = 0; i < I; ++i)
        for (int64_t a = 0; a < ks; ++a)
          for (int64_t c = 0; c < ks; ++c) {
            const acc_t dx = static_cast<acc_t>(x[(i * ks + a) * ks + c]) - mean;
            m2 += dx * dx;
            if (g != nullptr) {
              const acc_t gv = static_cast<acc_t>(g[((o * I + i) * km + st + a * d) * km + st + c * d]);
              sg += gv;
              sgx += gv * dx;
            }
          }
      acc_t* row = rows.data() + jo * 4;
      row[0] = mean;
      row[1] = m2;
      row[2] = sg;
      row[3] = sgx;
    }
  });
}

// What the forward and backward need per (candidate, channel), with the statistics of the group
// it belongs to (its channel, or the whole candidate).
template <typename acc_t>
struct Norm {
  acc_t mean = 0;  // subtracted before scaling
  acc_t std = 0;
  acc_t inv = 1;   // 1 / (std + eps), or 1 in mode 0
  acc_t cnt = 1;   // elements the statistics run over
  acc_t sg = 0;    // group sum of G
  acc_t sgx = 0;   // group sum of G (x - mean)
  acc_t part = 0;  // this channel's share of <G, K_hat>
};

template <typename acc_t>
std::vector<Norm<acc_t>> group_norms(const std::vector<acc_t>& rows, const MergeGeometry& geo,
                                     int64_t K, int64_t mode, double eps) {
  const int64_t O = geo.O;
  std::vector<Norm<acc_t>> out(K * O);
  for (int64_t j = 0; j < K; ++j) {
    const acc_t n_c = static_cast<acc_t>(geo.I * geo.ks[j] * geo.ks[j]);
    const acc_t* r = rows.data() + j * O * 4;
    if (mode == 2) {
      // Chan's formula over the channels, in channel order.
      acc_t mean = 0, m2 = 0, sg = 0, sgx = 0;
      for (int64_t o = 0; o < O; ++o) mean += r[o * 4];
      mean /= static_cast<acc_t>(O);
      for (int64_t o = 0; o < O; ++o) {
        const acc_t dm = r[o * 4] - mean;
        m2 += r[o * 4 + 1] + n_c * dm * dm;
        sg += r[o * 4 + 2];
        sgx += r[o * 4 + 3] + dm * r[o * 4 + 2];
      }
      const acc_t cnt = n_c * static_cast<acc_t>(O);
      const acc_t sd = std::sqrt(m2 / cnt);
      const acc_t inv = acc_t(1) / (sd + static_cast<acc_t>(eps));
      for (int64_t o = 0; o < O; ++o) {
        const acc_t dm = r[o * 4] - mean;
        out[j * O + o] = Norm<acc_t>{mean, sd, inv, cnt, sg, sgx, (r[o * 4 + 3] + dm * r[o * 4 + 2]) * inv};
      }
    } else {
      for (int64_t o = 0; o < O; ++o) {
        Norm<acc_t> nm;
        nm.mean = r[o * 4];
        nm.cnt = n_c;
        nm.sg = r[o * 4 + 2];
        nm.sgx = r[o * 4 + 3];
        if (mode == 1) {
          nm.std = std::sqrt(r[o * 4 + 1] / n_c);
          nm.inv = acc_t(1) / (nm.std + static_cast<acc_t>(eps));
        }
        nm.part = nm.sgx * nm.inv;
        out[j * O + o] = nm;
      }
    }
  }
  return out;
}

at::Tensor merge_kernels_cpu(at::TensorList kernels, const at::Tensor& weights, at::IntArrayRef dilations,
                             int64_t normalize, double eps) {
  const MergeGeometry geo = check_merge_args(kernels, weights, dilations, normalize, eps);
  auto xs = contiguous_all(kernels);
  auto w = weights.contiguous();
  const int64_t K = static_cast<int64_t>(xs.size()), O = geo.O, I = geo.I, km = geo.kmax;
  auto out = at::empty({O, I, km, km}, xs[0].options());
  if (out.numel() == 0) return out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, out.scalar_type(), "merge_kernels_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    std::vector<acc_t> rows;
    channel_rows<scalar_t, acc_t>(xs, nullptr, geo, normalize, rows);
    const auto norms = group_norms<acc_t>(rows, geo, K, normalize, eps);
    std::vector<acc_t> wv(K);
    for (int64_t j = 0; j < K; ++j) wv[j] = static_cast<acc_t>(w.data_ptr<scalar_t>()[j]);
    scalar_t* op = out.data_ptr<scalar_t>();
    const int64_t n_out = I * km * km;
    at::parallel_for(0, O, grain_for(K * n_out), [&](int64_t b, int64_t e) {
      std::vector<acc_t> acc(n_out);
      for (int64_t o = b; o < e; ++o) {
        std::fill(acc.begin(), acc.end(), acc_t(0));
        for (int64_t j = 0; j < K; ++j) {
          const int64_t ks = geo.ks[j], d = geo.dil[j], st = geo.start[j];
          const scalar_t* x = xs[j].data_ptr<scalar_t>() + o * I * ks * ks;
          const Norm<acc_t>& nm = norms[j * O + o];
          const acc_t coef = wv[j] * nm.inv;
          for (int64_t i = 0; i < I; ++i)
            for (int64_t a = 0; a < ks; ++a)
              for (int64_t c = 0; c < ks; ++c)
                acc[(i * km + st + a * d) * km + st + c * d] +=
                    (static_cast<acc_t>(x[(i * ks + a) * ks + c]) - nm.mean) * coef;
        }
        for (int64_t t = 0; t < n_out; ++t) op[o * n_out + t] = static_cast<scalar_t>(acc[t]);
      }
    });
  });
  return out;
}

std::vector<at::Tensor> merge_kernels_backward_cpu(const at::Tensor& grad, at::TensorList kernels,
                                                   const at::Tensor& weights, at::IntArrayRef dilations,
                                                   int64_t normalize, double eps) {
  const MergeGeometry geo = check_merge_args(kernels, weights, dilations, normalize, eps);
  check_merge_grad(grad, kernels[0], geo);
  auto g = grad.contiguous();
  auto xs = contiguous_all(kernels);
  auto w = weights.contiguous();
  const int64_t K = static_cast<int64_t>(xs.size()), O = geo.O, I = geo.I, km = geo.kmax;
  std::vector<at::Tensor> result;
  for (const auto& x : xs) result.push_back(at::empty_like(x, at::MemoryFormat::Contiguous));
  auto grad_w = at::empty_like(w);
  if (g.numel() == 0) {
    for (auto& r : result) r.zero_();
    result.push_back(grad_w.zero_());
    return result;
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, g.scalar_type(), "merge_kernels_backward_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* gp = g.data_ptr<scalar_t>();
    std::vector<acc_t> rows;
    channel_rows<scalar_t, acc_t>(xs, gp, geo, normalize, rows);
    const auto norms = group_norms<acc_t>(rows, geo, K, normalize, eps);
    at::parallel_for(0, K * O, grain_for(I * geo.max_ks * geo.max_ks), [&](int64_t b, int64_t e) {
      for (int64_t jo = b; jo < e; ++jo) {
        const int64_t j = jo / O, o = jo % O, ks = geo.ks[j], d = geo.dil[j], st = geo.start[j];
        const int64_t n = I * ks * ks;
        const acc_t wj = static_cast<acc_t>(w.data_ptr<scalar_t>()[j]);
        const Norm<acc_t>& nm = norms[jo];
        acc_t c1 = 0, c2 = 0;
        if (normalize != 0) {
          c1 = nm.sg / nm.cnt;
          // d std / d x = (x - mean) / (cnt std): undefined at std == 0, taken as 0 there.
          c2 = nm.std > 0 ? nm.sgx * nm.inv * nm.inv / (nm.cnt * nm.std) : acc_t(0);
        }
        const scalar_t* x = xs[j].data_ptr<scalar_t>() + o * n;
        scalar_t* dx = result[j].data_ptr<scalar_t>() + o * n;
        for (int64_t i = 0; i < I; ++i)
          for (int64_t a = 0; a < ks; ++a)
            for (int64_t c = 0; c < ks; ++c) {
              const int64_t t = (i * ks + a) * ks + c;
              const acc_t gv = static_cast<acc_t>(gp[((o * I + i) * km + st + a * d) * km + st + c * d]);
              const acc_t xc = static_cast<acc_t>(x[t]) - nm.mean;
              dx[t] = static_cast<scalar_t>(wj * ((gv - c1) * nm.inv - c2 * xc));
            }
      }
    });
    scalar_t* gw = grad_w.data_ptr<scalar_t>();
    for (int64_t j = 0; j < K; ++j) {
      acc_t total = 0;
      for (int64_t o = 0; o < O; ++o) total += norms[j * O + o].part;
      gw[j] = static_cast<scalar_t>(total);
    }
  });
  result.push_back(grad_w);
  return result;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(toponas, m) {
  m.def("merge_kernels_kernel(Tensor[] kernels, Tensor weights, int[] dilations, int normalize, float eps) -> Tensor");
  m.def(
      "merge_kernels_backward_kernel(Tensor grad, Tensor[] kernels, Tensor weights, int[] dilations, "
      "int normalize, float eps) -> Tensor[]");
}

TORCH_LIBRARY_IMPL(toponas, CPU, m) {
  m.impl("merge_kernels_kernel", &merge_kernels_cpu);
  m.impl("merge_kernels_backward_kernel", &merge_kernels_backward_cpu);
}

}  // namespace toponas
