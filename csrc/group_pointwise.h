// Family 2d: the small-tensor work of a factored merged group (toponas_kernels/nas/forms.py,
// stacked and separable forms) in one launch each way: the candidates' kernel-normalization
// statistics, the rescaling, the shift channels' column and the coefficients, turned into the
// group's 1x1 kernel (and, for the separable form, the weights that merge its depthwise kernels);
// backward the chain rule through all of it. Before, these were about a hundred small ATen ops
// per group in forward and two hundred in backward (each a kernel launch on a GPU).
//
// The math is written once, here, as "phases": each a function of one index, run over all its
// indices, a phase reading only what earlier phases wrote. The CPU runs a phase as a loop
// (csrc/group_pointwise.cpp); the CUDA kernel as one block's threads striding over the indices, with
// a barrier between phases (csrc/cuda/group_pointwise.cu). So both backends run the same arithmetic,
// in the same order per value, and the CPU tests check the code the GPU runs.
//
// Shapes: n parts; part i has a depthwise kernel D_i [C, T_i] (T_i taps) and a pointwise kernel
// P_i [O, C]; coefficients c [n]. normalize: 0 none, 1 per output channel, 2 per tensor. With m1,
// v the mean and variance of D's taps per channel and u[o, c] = P[o, c] m1[c]:
//   mean_o = mean_c u,   var_o = mean_c (u - mean_o)^2 + mean_c P^2 v,   a = 1 / (std + eps),
//   b = -mean a   (both variance terms sums of squares of centred values: no cancellation in
//   float32). Per tensor: mean = mean_o mean_o, var = mean_o (var_o + (mean_o - mean)^2).
// stacked:   kernel[o, i C + c] = c_i a_i[o] P_i[o, c],            kernel[o, n C + i] = c_i b_i[o]
// separable: kernel[o, c] = sum_i c_i a_i[o] r_i P_i[o, c],         kernel[o, C + i]   = c_i b_i[o]
//            dw_i = q_i / r_i (q = c / sum c, or c when the sum is 0; r_i = RMS of D_i's taps):
//            the merged depthwise kernel is sum_i dw_i D_i, i.e. each D_i at unit RMS.
// Without normalization a = 1, b and the shift columns are absent and r = 1.
#pragma once
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>

#include <cmath>
#include <cstdint>
#include <tuple>
#include <vector>

#ifdef __CUDACC__
#define TOPONAS_HD __host__ __device__
#else
#define TOPONAS_HD
#endif

namespace toponas {
namespace group {

constexpr int kMaxParts = 16;

// Everything a phase reads and writes. Parameters in scalar_t (contiguous), the statistics and
// intermediate gradients in acc_t (float for half types): a workspace of workspace_size() values.
template <typename scalar_t, typename acc_t>
struct Args {
  int64_t n, O, C;
  int64_t T[kMaxParts];
  int form;       // 1 stacked, 2 separable
  int normalize;  // 0 none, 1 channel, 2 tensor
  acc_t eps;
  const scalar_t* D[kMaxParts];  // [C, T_i]
  const scalar_t* P[kMaxParts];  // [O, C]
  const scalar_t* c;             // [n]
  // forward outputs
  scalar_t* kernel;  // [O, cols()]
  scalar_t* dw;      // [n], separable only
  // backward: inputs, then outputs
  const scalar_t* gk;   // [O, cols()]
  const scalar_t* gdw;  // [n], separable only (null: zero)
  scalar_t* gc;         // [n]
  scalar_t* gD[kMaxParts];
  scalar_t* gP[kMaxParts];
  // workspace
  acc_t *m1, *v, *gm1, *gv;             // [n, C]
  acc_t *mo, *mean, *sd, *a;            // [n, O]
  acc_t *h, *gs, *gmean, *gvar;         // [n, O]
  acc_t *rms, *gr;                      // [n]

