// Autograd for rapkern::attention_fwd, in C++ (registered for the Autograd key, as torchvision does for its
// ops): a call costs a few microseconds here, where torch.library.register_autograd's Python
// autograd.Function costs tens (measured in the cpp backend's per-call overhead check). The backward calls
// rapkern::attention_bwd through the dispatcher, so each device's kernel (CPU here, CUDA from rapkern._C_cuda)
// serves it, and torch.compile traces both ops into its graphs. attention_bwd's own autograd kernel makes its
// outputs non-differentiable with a clear error: rapkern's backward passes have no derivative.
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/autograd.h>
#include <torch/csrc/autograd/function.h>
#include <torch/csrc/autograd/functions/utils.h>
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
// A float32 gradient from the kernels in the dtype of its input (a half prior or float64 alpha).
Tensor in_dtype_of(const Tensor& grad, const optional<Tensor>& input) {
  return grad.scalar_type() == (*input).scalar_type() ? grad : grad.to((*input).scalar_type());
}
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

// The autograd node of attention_fwd, written as PyTorch's generated nodes are (a Node subclass, its edges and
// saved tensors set directly): recording a call costs about a microsecond, where torch::autograd::Function's
// generic CppNode costs ten or more (measured with bench/overhead.py). Edges: q, k, v, alpha, prior0, prior1
// (an absent optional gives an invalid edge). Inputs are kept as SavedVariables (version-checked); out and lse
// as detached aliases plus the version they had (holding them with their grad_fn would be a reference cycle),
// checked the same way, so an in-place change of any of them before backward is an error, not a wrong gradient.
enum EdgeIndex : size_t { Q, K, V, ALPHA, PRIOR0, PRIOR1, NUM_EDGES };

struct AttentionBackward : public torch::autograd::Node {
  torch::autograd::SavedVariable q_, k_, v_, kpm_, alpha_, prior0_, prior1_;
  Tensor out_, lse_;
  int64_t out_version_ = 0, lse_version_ = 0;
  bool has_kpm_ = false, has_alpha_ = false, has_prior0_ = false, has_prior1_ = false;
  double alpha_value_ = 0.0, scale_ = 1.0, dropout_p_ = 0.0;
  int64_t prior_kind_ = 0, seed_ = 0;
  bool mask_outside_ = false, causal_ = false;
  bool released_ = false;

  std::string name() const override { return "rapkern::AttentionBackward"; }

  void release_variables() override {
    for (auto* s : {&q_, &k_, &v_, &kpm_, &alpha_, &prior0_, &prior1_}) s->reset_data();
    out_.reset();
    lse_.reset();
    released_ = true;
  }

  static void check_version(const Tensor& t, int64_t saved, const char* what) {
    TORCH_CHECK(t._version() == saved, "rapkern.attention: ", what, " was modified by an inplace operation after "
                "the forward (version ", t._version(), ", saved at version ", saved, "); its gradient would be "
                "wrong. Modify a clone instead.");
  }

