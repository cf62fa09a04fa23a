// The op contract's rules on which prior arguments go with which prior_kind (csrc/ops.cpp), checked the same way
// by the CPU (csrc/cpu/common.h) and CUDA (csrc/cuda/fwd_problem.h) entries. ATen only: no device code.
#pragma once

#include <ATen/ATen.h>

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

}  // namespace rapkern