  TOPONAS_HD bool norm() const { return normalize != 0; }
  TOPONAS_HD bool separable() const { return form == 2; }
  // Columns of the 1x1 kernel: the stacked depthwise outputs (n C) or the merged one (C), then
  // one shift channel per part when normalized.
  TOPONAS_HD int64_t cols() const { return (separable() ? C : n * C) + (norm() ? n : 0); }
  TOPONAS_HD int64_t base() const { return separable() ? C : n * C; }  // the first shift column
};

inline int64_t workspace_size(int64_t n, int64_t O, int64_t C) { return 4 * n * C + 8 * n * O + 2 * n; }

template <typename scalar_t, typename acc_t>
void assign_workspace(Args<scalar_t, acc_t>& A, acc_t* w) {
  const int64_t nC = A.n * A.C, nO = A.n * A.O;
  acc_t** nc[] = {&A.m1, &A.v, &A.gm1, &A.gv};
  for (auto* p : nc) { *p = w; w += nC; }
  acc_t** no[] = {&A.mo, &A.mean, &A.sd, &A.a, &A.h, &A.gs, &A.gmean, &A.gvar};
  for (auto* p : no) { *p = w; w += nO; }
  A.rms = w;
  A.gr = w + A.n;
}

template <typename T>
TOPONAS_HD T sqrt_(T x) {
#ifdef __CUDA_ARCH__
  return ::sqrt(x);
#else
  return std::sqrt(x);
#endif
}

// ------------------------------------------------------------------------------------ forward
// Over n C: the mean and variance of D_i's taps of channel c (two passes).
template <typename S, typename A_>
TOPONAS_HD void channel_stats(const Args<S, A_>& A, int64_t idx) {
  if (!A.norm()) return;
  const int64_t i = idx / A.C, c = idx % A.C, T = A.T[i];
  const S* d = A.D[i] + c * T;
  A_ m = 0;
  for (int64_t t = 0; t < T; ++t) m += static_cast<A_>(d[t]);
  m /= static_cast<A_>(T);
  A_ v = 0;
  for (int64_t t = 0; t < T; ++t) {
    const A_ e = static_cast<A_>(d[t]) - m;
    v += e * e;
  }
  A.m1[idx] = m;
  A.v[idx] = v / static_cast<A_>(T);
}

// Over n: the RMS of D_i's taps (separable and normalized; else 1).
template <typename S, typename A_>
TOPONAS_HD void part_rms(const Args<S, A_>& A, int64_t i) {
  if (!(A.separable() && A.norm())) {
    A.rms[i] = 1;
    return;
  }
  const int64_t N = A.C * A.T[i];
  A_ s = 0;
  for (int64_t j = 0; j < N; ++j) {
    const A_ d = static_cast<A_>(A.D[i][j]);
    s += d * d;
  }
  A.rms[i] = sqrt_(s / static_cast<A_>(N));
}

// Over n O: mean_o and var_o of part i's output channel o.
template <typename S, typename A_>
TOPONAS_HD void output_stats(const Args<S, A_>& A, int64_t idx) {
  if (!A.norm()) return;
  const int64_t i = idx / A.O, o = idx % A.O, C = A.C;
  const S* p = A.P[i] + o * C;
  const A_* m1 = A.m1 + i * C;
  const A_* v = A.v + i * C;
  A_ mo = 0;
  for (int64_t c = 0; c < C; ++c) mo += static_cast<A_>(p[c]) * m1[c];
  mo /= static_cast<A_>(C);
  A_ dd = 0, pv = 0;
  for (int64_t c = 0; c < C; ++c) {
    const A_ pc = static_cast<A_>(p[c]);
    const A_ e = pc * m1[c] - mo;
    dd += e * e;
    pv += pc * pc * v[c];
  }
  A.mo[idx] = mo;
  A.sd[idx] = (dd + pv) / static_cast<A_>(C);  // the variance; part_affine makes it the std
}

// Over n: per tensor, the part's mean and variance from its channels'; then std and a.
template <typename S, typename A_>
TOPONAS_HD void part_affine(const Args<S, A_>& A, int64_t i) {
  if (!A.norm()) return;
  const int64_t O = A.O;
  A_* mo = A.mo + i * O;
  A_* mean = A.mean + i * O;
  A_* sd = A.sd + i * O;
  A_* a = A.a + i * O;
  if (A.normalize == 2) {
    A_ mt = 0;
    for (int64_t o = 0; o < O; ++o) mt += mo[o];
    mt /= static_cast<A_>(O);
    A_ vt = 0;
    for (int64_t o = 0; o < O; ++o) {
      const A_ e = mo[o] - mt;
      vt += sd[o] + e * e;
    }
    vt /= static_cast<A_>(O);
    for (int64_t o = 0; o < O; ++o) {
      mean[o] = mt;
      sd[o] = vt;
    }
  } else {
    for (int64_t o = 0; o < O; ++o) mean[o] = mo[o];
  }
  for (int64_t o = 0; o < O; ++o) {
    const A_ var = sd[o] > 0 ? sd[o] : A_(0);
    sd[o] = sqrt_(var);
    a[o] = A_(1) / (sd[o] + A.eps);
  }
}

// Over O cols(): one entry of the 1x1 kernel.
template <typename S, typename A_>
TOPONAS_HD void kernel_entry(const Args<S, A_>& A, int64_t idx) {
  const int64_t cols = A.cols(), o = idx / cols, col = idx % cols, C = A.C, O = A.O;
  A_ r = 0;
  if (col >= A.base()) {  // a shift channel: c_i b_i[o]
    const int64_t i = col - A.base(), j = i * O + o;
    r = static_cast<A_>(A.c[i]) * (-A.mean[j] * A.a[j]);
  } else if (A.separable()) {
    for (int64_t i = 0; i < A.n; ++i) {
      const A_ s = A.norm() ? A.a[i * O + o] * A.rms[i] : A_(1);
      r += static_cast<A_>(A.c[i]) * s * static_cast<A_>(A.P[i][o * C + col]);
    }
  } else {
    const int64_t i = col / C, ch = col % C;
    const A_ s = A.norm() ? A.a[i * O + o] : A_(1);
    r = static_cast<A_>(A.c[i]) * s * static_cast<A_>(A.P[i][o * C + ch]);
  }
  A.kernel[idx] = static_cast<S>(r);
}

// Over n (separable): sum_c and the merge weights dw_i = q_i / r_i.
template <typename S, typename A_>
TOPONAS_HD A_ coef_total(const Args<S, A_>& A) {
  A_ t = 0;
  for (int64_t j = 0; j < A.n; ++j) t += static_cast<A_>(A.c[j]);
  return t;
}

template <typename S, typename A_>
TOPONAS_HD void merge_weight(const Args<S, A_>& A, int64_t i) {
  if (!A.separable()) return;
  const A_ total = coef_total(A), safe = total == 0 ? A_(1) : total;
  A.dw[i] = static_cast<S>(static_cast<A_>(A.c[i]) / safe / A.rms[i]);
}

// ------------------------------------------------------------------------------------ backward
// Over n O: h_i[o] = sum_c gK[o, col(i, c)] P_i[o, c], and the shift column's gradient.
template <typename S, typename A_>
TOPONAS_HD void grad_rows(const Args<S, A_>& A, int64_t idx) {
  const int64_t i = idx / A.O, o = idx % A.O, C = A.C, cols = A.cols();
  const S* g = A.gk + o * cols + (A.separable() ? 0 : i * C);
  const S* p = A.P[i] + o * C;
  A_ h = 0;
  for (int64_t c = 0; c < C; ++c) h += static_cast<A_>(g[c]) * static_cast<A_>(p[c]);
  A.h[idx] = h;
  A.gs[idx] = A.norm() ? static_cast<A_>(A.gk[o * cols + A.base() + i]) : A_(0);
}

// Over n: the coefficient's gradient and, separable and normalized, the RMS's.
template <typename S, typename A_>
TOPONAS_HD void grad_coef(const Args<S, A_>& A, int64_t i) {
  const int64_t O = A.O;
  const A_* h = A.h + i * O;
  const A_* gs = A.gs + i * O;
  const A_ ci = static_cast<A_>(A.c[i]);
  A_ g = 0, ah = 0;
  for (int64_t o = 0; o < O; ++o) {
    if (A.norm()) {
      const A_ a = A.a[i * O + o];
      ah += a * h[o];
      g += -A.mean[i * O + o] * a * gs[o];
    } else {
      ah += h[o];
    }
  }
  g += ah * A.rms[i];
  A_ gr = 0;
  if (A.separable()) {
    // dw = q / r, q = c / safe (safe = sum c, or 1 when it is 0)
    const A_ total = coef_total(A), safe = total == 0 ? A_(1) : total;
    A_ dot = 0;  // sum_j gq_j q_j
    for (int64_t j = 0; j < A.n; ++j) {
      const A_ gdw = A.gdw ? static_cast<A_>(A.gdw[j]) : A_(0);
      dot += gdw / A.rms[j] * (static_cast<A_>(A.c[j]) / safe);
    }
    const A_ gdw = A.gdw ? static_cast<A_>(A.gdw[i]) : A_(0);
    const A_ gq = gdw / A.rms[i];
    g += (gq - (total != 0 ? dot : A_(0))) / safe;
    if (A.norm()) gr = ci * ah - gq * (ci / safe) / A.rms[i];
  }
  A.gc[i] = static_cast<S>(g);
  A.gr[i] = gr;
}

// Over n O (normalized): the gradients of mean and variance from those of a and b.
template <typename S, typename A_>
TOPONAS_HD void grad_affine(const Args<S, A_>& A, int64_t idx) {
  if (!A.norm()) return;
  const int64_t i = idx / A.O;
  const A_ ci = static_cast<A_>(A.c[i]), a = A.a[idx], sd = A.sd[idx];
  const A_ ga = ci * A.h[idx] * A.rms[i], gb = ci * A.gs[idx];
  const A_ gsd = -((ga - A.mean[idx] * gb) * a * a);  // b = -mean a, da/dstd = -a^2
  A.gmean[idx] = -(a * gb);
  A.gvar[idx] = sd > 0 ? gsd / (sd * 2) : A_(0);  // a constant channel passes nothing through its std
}

// Over n (per tensor): the per-tensor mean and variance's gradients spread over the channels.
template <typename S, typename A_>
TOPONAS_HD void grad_tensor(const Args<S, A_>& A, int64_t i) {
  if (A.normalize != 2) return;
  const int64_t O = A.O;
  A_* gm = A.gmean + i * O;
  A_* gv = A.gvar + i * O;
  A_ sm = 0, sv = 0;
  for (int64_t o = 0; o < O; ++o) {
    sm += gm[o];
    sv += gv[o];
  }
  const A_ inv = A_(1) / static_cast<A_>(O);
  for (int64_t o = 0; o < O; ++o) {
    gm[o] = sm * inv + sv * (A.mo[i * O + o] - A.mean[i * O + o]) * (2 * inv);
    gv[o] = sv * inv;
  }
}

// Over n C (normalized): the gradients of D_i's per-channel tap mean and variance.
template <typename S, typename A_>
TOPONAS_HD void grad_channel(const Args<S, A_>& A, int64_t idx) {
  if (!A.norm()) return;
  const int64_t i = idx / A.C, c = idx % A.C, O = A.O, C = A.C;
  const A_ m1 = A.m1[idx];
  A_ gm = 0, gv = 0;
  for (int64_t o = 0; o < O; ++o) {
    const int64_t j = i * O + o;
    const A_ p = static_cast<A_>(A.P[i][o * C + c]);
    const A_ dev = p * m1 - A.mo[j];
    gm += (A.gmean[j] + A.gvar[j] * dev * 2) * p;
    gv += A.gvar[j] * p * p;
  }
  A.gm1[idx] = gm / static_cast<A_>(C);
  A.gv[idx] = gv / static_cast<A_>(C);
}

// Over n O C: the gradient of P_i[o, c], through the kernel and the statistics.
template <typename S, typename A_>
TOPONAS_HD void grad_pointwise(const Args<S, A_>& A, int64_t idx) {
  const int64_t OC = A.O * A.C, i = idx / OC, oc = idx % OC, o = oc / A.C, c = oc % A.C, j = i * A.O + o;
  const int64_t col = A.separable() ? c : i * A.C + c;
  const A_ s = A.norm() ? A.a[j] * A.rms[i] : A_(1);
  A_ g = static_cast<A_>(A.c[i]) * s * static_cast<A_>(A.gk[o * A.cols() + col]);
  if (A.norm()) {
    const A_ p = static_cast<A_>(A.P[i][oc]), m1 = A.m1[i * A.C + c];
    const A_ dev = p * m1 - A.mo[j];
    g += (A.gmean[j] * m1 + A.gvar[j] * (dev * m1 + p * A.v[i * A.C + c]) * 2) / static_cast<A_>(A.C);
  }
  A.gP[i][oc] = static_cast<S>(g);
}

// Over n C: the gradient of D_i's taps of channel c, through the statistics and the RMS (the
// depthwise conv's own gradient is the caller's to add).
template <typename S, typename A_>
TOPONAS_HD void grad_depthwise(const Args<S, A_>& A, int64_t idx) {
  const int64_t i = idx / A.C, c = idx % A.C, T = A.T[i];
  const S* d = A.D[i] + c * T;
  S* g = A.gD[i] + c * T;
  const A_ m1 = A.norm() ? A.m1[idx] : A_(0), gm = A.norm() ? A.gm1[idx] : A_(0), gv = A.norm() ? A.gv[idx] : A_(0);
  const A_ rs = A.separable() && A.norm() ? A.gr[i] / (A.rms[i] * static_cast<A_>(A.C * T)) : A_(0);
  for (int64_t t = 0; t < T; ++t) {
    const A_ dt = static_cast<A_>(d[t]);
    const A_ r = A.norm() ? (gm + gv * (dt - m1) * 2) / static_cast<A_>(T) : A_(0);
    g[t] = static_cast<S>(r + rs * dt);
  }
}

// The phases in order, each with its index count. A runner runs them one after another (a
// barrier between two on a GPU).
template <typename S, typename A_, typename Run>
TOPONAS_HD void forward_phases(const Args<S, A_>& A, Run&& run) {
  run([&](int64_t k) { channel_stats(A, k); }, A.n * A.C);
  run([&](int64_t k) { part_rms(A, k); }, A.n);
  run([&](int64_t k) { output_stats(A, k); }, A.n * A.O);
  run([&](int64_t k) { part_affine(A, k); }, A.n);
}

template <typename S, typename A_, typename Run>
TOPONAS_HD void kernel_phases(const Args<S, A_>& A, Run&& run) {
  forward_phases(A, run);
  run([&](int64_t k) { kernel_entry(A, k); }, A.O * A.cols());
  if (A.separable()) run([&](int64_t k) { merge_weight(A, k); }, A.n);
}

template <typename S, typename A_, typename Run>
TOPONAS_HD void backward_phases(const Args<S, A_>& A, Run&& run) {
  forward_phases(A, run);
  run([&](int64_t k) { grad_rows(A, k); }, A.n * A.O);
  run([&](int64_t k) { grad_coef(A, k); }, A.n);
  run([&](int64_t k) { grad_affine(A, k); }, A.n * A.O);
  run([&](int64_t k) { grad_tensor(A, k); }, A.n);
  run([&](int64_t k) { grad_channel(A, k); }, A.n * A.C);
  run([&](int64_t k) { grad_pointwise(A, k); }, A.n * A.O * A.C);
  run([&](int64_t k) { grad_depthwise(A, k); }, A.n * A.C);
}

// ------------------------------------------------------------------------------------ host side
// The ops' checks, outputs and dtype dispatch, shared by the CPU and CUDA files; ``launch(A,
// backward)`` runs the phases on the tensors' device.
struct Inputs {
  std::vector<at::Tensor> D, P;  // contiguous
  at::Tensor c;
  int64_t n = 0, O = 0, C = 0;
};

inline Inputs check_inputs(const at::Tensor& coefs, at::TensorList tensors, int64_t form, int64_t normalize,
                           double eps) {
  TORCH_CHECK(form == 1 || form == 2, "group_pointwise: form must be 1 (stacked) or 2 (separable), got ", form);
  TORCH_CHECK(normalize >= 0 && normalize <= 2, "group_pointwise: normalize must be 0, 1 or 2, got ", normalize);
  TORCH_CHECK(eps >= 0 && std::isfinite(eps), "group_pointwise: eps must be finite and >= 0, got ", eps);
  TORCH_CHECK(!tensors.empty() && tensors.size() % 2 == 0,
              "group_pointwise: tensors must be (depthwise, pointwise) kernel pairs, got ", tensors.size(), " tensors");
  Inputs in;
  in.n = static_cast<int64_t>(tensors.size() / 2);
  TORCH_CHECK(in.n <= kMaxParts, "group_pointwise: at most ", kMaxParts, " parts, got ", in.n);
  const at::Tensor& P0 = tensors[1];
  TORCH_CHECK(P0.dim() == 4 && P0.size(2) == 1 && P0.size(3) == 1,
              "group_pointwise: tensors[1] must be a pointwise kernel [O, C, 1, 1], got shape ", P0.sizes());
  in.O = P0.size(0);
  in.C = P0.size(1);
  TORCH_CHECK(in.O >= 1 && in.C >= 1, "group_pointwise: empty pointwise kernel ", P0.sizes());
  TORCH_CHECK(at::isFloatingType(P0.scalar_type()), "group_pointwise: kernels must be floating point, got ",
              P0.scalar_type());
  for (int64_t i = 0; i < in.n; ++i) {
    const at::Tensor &D = tensors[2 * i], &P = tensors[2 * i + 1];
    TORCH_CHECK(D.dim() == 4 && D.size(0) == in.C && D.size(1) == 1 && D.numel() > 0,
                "group_pointwise: tensors[", 2 * i, "] must be a depthwise kernel [", in.C, ", 1, k, k], got shape ",
                D.sizes());
    TORCH_CHECK(P.sizes() == P0.sizes(), "group_pointwise: tensors[", 2 * i + 1, "] has shape ", P.sizes(),
                " but tensors[1] has ", P0.sizes());
    for (const at::Tensor* t : {&D, &P})
      TORCH_CHECK(t->scalar_type() == P0.scalar_type() && t->device() == P0.device(),
                  "group_pointwise: every kernel must have tensors[1]'s dtype and device");
    in.D.push_back(D.contiguous());
    in.P.push_back(P.contiguous());
  }
  TORCH_CHECK(coefs.dim() == 1 && coefs.size(0) == in.n, "group_pointwise: coefs must have shape [", in.n,
              "], got ", coefs.sizes());
  TORCH_CHECK(coefs.scalar_type() == P0.scalar_type() && coefs.device() == P0.device(),
              "group_pointwise: coefs must have the kernels' dtype and device");
  in.c = coefs.contiguous();
  return in;
}

inline int64_t columns(const Inputs& in, int64_t form, int64_t normalize) {
  return (form == 2 ? in.C : in.n * in.C) + (normalize ? in.n : 0);
}

template <typename S, typename A_>
Args<S, A_> make_args(const Inputs& in, int64_t form, int64_t normalize, double eps, const at::Tensor& work) {
  Args<S, A_> A{};
  A.n = in.n;
  A.O = in.O;
  A.C = in.C;
  A.form = static_cast<int>(form);
  A.normalize = static_cast<int>(normalize);
  A.eps = static_cast<A_>(eps);
  for (int64_t i = 0; i < in.n; ++i) {
    A.T[i] = in.D[i].numel() / in.C;
    A.D[i] = in.D[i].const_data_ptr<S>();
    A.P[i] = in.P[i].const_data_ptr<S>();
  }
  A.c = in.c.const_data_ptr<S>();
  assign_workspace(A, work.mutable_data_ptr<A_>());
  return A;
}

// [O, cols, 1, 1] kernel and [n] merge weights (separable; empty for stacked).
template <typename Launch>
std::tuple<at::Tensor, at::Tensor> pointwise(const at::Tensor& coefs, at::TensorList tensors, int64_t form,
                                             int64_t normalize, double eps, Launch&& launch) {
  const Inputs in = check_inputs(coefs, tensors, form, normalize, eps);
  const auto opts = in.P[0].options();
  at::Tensor kernel = at::empty({in.O, columns(in, form, normalize), 1, 1}, opts);
  at::Tensor dw = at::empty({form == 2 ? in.n : 0}, opts);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, kernel.scalar_type(), "group_pointwise", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    at::Tensor work = at::empty({workspace_size(in.n, in.O, in.C)}, opts.dtype(c10::CppTypeToScalarType<acc_t>::value));
    auto A = make_args<scalar_t, acc_t>(in, form, normalize, eps, work);
    A.kernel = kernel.mutable_data_ptr<scalar_t>();
    A.dw = form == 2 ? dw.mutable_data_ptr<scalar_t>() : nullptr;
    launch(A, false);
  });
  return {kernel, dw};
}