  variable_list apply(variable_list&& grads) override {
    TORCH_CHECK(!released_, "rapkern.attention: trying to backward through the graph a second time (or to "
                "access saved tensors after they have been freed); specify retain_graph=True the first time");
    check_version(out_, out_version_, "the output");
    check_version(lse_, lse_version_, "the returned lse");
    const Tensor q = q_.unpack(), k = k_.unpack(), v = v_.unpack();
    const optional<Tensor> kpm = has_kpm_ ? optional<Tensor>(kpm_.unpack()) : optional<Tensor>();
    const optional<Tensor> alpha = has_alpha_ ? optional<Tensor>(alpha_.unpack()) : optional<Tensor>();
    const optional<Tensor> prior0 = has_prior0_ ? optional<Tensor>(prior0_.unpack()) : optional<Tensor>();
    const optional<Tensor> prior1 = has_prior1_ ? optional<Tensor>(prior1_.unpack()) : optional<Tensor>();

    const bool need_qkv = should_compute_output(Q) || should_compute_output(K) || should_compute_output(V);
    const bool need_prior = prior_kind_ != 0 && (should_compute_output(PRIOR0) || should_compute_output(PRIOR1));
    const bool need_alpha = prior_kind_ != 0 && should_compute_output(ALPHA);
    variable_list result(NUM_EDGES);
    if (!need_qkv && !need_prior && !need_alpha) return result;
    if (!grads[0].defined() && !grads[1].defined()) return result;  // neither output was used

    // The kernels read dout with unit stride in its last dim; autograd may hand it over expanded (out.sum():
    // all strides 0) or transposed: copy only then.
    Tensor dout = grads[0].defined() ? grads[0] : at::zeros_like(out_);
    if (dout.size(-1) > 1 && dout.stride(-1) != 1) dout = dout.contiguous();
    const optional<Tensor> dlse = or_none(grads[1]);
    auto [dq, dk, dv, dprior0, dprior1, dalpha] =
        bwd_op().call(dout, dlse, q, k, v, out_, lse_, kpm, alpha, alpha_value_, prior_kind_, prior0, prior1,
                      mask_outside_, causal_, scale_, dropout_p_, seed_, need_qkv, need_prior, need_alpha);
    if (should_compute_output(Q)) result[Q] = dq;
    if (should_compute_output(K)) result[K] = dk;
    if (should_compute_output(V)) result[V] = dv;
    if (need_alpha) result[ALPHA] = in_dtype_of(dalpha, alpha);
    if (need_prior && should_compute_output(PRIOR0)) result[PRIOR0] = in_dtype_of(dprior0, prior0);
    if (need_prior && should_compute_output(PRIOR1)) result[PRIOR1] = in_dtype_of(dprior1, prior1);
    return result;
  }
};

// Node pointers are std::shared_ptr up to torch 2.11 and c10::intrusive_ptr later: make one for either.
using NodePtr = decltype(std::declval<torch::autograd::Edge>().function);
template <typename N, typename Ptr = NodePtr>
struct MakeNode;
template <typename N>
struct MakeNode<N, std::shared_ptr<torch::autograd::Node>> {
  // (torch's own deleteNode, which unrolls long graphs, is not declared in every version; this node adds one
  // level to the destruction of the graph below it)
  static std::shared_ptr<N> make() { return std::make_shared<N>(); }
};
template <typename N>
struct MakeNode<N, c10::intrusive_ptr<torch::autograd::Node>> {
  static c10::intrusive_ptr<N> make() { return c10::make_intrusive<N>(); }
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
  Tensor out, lse;
  {
    at::AutoDispatchBelowADInplaceOrView guard;
    std::tie(out, lse) = fwd_op().call(q, k, v, kpm, alpha, alpha_value, prior_kind, prior0, prior1, mask_outside,
                                       causal, scale, dropout_p, seed);
  }
  if (!needs_grad({&q, &k, &v}, {&alpha, &prior0, &prior1})) return {out, lse};  // inference: no graph

  auto node = MakeNode<AttentionBackward>::make();
  node->set_next_edges(torch::autograd::collect_next_edges(q, k, v, alpha, prior0, prior1));
  node->q_ = torch::autograd::SavedVariable(q, false);
  node->k_ = torch::autograd::SavedVariable(k, false);
  node->v_ = torch::autograd::SavedVariable(v, false);
  node->has_kpm_ = kpm.has_value();
  node->has_alpha_ = alpha.has_value();
  node->has_prior0_ = prior0.has_value();
  node->has_prior1_ = prior1.has_value();
  if (node->has_kpm_) node->kpm_ = torch::autograd::SavedVariable(*kpm, false);
  if (node->has_alpha_) node->alpha_ = torch::autograd::SavedVariable(*alpha, false);
  if (node->has_prior0_) node->prior0_ = torch::autograd::SavedVariable(*prior0, false);
  if (node->has_prior1_) node->prior1_ = torch::autograd::SavedVariable(*prior1, false);
  node->out_ = out.detach();  // shares out's storage and version counter, not its grad_fn
  node->lse_ = lse.detach();
  node->out_version_ = out._version();
  node->lse_version_ = lse._version();
  node->alpha_value_ = alpha_value;
  node->prior_kind_ = prior_kind;
  node->mask_outside_ = mask_outside;
  node->causal_ = causal;
  node->scale_ = scale;
  node->dropout_p_ = dropout_p;
  node->seed_ = seed;
  torch::autograd::set_history(out, node);
  torch::autograd::set_history(lse, node);
  return {out, lse};
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
