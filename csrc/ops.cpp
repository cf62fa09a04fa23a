// The op schemas of rapkern, defined once. Device kernels register implementations from their own
// translation units (csrc/cpu/*.cpp in rapkern._C; csrc/cuda/ in a separate module), so a failed CUDA
// build never takes the CPU kernels down.
//
// prior_kind: 0 none, 1 relative lag, 2 banded, 3 low-rank, 4 dense (rapkern/priors.py is the semantics).
// Prior tensors come as the user gave them: any floating dtype (read as float32), any strides, leading dims
// (), (Hp,) or (Bp, Hp) with Bp in {1, B}, Hp in {1, Hq}, then:
//   lag: prior0 = table (..., 2W+1); banded: prior0 = values (..., Lq, 2w+1);
//   low-rank: prior0 = u (..., Lq, r), prior1 = v (..., Lk, r); dense: prior0 = bias (..., Lq, Lk).
// The forward rejects non-finite compact priors (a dense bias: NaN or +inf) with a ValueError before computing.
// alpha: None (alpha_value for every head) or a floating tensor of shape () or (Hq,). q, k, v: same dtype
// (float32, float16, bfloat16 on CPU), any strides.
#include <torch/library.h>

TORCH_LIBRARY(rapkern, m) {
  // out (B, Hq, Lq, Dv) in q's dtype; lse (B, Hq, Lq) float32, natural log, -inf for a row with no key.
  m.def(
      "attention_fwd(Tensor q, Tensor k, Tensor v, Tensor? key_padding_mask, Tensor? alpha, float alpha_value, "
      "int prior_kind, Tensor? prior0, Tensor? prior1, bool mask_outside, bool causal, float scale, "
      "float dropout_p, int seed) -> (Tensor out, Tensor lse)");
  // dq, dk, dv in the inputs' dtypes; dprior0/dprior1 float32 in the shape of the prior tensors passed in;
  // dalpha float32 in alpha's shape ((Hq,) when alpha is None). A gradient not asked for is an empty tensor
  // (numel 0).
  m.def(
      "attention_bwd(Tensor dout, Tensor? dlse, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, "
      "Tensor? key_padding_mask, Tensor? alpha, float alpha_value, int prior_kind, Tensor? prior0, "
      "Tensor? prior1, bool mask_outside, bool causal, float scale, float dropout_p, int seed, "
      "bool need_qkv_grad, bool need_prior_grad, bool need_alpha_grad) "
      "-> (Tensor dq, Tensor dk, Tensor dv, Tensor dprior0, Tensor dprior1, Tensor dalpha)");
  // lda_route's forward (rapkern.lda_route semantics): q (G, N, d), centroids (G, n, d), answers (G, n, e) of one
  // dtype (a shared table: group stride 0), cluster_mask bool (G, n) True = absent. top_k 0: dense, giving out
  // (G, N, e) in q's dtype and lse (G, N) float32 natural log (-inf for a group with no cluster); top_k k >= 1:
  // out, weights (G, N, k) float32 and indices (G, N, k) int64 (score desc, index asc). Unused outputs are empty.
  // Implemented for CUDA only (rapkern._C_cuda, csrc/cuda/route_fwd*.cu): the CPU serves routing in PyTorch.
  m.def(
      "route_fwd(Tensor q, Tensor centroids, Tensor answers, Tensor? cluster_mask, float tau, bool normalize, "
      "int top_k) -> (Tensor out, Tensor lse, Tensor weights, Tensor indices)");
  // Its backward: the float32 gradients of q, centroids and answers (G-leading shapes as in route_fwd) with the
  // inverse norms held fixed (the caller applies the normalization Jacobians), and per row Σ_j dZ_ij·log P_ij
  // (G, N) float32, whose sum times -1/τ is dτ (route_params.h has the math); from the forward's inputs and
  // results (lse for dense, weights and indices for top-k).
  m.def(
      "route_bwd(Tensor dout, Tensor q, Tensor centroids, Tensor answers, Tensor? cluster_mask, float tau, "
      "bool normalize, int top_k, Tensor out, Tensor lse, Tensor weights, Tensor indices) "
      "-> (Tensor dq, Tensor dcentroids, Tensor danswers, Tensor dz_logp)");
}
