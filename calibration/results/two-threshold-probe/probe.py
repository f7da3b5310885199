"""The one-off probe that made the reports beside this file (not part of the package).

A second threshold on the down projection: neuron i of a token keeps its W_up row when
|SiLU(g_i)| * s_i > t1 (CATS with the shipped up_rms weights s), and its W_down row only when
also |SiLU(g_i) * u_i| > t2. Per layer, t1 is the s1-quantile of the first score and t2 the
(s1 + s2)-quantile of the second (0 where the first drops the neuron), both over the dense
model's MLP inputs on the shipped files' 32,768 LAMBADA calibration tokens. The model's dense
(score) path is patched with this rule, then cats-eval's own row function measures it on the
table's text and tasks. Each report holds the committed dense row and one probe row, so
`cats-eval --markdown` and `--compare` read them; the row's `realised_sparsity` is the up-row
sparsity and `down_sparsity_all_scored_tokens` the down-row sparsity over every scored token.

    OUT=dir python calibration/results/two-threshold-probe/probe.py   # H200: about 4 minutes
"""

from __future__ import annotations

import json
import os
import types
from pathlib import Path

import torch
import torch.nn.functional as F

from cats_serve.calibration.cli.evaluate import build_parser, evaluate_config
from cats_serve.calibration.tasks import TASKS, load_task
from cats_serve.calibration.text_data import load_documents, pack_documents, pad_batches
from cats_serve.server.model.conversion_cache import default_cache_dir
from cats_serve.server.model.loader import load_pretrained

SPLITS = [(0.5, 0.0), (0.4, 0.2), (0.2, 0.2)]  # (s1, s2); (0.5, 0) is CATS-50% itself
REPO = Path(__file__).resolve().parents[3]
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def main() -> None:
    out = Path(os.environ["OUT"])
    loaded = load_pretrained(
        "SmolLM2-135M-Instruct", device=DEVICE, dtype="float32", cache_dir=default_cache_dir()
    )
    model, c = loaded.model, loaded.model.config
    shipped = loaded.load_thresholds(
        REPO / "calibration/thresholds/SmolLM2-135M-Instruct-uniform-0.50.json"
    )
    model.set_neuron_scale(shipped.neuron_scale)
    scale = [layer.neuron_scale for layer in model.layers]

    texts = load_documents("lambada", "calibration").texts
    windows, _ = pack_documents(loaded.tokenizer, texts, seq_len=512, max_tokens=32_768)
    inputs = [[] for _ in range(c.num_layers)]
    with torch.inference_mode():
        for b in pad_batches(windows, 8192):
            model.score(
                b.tokens.to(DEVICE),
                b.real.to(DEVICE),
                torch.zeros(c.num_layers, device=DEVICE),
                on_mlp_input=lambda i, h: inputs[i].append(h.clone()),
            )
    inputs = [torch.cat(h) for h in inputs]

    def quantiles(s1: float, s2: float) -> tuple[list[float], list[float]]:
        t1, t2 = [], []
        with torch.inference_mode():
            for i, layer in enumerate(model.layers):
                g = F.silu(inputs[i] @ layer.w_gate.t())
                first = (g.abs() * scale[i]).flatten()
                t1.append(first.kthvalue(int(s1 * first.numel())).values.item())
                second = torch.where(
                    first > t1[-1], (g * (inputs[i] @ layer.w_up.t())).abs().flatten(), 0.0
                )
                t2.append(second.kthvalue(int((s1 + s2) * second.numel())).values.item())
        return t1, t2

    rule = {}
    down_active = torch.zeros((), dtype=torch.float64, device=DEVICE)
    scored = [0]

    def two_thresholds(i, h, row_thresholds, active_count):
        layer = model.layers[i]
        g, u = F.silu(h @ layer.w_gate.t()), h @ layer.w_up.t()
        real = (row_thresholds < torch.inf)[:, None]  # padding rows carry an infinite threshold
        keep_up = (g.abs() * scale[i] > rule["t1"][i]) & real
        keep_down = keep_up & ((g * u).abs() > rule["t2"][i])
        if active_count is not None:
            active_count[i] += keep_up.sum().int()
        down_active.add_(keep_down.sum())
        scored[0] += int(real.sum()) if i == 0 else 0
        return (g * keep_down * u) @ layer.w_down_t

    model._mlp_dense = two_thresholds
    held = load_documents("lambada", "heldout").texts
    held_windows, _ = pack_documents(loaded.tokenizer, held, seq_len=512, max_tokens=16_384)
    ppl_batches = list(pad_batches(held_windows, 8192))
    tasks = {t: load_task(t) for t in TASKS}
    report = json.loads((REPO / "calibration/results/eval-dense.json").read_text())
    dense = next(r for r in report["results"] if r["name"] == "dense")
    args = build_parser().parse_args(["--batch-tokens", "8192"])
    for s1, s2 in SPLITS:
        t1, t2 = quantiles(s1, s2)
        rule.update(t1=t1, t2=t2 if s2 > 0 else [-1.0] * c.num_layers)
        down_active.zero_()
        scored[0] = 0
        file = types.SimpleNamespace(
            thresholds=[0.0] * c.num_layers, neuron_scale=shipped.neuron_scale, criterion="up_rms"
        )
        name = f"two-threshold up {s1:.2f} down +{s2:.2f}"
        row = evaluate_config(loaded, name, file, ppl_batches, tasks, args, False)
        neurons = scored[0] * c.num_layers * c.intermediate_size
        row["down_sparsity_all_scored_tokens"] = 1 - float(down_active) / neurons
        row["probe"] = {"s1": s1, "s2": s2, "t1": rule["t1"], "t2": rule["t2"]}
        report["results"] = [dense, row]
        (out / f"eval-two-threshold-{s1:.2f}-{s2:.2f}.json").write_text(json.dumps(report))
        print(name, f"ppl {row['perplexity']:.3f}", f"acc {100 * row['avg_acc']:.2f}", flush=True)


if __name__ == "__main__":
    main()
