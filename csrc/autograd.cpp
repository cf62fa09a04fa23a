// Autograd for rapkern::attention_fwd, in C++ (registered for the Autograd key, as torchvision does for its
// ops): a call costs a few microseconds here, where torch.library.register_autograd's Python
// autograd.Function costs tens (measured in the cpp backend's per-call overhead check). The backward calls
// rapkern::attention_bwd through the dispatcher, so each device's kernel (CPU here, CUDA from rapkern._C_cuda)
// serves it, and torch.compile traces both ops into its graphs. attention_bwd's own autograd kernel makes its
// outputs non-differentiable with a clear error: rapkern's backward passes have no derivative.
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/autograd.h>
#include <torch/library.h>

namespace rapkern {
namespace {

using at::Tensor;
using std::optional;
using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

using FwdSig = std::tuple<Tensor, Tensor>(const Tensor&, const Tensor&, const Tensor&, const optional<Tensor>&,
                                          const optional<Tensor>&, double, int64_t, const optional<Tensor>&,
                                          const optional<Tensor>&, bool, bool, double, double, int64_t);
using BwdSig = std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor>(
    const Tensor&, const optional<Tensor>&, const Tensor&, const Tensor&, const Tensor&, const Tensor&,
    const Tensor&, const optional<Tensor>&, const optional<Tensor>&, double, int64_t, const optional<Tensor>&,
    const optional<Tensor>&, bool, bool, double, double, int64_t, bool, bool, bool);

const c10::TypedOperatorHandle<FwdSig>& fwd_op() {
  static const auto op =
      c10::Dispatcher::singleton().findSchemaOrThrow("rapkern::attention_fwd", "").typed<FwdSig>();
  return op;
}

const c10::TypedOperatorHandle<BwdSig>& bwd_op() {
  static const auto op =
      c10::Dispatcher::singleton().findSchemaOrThrow("rapkern::attention_bwd", "").typed<BwdSig>();
  return op;
}

Tensor or_undefined(const optional<Tensor>& t) { return t.has_value() ? *t : Tensor(); }
optional<Tensor> or_none(const Tensor& t) {
  return t.defined() ? optional<Tensor>(t) : optional<Tensor>();
}

// Whether autograd would record anything: the fast path skips Function::apply's bookkeeping when not.
bool needs_grad(std::initializer_list<const Tensor*> ts, std::initializer_list<const optional<Tensor>*> opts) {
  if (!at::GradMode::is_enabled()) return false;
  for (const Tensor* t : ts)
    if (t->requires_grad()) return true;
  for (const optional<Tensor>* t : opts)
    if (t->has_value() && (*t)->defined() && (*t)->requires_grad()) return true;
  return false;
}

// Forward arguments, in schema order; the backward returns one gradient per argument.
enum Arg : int { Q, K, V, KPM, ALPHA, ALPHA_VALUE, KIND, PRIOR0, PRIOR1, MASK_OUTSIDE, CAUSAL, SCALE, DROPOUT, SEED,
                 NUM_ARGS };

class AttentionFunction : public torch::autograd::Function<AttentionFunction> {
 public:
  static variable_list forward(AutogradContext* ctx, const Tensor& q, const Tensor& k, const Tensor& v,
                               const optional<Tensor>& kpm, const optional<Tensor>& alpha, double alpha_value,
                               int64_t prior_kind, const optional<Tensor>& prior0, const optional<Tensor>& prior1,
                               bool mask_outside, bool causal, double scale, double dropout_p, int64_t seed) {
    Tensor out, lse;
    {
      at::AutoDispatchBelowADInplaceOrView guard;
      std::tie(out, lse) = fwd_op().call(q, k, v, kpm, alpha, alpha_value, prior_kind, prior0, prior1,
                                         mask_outside, causal, scale, dropout_p, seed);
    }
    ctx->save_for_backward({q, k, v, out, lse, or_undefined(kpm), or_undefined(alpha), or_undefined(prior0),
                            or_undefined(prior1)});
    ctx->saved_data["alpha_value"] = alpha_value;
    ctx->saved_data["prior_kind"] = prior_kind;
    ctx->saved_data["mask_outside"] = mask_outside;
    ctx->saved_data["causal"] = causal;
    ctx->saved_data["scale"] = scale;
    ctx->saved_data["dropout_p"] = dropout_p;
    ctx->saved_data["seed"] = seed;
    ctx->set_materialize_grads(false);  // an unused out or lse gets no zero-filled gradient
    return {out, lse};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const Tensor &q = saved[0], &k = saved[1], &v = saved[2], &out = saved[3], &lse = saved[4];
    const optional<Tensor> kpm = or_none(saved[5]), alpha = or_none(saved[6]);
    const optional<Tensor> prior0 = or_none(saved[7]), prior1 = or_none(saved[8]);
    const int64_t prior_kind = ctx->saved_data["prior_kind"].toInt();

    // needs_input_grad counts the autograd edges: one per tensor argument that was given (an absent
    // optional has none).
    bool need[NUM_ARGS] = {};
    size_t edge = 0;
    for (int a : {Q, K, V, KPM, ALPHA, PRIOR0, PRIOR1}) {
      const bool given = a == KPM ? kpm.has_value() : a == ALPHA ? alpha.has_value()
                         : a == PRIOR0 ? prior0.has_value() : a == PRIOR1 ? prior1.has_value() : true;
      if (given) need[a] = ctx->needs_input_grad(edge++);
    }
    const bool need_qkv = need[Q] || need[K] || need[V];
    const bool need_prior = prior_kind != 0 && (need[PRIOR0] || need[PRIOR1]);
    const bool need_alpha = prior_kind != 0 && need[ALPHA];

    // The kernels read dout with unit stride in its last dim; autograd may hand it over expanded (out.sum():
    // all strides 0) or transposed: copy only then.
    Tensor dout = grads[0].defined() ? grads[0] : at::zeros_like(out);
    if (dout.size(-1) > 1 && dout.stride(-1) != 1) dout = dout.contiguous();
    const optional<Tensor> dlse = or_none(grads[1]);
    auto [dq, dk, dv, dprior0, dprior1, dalpha] = bwd_op().call(
        dout, dlse, q, k, v, out, lse, kpm, alpha, ctx->saved_data["alpha_value"].toDouble(), prior_kind, prior0,
        prior1, ctx->saved_data["mask_outside"].toBool(), ctx->saved_data["causal"].toBool(),
        ctx->saved_data["scale"].toDouble(), ctx->saved_data["dropout_p"].toDouble(),
        ctx->saved_data["seed"].toInt(), need_qkv, need_prior, need_alpha);

    variable_list result(NUM_ARGS);
    if (need[Q]) result[Q] = dq;
    if (need[K]) result[K] = dk;
    if (need[V]) result[V] = dv;
    if (need_alpha) result[ALPHA] = dalpha;
    if (need_prior && need[PRIOR0]) result[PRIOR0] = dprior0;
    if (need_prior && need[PRIOR1]) result[PRIOR1] = dprior1;
    return result;
  }
};

class AttentionBackwardFunction : public torch::autograd::Function<AttentionBackwardFunction> {
 public:
  static variable_list forward(AutogradContext* ctx, const Tensor& dout, const optional<Tensor>& dlse,
                               const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& out,
                               const Tensor& lse, const optional<Tensor>& kpm, const optional<Tensor>& alpha,
                               double alpha_value, int64_t prior_kind, const optional<Tensor>& prior0,
                               const optional<Tensor>& prior1, bool mask_outside, bool causal, double scale,
                               double dropout_p, int64_t seed, bool need_qkv, bool need_prior, bool need_alpha) {
    at::AutoDispatchBelowADInplaceOrView guard;
    auto r = bwd_op().call(dout, dlse, q, k, v, out, lse, kpm, alpha, alpha_value, prior_kind, prior0, prior1,
                           mask_outside, causal, scale, dropout_p, seed, need_qkv, need_prior, need_alpha);
    return {std::get<0>(r), std::get<1>(r), std::get<2>(r), std::get<3>(r), std::get<4>(r), std::get<5>(r)};
  }

