"""Pairwise judging: a model says which of two answers to the same prompt is better, position-debiased.

Where it sits: `gemmakit eval --judge MODEL --compare A.jsonl B.jsonl` and `benchmarks/alignment.py`
(win rates of the aligned nano models against the SFT one, and RL settings against each other) call
`compare`; the human side-by-side workflow reuses it as its auto-rater. Two kinds of judge:

- a reward model (`train.reward`, any HF `Gemma*ForSequenceClassification` with one label): each
  answer is scored alone, P(A better) = sigmoid(r_A - r_B); order cannot matter, by construction;
- a generative model (any Gemma chat model): asked "Which answer is better? Reply with A or B." with
  the answers in both orders; P(A better) is the mean of P("A") in the first order and P("B") in the
  swapped one, each the softmax over just the "A" and "B" logits at the reply's first position (the
  LLM-Comparator practice of running both orders). `consistent` says whether both orders agreed.

A judgement is a win for A when P > 0.5 + tie_band, a loss below 0.5 - tie_band, else a tie; the
win rate counts ties as half (the Gemma report's convention), with a standard error over prompts.

Key trade-off: a judge is only as good as its model: a 14M reward model trained on generated pairs
knows the skills those pairs teach, and a small generative judge is close to chance; the numbers say
which judge produced them (`judge` in the result) so they are never mistaken for human ratings.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch

from gemmakit.chat import render
from gemmakit.errors import UserError
from gemmakit.infer import Engine
from gemmakit.infer.engine import left_pad
from gemmakit.jsonl import read_jsonl
from gemmakit.tokenizer import Tokenizer

TEMPLATE = ("Which answer to the question is better? Reply with A or B.\n\nQuestion: {question}\n\n"
            "Answer A: {a}\n\nAnswer B: {b}")  # fmt: skip


class JudgeError(UserError):
    """A judge or its inputs are unusable; the message names the file or model."""


class Judge(Protocol):
    name: str

    def prefer(self, prompts: Sequence[list[dict]], a: Sequence[str], b: Sequence[str]
               ) -> tuple[list[float], list[bool]]: ...  # fmt: skip


def _question(messages: list[dict]) -> str:
    return "\n".join(m["content"] for m in messages if m.get("role") == "user")


class RewardModelJudge:
    """P(A better) = sigmoid(r_A - r_B) from a reward model's scores of prompt + answer."""

    def __init__(
        self, rm: Any, tokenizer: Tokenizer, name: str = "reward model", batch_size: int = 16
    ) -> None:
        self.rm, self.tokenizer, self.name, self.batch_size = rm, tokenizer, name, batch_size

    def _ids(self, prompt: list[dict], answer: str) -> list[int]:
        from gemmakit.train.pairs import completion_ids

        p = render(self.tokenizer, prompt, add_generation_prompt=True).tokens
        return p + completion_ids(
            self.tokenizer, prompt, [{"role": "assistant", "content": answer}], p, "judge"
        )

    def prefer(self, prompts: Sequence[list[dict]], a: Sequence[str], b: Sequence[str]
               ) -> tuple[list[float], list[bool]]:  # fmt: skip
        from gemmakit.train.reward import score_sequences

        seqs = [self._ids(p, x) for p, x in zip(prompts, a, strict=True)]
        seqs += [self._ids(p, x) for p, x in zip(prompts, b, strict=True)]
        s = score_sequences(self.rm, seqs, self.batch_size)
        n = len(prompts)
        return [1 / (1 + math.exp(s[n + i] - s[i])) for i in range(n)], [True] * n