// [grad coefs, grad D_0, grad P_0, grad D_1, ...]: what reaches them through the kernel and the
// merge weights (the depthwise convs' own gradients of D are not included).
template <typename Launch>
std::vector<at::Tensor> pointwise_backward(const at::Tensor& grad_kernel, const at::Tensor& grad_dw,
                                           const at::Tensor& coefs, at::TensorList tensors, int64_t form,
                                           int64_t normalize, double eps, Launch&& launch) {
  const Inputs in = check_inputs(coefs, tensors, form, normalize, eps);
  const int64_t cols = columns(in, form, normalize);
  TORCH_CHECK(grad_kernel.numel() == in.O * cols && grad_kernel.size(0) == in.O,
              "group_pointwise: grad_kernel must have the kernel's shape [", in.O, ", ", cols, ", 1, 1], got ",
              grad_kernel.sizes());
  const bool has_gdw = form == 2 && grad_dw.defined() && grad_dw.numel() > 0;
  TORCH_CHECK(!grad_dw.defined() || grad_dw.numel() == 0 || (form == 2 && grad_dw.numel() == in.n),
              "group_pointwise: grad_dw must have shape [", in.n, "] (separable form) or be empty, got ",
              grad_dw.sizes());
  for (const at::Tensor* t : {&grad_kernel, &grad_dw})
    TORCH_CHECK(!t->defined() || t->numel() == 0 ||
                    (t->scalar_type() == in.P[0].scalar_type() && t->device() == in.P[0].device()),
                "group_pointwise: gradients must have the kernels' dtype and device");
  const at::Tensor gk = grad_kernel.contiguous();
  const at::Tensor gdw = has_gdw ? grad_dw.contiguous() : at::Tensor();
  const auto opts = in.P[0].options();
  std::vector<at::Tensor> out{at::empty({in.n}, opts)};
  for (int64_t i = 0; i < in.n; ++i) {
    out.push_back(at::empty(tensors[2 * i].sizes(), opts));
    out.push_back(at::empty(tensors[2 * i + 1].sizes(), opts));
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, gk.scalar_type(), "group_pointwise_backward", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    at::Tensor work = at::empty({workspace_size(in.n, in.O, in.C)}, opts.dtype(c10::CppTypeToScalarType<acc_t>::value));
    auto A = make_args<scalar_t, acc_t>(in, form, normalize, eps, work);
    A.gk = gk.const_data_ptr<scalar_t>();
    A.gdw = has_gdw ? gdw.const_data_ptr<scalar_t>() : nullptr;
    A.gc = out[0].mutable_data_ptr<scalar_t>();
    for (int64_t i = 0; i < in.n; ++i) {
      A.gD[i] = out[1 + 2 * i].mutable_data_ptr<scalar_t>();
      A.gP[i] = out[2 + 2 * i].mutable_data_ptr<scalar_t>();
    }
    launch(A, true);
  });
  return out;
}

}  // namespace group
}  // namespace toponas
