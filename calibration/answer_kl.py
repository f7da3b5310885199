"""How far CATS moves the model's answers: the allocated mode's second divergence, and the
answer diagnostics of `cats-eval --divergence`.

On multiple-choice questions of tasks that are not evaluated (`tasks.qa_questions`: the
calibration split for the allocated mode, the held-out split for cats-eval), every choice is
scored as the zero-shot tasks score it (summed log-probability of its continuation after the
context), and a softmax over a question's choices gives the model's answer distribution. The
divergence is KL(dense answers || sparse answers), averaged over the questions; `accuracy` and
`priors` (the mean answer distribution of questions sharing their answers) read the same
distributions.

Next-token KL over text weighs every token of the vocabulary alike; a task's accuracy turns on
small differences between a few continuations (" Yes" against " No", five short answers), and a
sparse model can keep most of its next-token distribution yet shift its answers. This measures
that shift directly.
"""

from __future__ import annotations

import itertools

import torch

from cats_serve.calibration.evaluate import choice_logliks, encode_examples
from cats_serve.calibration.tasks import Example

MAX_QUESTION_TOKENS = 256  # a question's context is cut to its last tokens (passages run long)


class AnswerKL:
    """Dense answer distributions of some questions, kept to measure sparse runs against."""

    def __init__(self, model, tokenizer, questions: list[Example], *, batch_tokens: int):
        if not questions:
            raise ValueError("no questions to measure the answer KL on")
        self.model = model
        self.encoded = encode_examples(
            tokenizer, questions, batch_tokens=batch_tokens, max_len=MAX_QUESTION_TOKENS
        )
        self.examples = questions
        self.index = torch.tensor(self.encoded.example, dtype=torch.int64)
        # each question's first row in answer_logp's output (its choices follow it)
        sizes = (len(q.choices) for q in questions[:-1])
        self.first_rows = list(itertools.accumulate(sizes, initial=0))
        self.dense = self.answer_logp([0.0] * model.config.num_layers)

    @property
    def questions(self) -> int:
        return len(self.examples)

    @property
    def tokens(self) -> int:
        return sum(len(ids) for ids in self.encoded.ids)

    def answer_logp(self, thresholds) -> torch.Tensor:
        """Per choice: log-probability of that answer among its question's choices."""
        ll = torch.tensor(
            choice_logliks(self.model, self.encoded, thresholds, progress=False),
            dtype=torch.float64,
        )
        top = torch.full((self.questions,), -torch.inf, dtype=torch.float64)
        top = top.scatter_reduce(0, self.index, ll, "amax")
        shifted = ll - top[self.index]
        norm = torch.zeros(self.questions, dtype=torch.float64)
        norm = norm.index_add(0, self.index, shifted.exp())
        return shifted - norm.log()[self.index]

    def kl(self, thresholds) -> float:
        """Mean over questions of KL(dense answers || answers under `thresholds` [L])."""
        return self.kl_of(self.answer_logp(thresholds))

    def kl_of(self, logp: torch.Tensor) -> float:
        """The same, from answer log-probabilities already measured (`answer_logp`)."""
        return float((self.dense.exp() * (self.dense - logp)).sum()) / self.questions

    def priors(self, logp: torch.Tensor) -> dict[str, list[float]]:
        """Where several questions share one answer set (" Yes" / " No"): the mean over them of
        the answer distribution under `logp`, the model's lean toward each answer whatever the
        question. Keyed by the answers joined with "/"; answer sets of one question are left
        out (a mean over one question is that question's distribution)."""
        rows: dict[tuple[str, ...], list[int]] = {}
        for ex, first in zip(self.examples, self.first_rows, strict=True):
            rows.setdefault(tuple(c.continuation for c in ex.choices), []).append(first)
        probs = logp.exp()
        return {
            "/".join(answers): [
                float(probs[[f + k for f in firsts]].mean()) for k in range(len(answers))
            ]
            for answers, firsts in rows.items()
            if len(firsts) > 1
        }

    def accuracy(self, logp: torch.Tensor) -> dict[str, float]:
        """Share of questions whose top answer under `logp` (from `answer_logp`, or `dense`) is
        the labelled one, the first on ties: over "all" and per source task."""
        right: dict[str, list[bool]] = {"all": []}
        for ex, first in zip(self.examples, self.first_rows, strict=True):
            hit = int(logp[first : first + len(ex.choices)].argmax()) == ex.label
            right["all"].append(hit)
            if ex.source:
                right.setdefault(ex.source, []).append(hit)
        return {k: sum(v) / len(v) for k, v in right.items()}
