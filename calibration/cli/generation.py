"""cats-eval's generative quality: the dense model's greedy generations of the prompt set,
kept to score every configuration against (calibration/generative.py defines the measures)."""

from __future__ import annotations

from cats_serve.calibration.generative import (
    GEN_TOKENS,
    SOURCES,
    agreement,
    encode,
    paired_interval,
    score,
)
from cats_serve.calibration.pairs import threshold_tensor
from cats_serve.server.model.greedy import greedy_generate


class Generative:
    def __init__(self, loaded, prompts, args, progress: bool):
        self.loaded, self.prompts = loaded, prompts
        self.batch, self.progress = args.gen_batch, progress
        tok = loaded.tokenizer
        self.ids = [encode(tok, p) for p in prompts]
        self.eos = loaded.eos_token_ids()
        n = loaded.model.config.num_layers
        self.dense_tokens = self._generate([0.0] * n, "dense")
        self.dense_row: dict | None = None
        self.dense_row = self._row(self.dense_tokens)

    def describe(self) -> dict:
        counts: dict[str, int] = {}
        for p in self.prompts:
            counts[p.source] = counts.get(p.source, 0) + 1
        return {
            "sources": {
                name: f"{task}/{variant} ({kind})" for name, task, variant, kind in SOURCES
            },
            "prompts": counts,
            "tokens": GEN_TOKENS,
            "decoding": "greedy, served prefill and decode (server/model/greedy.py)",
        }

    def row(self, thresholds, name: str) -> dict:
        """The generative figures of one configuration (the dense one is computed once)."""
        t = threshold_tensor(thresholds, self.loaded.model.config.num_layers, "cpu")
        if not bool(t.any()):
            return self.dense_row
        return self._row(self._generate(thresholds, name))

    def _generate(self, thresholds, name: str) -> list[list[int]]:
        model = self.loaded.model
        t = threshold_tensor(thresholds, model.config.num_layers, model.device)
        return greedy_generate(
            model, self.ids, t, max_new_tokens=GEN_TOKENS, batch_size=self.batch,
            progress=self.progress, desc=f"{name} generate",
        )  # fmt: skip

    def _texts(self, tokens: list[list[int]]) -> list[str]:
        tok = self.loaded.tokenizer
        out = []
        for ids in tokens:
            end = next((j for j, t in enumerate(ids) if t in self.eos), len(ids))
            out.append(tok.decode(ids[:end], skip_special_tokens=True))
        return out

    def _row(self, tokens: list[list[int]]) -> dict:
        texts = self._texts(tokens)
        row = score(self.prompts, texts)
        row["agreement"] = agreement(tokens, self.dense_tokens, self.eos)
        if self.dense_row is not None:
            mine = [c == "1" for c in row["correct"]]
            dense = [c == "1" for c in self.dense_row["correct"]]
            row["vs_dense"] = {}
            for kind in ("completion", "chat"):
                idx = [i for i, p in enumerate(self.prompts) if p.kind == kind]
                a, b = [dense[i] for i in idx], [mine[i] for i in idx]
                diff = (sum(b) - sum(a)) / max(len(idx), 1)
                row["vs_dense"][kind] = {"diff": diff, "interval": list(paired_interval(a, b))}
        row["texts"] = texts
        return row