class GenerativeJudge:
    """A chat model asked for "A" or "B", both orders averaged (position bias cancels to first order)."""

    def __init__(
        self, model: Any, tokenizer: Tokenizer, name: str = "generative", batch_size: int = 8
    ) -> None:
        self.model, self.tokenizer, self.name, self.batch_size = model, tokenizer, name, batch_size
        ids = [tokenizer.encode(x, bos=False) for x in ("A", "B")]
        if any(len(i) != 1 for i in ids):
            raise JudgeError(f"judge {name}: 'A' and 'B' are not single tokens of its tokenizer")
        self.a_id, self.b_id = ids[0][0], ids[1][0]

    @torch.no_grad()
    def _p_first(self, questions: list[str], first: list[str], second: list[str]) -> list[float]:
        """P("A") against P("B") at the reply's first token, for each (question, A = first, B = second)."""
        engine, out = Engine(self.model), []
        prompts = [render(self.tokenizer, [{"role": "user", "content": TEMPLATE.format(question=q, a=x, b=y)}]
                          ).tokens for q, x, y in zip(questions, first, second, strict=True)]  # fmt: skip
        for s in range(0, len(prompts), self.batch_size):
            rows = prompts[s : s + self.batch_size]
            tokens, positions = left_pad(rows, engine.device)
            cache = engine.new_cache(len(rows), tokens.shape[1])
            logits = engine.prefill(tokens, positions, cache).float()
            two = torch.stack([logits[:, self.a_id], logits[:, self.b_id]], 1).softmax(1)
            out += two[:, 0].tolist()
        return out

    def prefer(self, prompts: Sequence[list[dict]], a: Sequence[str], b: Sequence[str]
               ) -> tuple[list[float], list[bool]]:  # fmt: skip
        q = [_question(p) for p in prompts]
        forward = self._p_first(q, list(a), list(b))  # P(a) with a shown first
        swapped = self._p_first(q, list(b), list(a))  # P(b) with b shown first
        p = [(f + (1 - s)) / 2 for f, s in zip(forward, swapped, strict=True)]
        return p, [(f > 0.5) == (s < 0.5) for f, s in zip(forward, swapped, strict=True)]


def load_judge(path: str | Path, *, batch_size: int = 8) -> Judge:
    """A RewardModelJudge for a sequence-classification directory, else a GenerativeJudge."""
    from gemmakit.checkpoint import load_model
    from gemmakit.train.reward import load_reward_model

    path = Path(path)
    tokenizer = Tokenizer.load(path)
    arch = []
    if (path / "config.json").is_file():
        try:
            arch = json.loads((path / "config.json").read_text(encoding="utf-8")).get("architectures") or []
        except (ValueError, OSError, AttributeError):
            arch = []
    if any(str(a).endswith("ForSequenceClassification") for a in arch):
        rm = load_reward_model(path, pad_id=tokenizer.pad_id)
        rm.model.set_attn_impl("sdpa")
        return RewardModelJudge(rm, tokenizer, name=f"reward model {path}", batch_size=batch_size)
    model = load_model(path, dtype=torch.float32).set_attn_impl("sdpa")
    return GenerativeJudge(model, tokenizer, name=f"generative {path}", batch_size=batch_size)


@dataclass
class Comparison:
    """A's record against B over the same prompts."""

    judge: str
    n: int
    wins: int
    ties: int
    losses: int
    win_rate: float  # (wins + ties / 2) / n
    stderr: float  # of the win rate, over prompts
    position_consistency: float  # fraction of prompts where both orders agreed (1 for reward models)
    p: list[float] = field(default_factory=list)  # P(A better) per prompt

    def as_dict(self) -> dict:
        return {k: v for k, v in self.__dict__.items()}


def compare(judge: Judge, prompts: Sequence[list[dict]], a: Sequence[str], b: Sequence[str],
            tie_band: float = 0.05) -> Comparison:  # fmt: skip
    """Judge A against B on every prompt; win/tie/loss by `tie_band` around 0.5."""
    if not (len(prompts) == len(a) == len(b)) or not prompts:
        raise JudgeError(
            f"compare: {len(prompts)} prompts, {len(a)} and {len(b)} answers; expected equal, > 0"
        )
    p, consistent = judge.prefer(prompts, a, b)
    score = [1.0 if x > 0.5 + tie_band else 0.0 if x < 0.5 - tie_band else 0.5 for x in p]
    n = len(score)
    mean = sum(score) / n
    var = sum((s - mean) ** 2 for s in score) / (n - 1) if n > 1 else 0.0
    return Comparison(judge.name, n, score.count(1.0), score.count(0.5), score.count(0.0), mean,
                      math.sqrt(var / n), sum(consistent) / n, p)  # fmt: skip


def read_answers(path: str | Path) -> tuple[list[list[dict]], list[str]]:
    """(prompts, answers) from JSONL rows {"prompt": str or messages, "answer": str}; errors name file:line."""
    prompts, answers = [], []
    for row, where in read_jsonl(path, JudgeError, "answers"):
        if not isinstance(row, dict) or not isinstance(row.get("answer"), str):
            raise JudgeError(f'{where}: expected {{"prompt": ..., "answer": "..."}}')
        prompt = row.get("prompt")
        if isinstance(prompt, str):
            prompt = [{"role": "user", "content": prompt}]
        if not (isinstance(prompt, list) and prompt and all(isinstance(m, dict) and isinstance(m.get("content"), str)
                                                           for m in prompt)):  # fmt: skip
            raise JudgeError(f"{where}: prompt: expected a string or a list of {{role, content}} messages")
        prompts.append(prompt)
        answers.append(row["answer"])
    return prompts, answers
