// Checks of the op contract (csrc/ops.cpp) that the CPU (csrc/cpu/common.h) and CUDA (csrc/cuda/fwd_problem.h)
// entries share, with the same messages. ATen only: no device code.
#pragma once

#include <ATen/ATen.h>

#include <cmath>
#include <optional>

namespace rapkern {

// prior_kind 0..4 (none, lag, banded, lowrank, dense); prior1 only for lowrank; mask_outside only for banded.
inline void check_prior_args(const char* op, int64_t prior_kind, const std::optional<at::Tensor>& prior0,
                             const std::optional<at::Tensor>& prior1, bool mask_outside) {
  TORCH_CHECK(prior_kind >= 0 && prior_kind <= 4, op, ": prior_kind must be 0..4 (none, lag, banded, lowrank, ",
              "dense), got ", prior_kind);
  const bool needs1 = prior_kind == 3;
  if (prior_kind == 0) {
    TORCH_CHECK(!prior0.has_value() && !prior1.has_value(), op, ": prior0/prior1 must be None for prior_kind 0");
  } else {
    TORCH_CHECK(prior0.has_value(), op, ": prior0 is required for prior_kind ", prior_kind);
    TORCH_CHECK(needs1 == prior1.has_value(), op, ": prior1 must be ", needs1 ? "given" : "None",
                " for prior_kind ", prior_kind);
  }
  TORCH_CHECK(!mask_outside || prior_kind == 2, op, ": mask_outside is only valid with prior_kind 2 (banded)");
}

// q (B, Hq, Lq, D), k (B, Hkv, Lk, D), v (B, Hkv, Lk, Dv) with Hq a multiple of Hkv (4-D checked by the caller).
inline void check_qkv_sizes(const char* op, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v) {
  const int64_t B = q.size(0), Hq = q.size(1), D = q.size(3), Hkv = k.size(1), Lk = k.size(2);
  TORCH_CHECK(k.size(0) == B && v.size(0) == B, op, ": k and v must have batch B = ", B, ", got k ", k.sizes(),
              " and v ", v.sizes());
  TORCH_CHECK(k.size(3) == D, op, ": k must have head dim D = ", D, " (q's), got ", k.size(3));
  TORCH_CHECK(v.size(1) == Hkv && v.size(2) == Lk, op, ": v must have (Hkv, Lk) = (", Hkv, ", ", Lk,
              ") as k, got shape ", v.sizes());
  TORCH_CHECK(Hkv >= 1 && Hq % Hkv == 0, op, ": q heads Hq = ", Hq, " must be a multiple of k/v heads Hkv = ", Hkv);
  TORCH_CHECK_VALUE(D >= 1 && v.size(3) >= 1, op, ": head dims must be >= 1, got q/k D = ", D, " and v Dv = ",
                    v.size(3));
}

// The scalar arguments: finite scale and alpha_value (a non-finite one would turn whole rows into NaN), dropout_p
// in [0, 1). rapkern.attention's direct path (rapkern/functional.py) relies on the op checking everything the
// Python validation checks, so these are ValueErrors like rapkern/validate.py's.
inline void check_scalars(const char* op, double alpha_value, double scale, double dropout_p) {
  TORCH_CHECK_VALUE(std::isfinite(scale), op, ": scale must be finite, got ", scale);
  TORCH_CHECK_VALUE(std::isfinite(alpha_value), op, ": alpha must be finite, got ", alpha_value);
  TORCH_CHECK_VALUE(dropout_p >= 0.0 && dropout_p < 1.0, op, ": dropout_p must be in [0, 1), got ", dropout_p);
}

// ValueError with rapkern/priors.py's message when a prior tensor `name` holds `n_bad` values it may not: compact
// priors must be finite; a dense bias (allow_neginf) may hold -inf, a mask, but no NaN or +inf.
inline void check_no_bad_values(const char* name, int64_t n_bad, bool allow_neginf) {
  if (allow_neginf) {
    TORCH_CHECK_VALUE(n_bad == 0, name, " must not contain NaN or +inf; got ", n_bad, " such entries");
  } else {
    TORCH_CHECK_VALUE(n_bad == 0, name, " must not contain non-finite values (NaN or \u00b1inf); to exclude keys "
                      "use causal=, key_padding_mask=, BandedPrior(mask_outside=True) or -inf entries of a "
                      "DensePrior; got ", n_bad, " such entries");
  }
}

}  // namespace rapkern
