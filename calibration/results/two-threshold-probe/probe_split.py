"""One-off probe (not part of the package): how to split a row budget between W_up and W_down,
and whether the down score should be weighted by the norm of W_down[:, i].

At a target fraction r of W_up + W_down rows not read, per layer s_up = r - d and
s_down = r + d (the fraction of up rows, of down rows not read). t_up is the s_up-quantile of
the shipped up_rms score |SiLU(g_i)| * s_i, t_down the s_down-quantile of the down score
(|SiLU(g_i) * u_i|, or that times ||W_down[:, i]||; 0 where the first threshold drops the
neuron), over the dense MLP inputs of 8,192 calibration tokens (LAMBADA, calibration split).
For each (r, d, weighting) it prints held-out perplexity (16,384 LAMBADA held-out tokens) and
the mean over layers of the relative MLP output error on those calibration tokens, the local
proxy cats-calibrate can minimise per layer.

    OUT=dir python calibration/results/two-threshold-probe/probe_split.py   # H200: about a minute
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
import torch.nn.functional as F

from cats_serve.calibration.scoring import score_text
from cats_serve.calibration.text_data import load_documents, pack_documents, pad_batches
from cats_serve.server.model.conversion_cache import default_cache_dir
from cats_serve.server.model.loader import load_pretrained

REPO = Path(__file__).resolve().parents[3]
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
CONFIGS = [(0.5, d, w) for d in (0.1, 0.2) for w in (False, True)] + [(0.3, 0.1, True)]


def main() -> None:
    out = Path(os.environ.get("OUT", "."))
    loaded = load_pretrained(
        "SmolLM2-135M-Instruct", device=DEVICE, dtype="float32", cache_dir=default_cache_dir()
    )
    model, c = loaded.model, loaded.model.config
    shipped = loaded.load_thresholds(
        REPO / "calibration/thresholds/SmolLM2-135M-Instruct-uniform-0.50.json"
    )
    model.set_neuron_scale(shipped.neuron_scale)
    texts = load_documents("lambada", "calibration").texts
    windows, _ = pack_documents(loaded.tokenizer, texts, seq_len=512, max_tokens=8192)
    inputs = [[] for _ in range(c.num_layers)]
    with torch.inference_mode():
        for b in pad_batches(windows, 8192):
            model.score(
                b.tokens.to(DEVICE), b.real.to(DEVICE), torch.zeros(c.num_layers, device=DEVICE),
                on_mlp_input=lambda i, h: inputs[i].append(h.clone()),
            )  # fmt: skip
    inputs = [torch.cat(h) for h in inputs]
    down_norm = [layer.w_down_t.norm(dim=1) for layer in model.layers]

    def pick(r, d, weighted):
        t_up, t_down, err = [], [], []
        for i, layer in enumerate(model.layers):
            h = inputs[i]
            g, u = F.silu(h @ layer.w_gate.t()), h @ layer.w_up.t()
            first = g.abs() * layer.neuron_scale
            tu = first.flatten().kthvalue(max(1, int((r - d) * first.numel()))).values
            a = (g * u).abs() * (down_norm[i] if weighted else 1.0)
            second = torch.where(first > tu, a, 0.0)
            td = second.flatten().kthvalue(int((r + d) * second.numel())).values
            dense = (g * u) @ layer.w_down_t
            sparse = (g * u * (second > td)) @ layer.w_down_t
            err.append(((sparse - dense).norm() / dense.norm()).item())
            t_up.append(tu.item())
            t_down.append(td.item())
        return t_up, t_down, sum(err) / len(err)

    held = load_documents("lambada", "heldout").texts
    held_windows, _ = pack_documents(loaded.tokenizer, held, seq_len=512, max_tokens=16_384)
    batches = list(pad_batches(held_windows, 8192))
    rule = {}

    index = {id(layer): i for i, layer in enumerate(model.layers)}

    def two_thresholds(layer, h, row_thresholds, active_count, down_count):
        i = index[id(layer)]
        g, u = F.silu(h @ layer.w_gate.t()), h @ layer.w_up.t()
        real = (row_thresholds[0] < torch.inf)[:, None]
        keep_up = (g.abs() * layer.neuron_scale > rule["up"][i]) & real
        a = (g * u).abs() * (down_norm[i] if rule["weighted"] else 1.0)
        keep = keep_up & (a > rule["down"][i])
        if active_count is not None:
            active_count += keep_up.sum().int()
        return (g * keep * u) @ layer.w_down_t

    dense = score_text(model, batches, [0.0] * c.num_layers, progress=False)
    model._mlp_dense = two_thresholds
    rows = [{"r": 0, "d": 0, "weighted": False, "perplexity": dense.perplexity}]
    print(f"dense ppl {dense.perplexity:.3f}")
    for r, d, weighted in CONFIGS:
        with torch.inference_mode():
            t_up, t_down, err = pick(r, d, weighted)
        rule.update(up=t_up, down=t_down, weighted=weighted)
        text = score_text(model, batches, [0.0] * c.num_layers, progress=False)
        rows.append(dict(r=r, d=d, weighted=weighted, perplexity=text.perplexity,
                         up_sparsity=text.mean_sparsity, mean_rel_mlp_error=err))  # fmt: skip
        print(f"r {r:.2f} d {d:.2f} w {int(weighted)}  ppl {text.perplexity:.3f} "
              f"(+{100 * (text.perplexity / dense.perplexity - 1):.1f}%)  up-sparsity "
              f"{text.mean_sparsity:.3f}  rel MLP err {err:.4f}", flush=True)  # fmt: skip
    (out / "probe-split.json").write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
