// Argument checks shared by the CPU and CUDA kernels. The Python wrappers check first and name
// the user's argument; these are the last line for direct torch.ops.toponas.* callers.
#pragma once
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>

#include <cmath>
#include <vector>

namespace toponas {

inline void check_same_like(const at::Tensor& t, const at::Tensor& ref, const char* what) {
  TORCH_CHECK(t.device() == ref.device(), what, " is on ", t.device(), " but expected ", ref.device());
  TORCH_CHECK(t.scalar_type() == ref.scalar_type(), what, " has dtype ", t.scalar_type(),
              " but expected ", ref.scalar_type());
}

inline void check_candidates(at::TensorList outputs, const at::Tensor& weights) {
  TORCH_CHECK(outputs.size() > 0, "outputs is empty: at least one candidate (K >= 1) is needed");
  TORCH_CHECK(weights.dim() == 1 && weights.size(0) == static_cast<int64_t>(outputs.size()),
              "weights must have shape [", outputs.size(), "], got ", weights.sizes());
  for (size_t k = 0; k < outputs.size(); ++k) {
    check_same_like(outputs[k], outputs[0], "outputs[k]");
    TORCH_CHECK(outputs[k].sizes() == outputs[0].sizes(), "outputs[", k, "] has shape ",
                outputs[k].sizes(), " but outputs[0] has ", outputs[0].sizes());
  }
  check_same_like(weights, outputs[0], "weights");
}

// grad must have the device, dtype and shape of what it is the gradient of.
inline void check_grad_like(const at::Tensor& grad, const at::Tensor& ref, const char* ref_name) {
  check_same_like(grad, ref, "grad");
  TORCH_CHECK(grad.sizes() == ref.sizes(), "grad has shape ", grad.sizes(), " but ", ref_name, " has ",
              ref.sizes());
}

inline void check_softmax_args(const at::Tensor& logits, const at::Tensor& mask, double tau) {
  TORCH_CHECK(logits.dim() >= 1 && logits.size(-1) > 0, "logits needs a non-empty last dim, got ",
              logits.sizes());
  TORCH_CHECK(mask.scalar_type() == at::kBool, "mask must be bool, got ", mask.scalar_type());
  TORCH_CHECK(mask.sizes() == logits.sizes(), "mask has shape ", mask.sizes(), " but logits has ",
              logits.sizes());
  TORCH_CHECK(mask.device() == logits.device(), "mask and logits must be on one device");
  TORCH_CHECK(tau > 0 && std::isfinite(tau), "tau must be positive and finite, got ", tau);
}

inline std::vector<at::Tensor> contiguous_all(at::TensorList ts) {
  std::vector<at::Tensor> out;
  out.reserve(ts.size());
  for (const auto& t : ts) out.push_back(t.contiguous());
  return out;
}

}  // namespace toponas