  static variable_list backward(AutogradContext*, variable_list) {
    TORCH_CHECK(false,
                "rapkern: double backward (create_graph=True, higher-order gradients) through rapkern.attention "
                "is not supported by the cpp backend; compute first-order gradients only, or use "
                "rapkern.testing.reference_attention (float64, O(L²) memory) where second derivatives are needed");
  }
};

std::tuple<Tensor, Tensor> attention_fwd_autograd(const Tensor& q, const Tensor& k, const Tensor& v,
                                                  const optional<Tensor>& kpm, const optional<Tensor>& alpha,
                                                  double alpha_value, int64_t prior_kind,
                                                  const optional<Tensor>& prior0, const optional<Tensor>& prior1,
                                                  bool mask_outside, bool causal, double scale, double dropout_p,
                                                  int64_t seed) {
  if (!needs_grad({&q, &k, &v}, {&kpm, &alpha, &prior0, &prior1})) {  // inference: no graph to record
    at::AutoDispatchBelowADInplaceOrView guard;
    return fwd_op().call(q, k, v, kpm, alpha, alpha_value, prior_kind, prior0, prior1, mask_outside, causal, scale,
                         dropout_p, seed);
  }
  auto r = AttentionFunction::apply(q, k, v, kpm, alpha, alpha_value, prior_kind, prior0, prior1, mask_outside,
                                    causal, scale, dropout_p, seed);
  return {r[0], r[1]};
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> attention_bwd_autograd(
    const Tensor& dout, const optional<Tensor>& dlse, const Tensor& q, const Tensor& k, const Tensor& v,
    const Tensor& out, const Tensor& lse, const optional<Tensor>& kpm, const optional<Tensor>& alpha,
    double alpha_value, int64_t prior_kind, const optional<Tensor>& prior0, const optional<Tensor>& prior1,
    bool mask_outside, bool causal, double scale, double dropout_p, int64_t seed, bool need_qkv, bool need_prior,
    bool need_alpha) {
  if (!needs_grad({&dout, &q, &k, &v, &out, &lse}, {&dlse, &kpm, &alpha, &prior0, &prior1})) {  // plain backward
    at::AutoDispatchBelowADInplaceOrView guard;
    return bwd_op().call(dout, dlse, q, k, v, out, lse, kpm, alpha, alpha_value, prior_kind, prior0, prior1,
                         mask_outside, causal, scale, dropout_p, seed, need_qkv, need_prior, need_alpha);
  }
  auto r = AttentionBackwardFunction::apply(dout, dlse, q, k, v, out, lse, kpm, alpha, alpha_value, prior_kind,
                                            prior0, prior1, mask_outside, causal, scale, dropout_p, seed, need_qkv,
                                            need_prior, need_alpha);
  return {r[0], r[1], r[2], r[3], r[4], r[5]};
}

}  // namespace

TORCH_LIBRARY_IMPL(rapkern, Autograd, m) {
  m.impl("attention_fwd", &attention_fwd_autograd);
  m.impl("attention_bwd", &attention_bwd_autograd);
}

}  // namespace rapkern
