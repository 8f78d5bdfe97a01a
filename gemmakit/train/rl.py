"""Reinforcement learning from rewards: RLOO (the default) or per-token PPO-style clipping, in the one loop.

Where it sits: `train.run` builds `Rollouts` (the batch source) and `RLLoss` (the objective) for
recipes with method "rl". Each micro-batch, `Rollouts` takes B prompts (`data.preference`'s prompt
rows), samples k completions of each with `infer.Engine` (KV cache, one batched call, seeded),
scores them (a reward model, a `module:function`, or both summed), subtracts the KL penalty and
computes leave-one-out advantages; `loop.fit` then trains `RLLoss` on that batch like any other.

The numbers (TRL's RLOOTrainer at the pinned version, reference §2.3):
- completion mask: the sampled tokens up to and including the stop token (the turn-end id:
  <end_of_turn>, 106 in Gemma 3's layout, 107 in Gemma 1/2's; <eos> also ends a row), and every
  sampled token of a row that hit max_new_tokens;
- log-probs use logits divided by the sampling temperature, in the policy, the old policy and the
  reference alike;
- shaped reward `r_i - beta * sum_t mask * (log pi_old - log pi_ref)` (no gradient; the per-token
  first-order estimator, which can be negative);
- advantage `A_i = r_i - mean of the other k-1 rewards of the same prompt` (NaN-aware: an unscorable
  completion, every reward None, gets A = 0 and is left out of its siblings' baselines);
  optionally normalised over the micro-batch (TRL: over the gathered global batch);
- "sequence" ratio (RLOO): `rho = exp(sum_t mask log pi - sum_t mask log pi_old)`, loss
  `-min(rho A, clip(rho, 1 - eps, 1 + eps_high) A)` per sequence; "token" ratio (PPO / GRPO-style):
  the same per token, averaged over each sequence's completion tokens. Both summed over sequences;
  the loop divides by the sequences of the step.
With `iterations` 1 the old policy is the policy itself (rho = 1 in value, the gradient is
REINFORCE with the leave-one-out baseline); with more, the same rollouts train `iterations` steps
and the clip matters.

The reference: with LoRA, the policy with its adapters switched off (`lora.adapters_disabled`: the
frozen base exactly, no second copy); otherwise a frozen copy of the starting weights (or of
`reference.path`).

Key trade-off: rollouts are generated in-process, in lockstep with training, by the same weights
(no separate inference server, no stale policy) at the price that generation, the slowest part on
a CPU, does not overlap the backward. Exact resume: rollout seeds are a pure function of
(loop.seed, rank, micro-batch counter), so a run killed and resumed samples the same completions.
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import math
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from gemmakit.chat import render
from gemmakit.data.preference import PromptRow
from gemmakit.errors import UserError
from gemmakit.infer import Engine
from gemmakit.tokenizer import Tokenizer
from gemmakit.train.objectives import token_logps
from gemmakit.train.reward import RewardModel
from gemmakit.train.sft import ChatBatches

log = logging.getLogger(__name__)

RATIO_LEVELS = ("sequence", "token")
RewardFn = Callable[..., list]


class RLError(UserError):
    """An RL run cannot be set up (reward function, prompts, reward model); one line, names the value."""


def load_reward_fn(spec: str) -> RewardFn:
    """`package.module:function` imported and checked callable; the function is called as
    fn(prompts=list of message lists, completions=list of str, **columns) -> list of float or None."""
    mod_name, sep, fn_name = spec.partition(":")
    if not sep or not mod_name or not fn_name:
        raise RLError(f"rl.reward_fn: expected 'module:function', got {spec!r}")
    try:
        module = importlib.import_module(mod_name)
    except ImportError as e:
        raise RLError(f"rl.reward_fn: cannot import {mod_name!r} ({e})") from None
    fn = getattr(module, fn_name, None)
    if not callable(fn):
        raise RLError(f"rl.reward_fn: {mod_name!r} has no function {fn_name!r}")
    return fn


def leave_one_out(rewards: torch.Tensor, k: int, normalize: bool = False) -> torch.Tensor:
    """Advantages of (N,) rewards in consecutive groups of k: r_i minus the mean of its scorable siblings."""
    g = rewards.view(-1, k)
    scorable = (~torch.isnan(g)).sum(1, keepdim=True)
    total = torch.nansum(g, 1, keepdim=True)
    adv = (rewards - ((total - g) / (scorable - 1)).view(-1)) if k > 1 else torch.zeros_like(rewards)
    if normalize:
        valid = adv[~torch.isnan(adv)]
        std = valid.std() if valid.numel() > 1 else torch.tensor(float("nan"))
        adv = (adv - valid.mean()) / (std + 1e-4)
    return torch.nan_to_num(adv, nan=0.0)


class RLLoss(nn.Module):
    """The clipped policy-gradient objective as a loss module for `loop.fit` (units: sequences)."""

    def __init__(self, model: nn.Module, *, epsilon: float = 0.2, epsilon_high: float | None = None,
                 level: str = "sequence", temperature: float = 1.0, chunk: int = 256) -> None:  # fmt: skip
        super().__init__()
        if level not in RATIO_LEVELS:
            raise ValueError(f"level: expected one of {RATIO_LEVELS}, got {level!r}")
        self.model, self.level, self.temperature, self.chunk = model, level, temperature, chunk
        self.low, self.high = 1 - epsilon, 1 + (epsilon if epsilon_high is None else epsilon_high)

    unit_name = "sequences"  # the metrics key of the step's count

    @staticmethod
    def units(batch: dict[str, torch.Tensor]) -> int:
        return batch["tokens"].shape[0]

    def forward(self, tokens: torch.Tensor, completion_mask: torch.Tensor, old_logps: torch.Tensor,
                advantages: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:  # fmt: skip
        logp, entropy = token_logps(self.model, tokens, temperature=self.temperature, chunk=self.chunk)
        m = completion_mask[:, 1:].to(logp.dtype)
        n_tok = m.sum(-1).clamp(min=1.0)
        if self.level == "sequence":
            ratio = torch.exp((logp * m).sum(-1) - (old_logps * m).sum(-1))  # (N,)
            a = advantages
        else:
            ratio = torch.exp(logp - old_logps)  # (N, T-1)
            a = advantages[:, None]
        per = -torch.min(ratio * a, ratio.clamp(self.low, self.high) * a)
        loss = per if self.level == "sequence" else (per * m).sum(-1) / n_tok
        with torch.no_grad():
            low = ((ratio < self.low) & (a < 0)).float()
            high = ((ratio > self.high) & (a > 0)).float()
            if self.level == "token":  # the fraction of each sequence's tokens, as a per-sequence number
                low, high = (low * m).sum(-1) / n_tok, (high * m).sum(-1) / n_tok
            stats = {"clip_low": low.sum(), "clip_high": high.sum(), "clip_fraction": (low + high).sum(),
                     "entropy": ((entropy * m).sum(-1) / n_tok).sum()}  # fmt: skip
        return loss.sum(), stats


# ---- rollouts ---------------------------------------------------------------------------------------------


class _PromptOrder(ChatBatches):
    """ChatBatches' seeded, rank-disjoint, resumable order over prompt indices (nothing to cut)."""

    def too_long(self, example: object) -> bool:
        return False


class Rollouts:
    """The RL batch source: per micro-batch B prompts x k sampled completions, scored, with advantages.

    A batch: "tokens" (B*k, W) prompt + completion right-padded, "completion_mask" (B*k, W),
    "old_logps" (B*k, W-1) per-token log-probs of the sampling policy, "advantages" (B*k,). With
    `iterations` > 1 the rollouts of one optimizer step (grad_accum micro-batches) are served again for
    the next iterations-1 steps. Prompts are visited in a seeded per-epoch order, rank-disjoint.
    """

    def __init__(self, policy: nn.Module, tokenizer: Tokenizer, prompts: list[PromptRow], *, k: int,
                 batch_size: int, max_new_tokens: int, temperature: float = 1.0, top_k: int | None = None,
                 top_p: float | None = None, beta: float = 0.05, normalize: bool = False,
                 reference: Callable[[torch.Tensor], torch.Tensor] | None = None,
                 reward_model: RewardModel | None = None, reward_fn: RewardFn | None = None,
                 reward_model_weight: float = 1.0, reward_fn_weight: float = 1.0, iterations: int = 1,
                 grad_accum: int = 1, seed: int = 0, rank: int = 0, world_size: int = 1, chunk: int = 256,
                 autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
                 max_prompt_len: int | None = None) -> None:  # fmt: skip
        if reward_model is None and reward_fn is None:
            raise RLError("rl: no reward: set rl.reward_model (a reward model directory), rl.reward_fn "
                          "('module:function') or both")  # fmt: skip
        self.policy, self.tokenizer, self.rows = policy, tokenizer, prompts
        self.k, self.max_new_tokens, self.temperature, self.top_k, self.top_p = (
            k, max_new_tokens, temperature, top_k, top_p)  # fmt: skip
        self.beta, self.normalize, self.reference = beta, normalize, reference
        self.reward_model, self.reward_fn = reward_model, reward_fn
        self.w_rm, self.w_fn = reward_model_weight, reward_fn_weight
        self.iterations, self.grad_accum, self.seed, self.rank = iterations, grad_accum, seed, rank
        self.chunk, self.autocast = chunk, autocast
        self.stops = sorted({tokenizer.end_of_turn_id, *tokenizer.stop_ids})
        ids = [render(tokenizer, list(r.messages), add_generation_prompt=True).tokens for r in prompts]
        if max_prompt_len is not None:
            keep = [i for i, p in enumerate(ids) if len(p) <= max_prompt_len]
            if len(keep) < len(ids):
                log.warning("%d of %d prompts are longer than %d tokens (data.seq_len - rl.max_new_tokens) and "
                            "are dropped", len(ids) - len(keep), len(ids), max_prompt_len)  # fmt: skip
            if not keep:
                raise RLError(f"every prompt is longer than {max_prompt_len} tokens (data.seq_len - "
                              "rl.max_new_tokens)")  # fmt: skip
            prompts, ids = [prompts[i] for i in keep], [ids[i] for i in keep]
        self.rows, self.prompt_ids = prompts, ids
        self.order = _PromptOrder(list(range(len(prompts))), 1 << 30, batch_size, pad_id=tokenizer.pad_id,
                                 seed=seed, rank=rank, world_size=world_size)  # fmt: skip
        self.calls = 0  # micro-batches served: the rollout seed and the reuse schedule derive from it
        self._buffer: list[dict[str, torch.Tensor]] = []
        self._metrics: list[dict[str, float]] = []

    # -- Batches protocol ------------------------------------------------------------------------------------
    def next_batch(self) -> dict[str, torch.Tensor]:
        period = self.grad_accum * self.iterations
        j = self.calls % period
        if j == 0:
            self._buffer, self._metrics = [], []
        if j < self.grad_accum:  # the first pass of a period generates; the others replay it
            indices = self.order.next_indices()
            batch, metrics = self.rollout(indices, self._seed(self.calls))
            self._buffer.append(batch)
            self._metrics.append(metrics)
        batch = self._buffer[j % self.grad_accum]
        self.calls += 1
        return batch

    def state_dict(self) -> dict:
        return {"calls": self.calls, "order": self.order.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        calls = state.get("calls")
        if not isinstance(calls, int) or calls < 0:
            raise RLError(f"loader state: calls is {calls!r}, expected an integer >= 0")
        if calls % (self.grad_accum * self.iterations):  # the replayed rollouts are not in the checkpoint
            raise RLError(f"loader state: calls {calls} is inside an iterations period of "
                          f"{self.grad_accum * self.iterations} micro-batches")  # fmt: skip
        self.order.load_state_dict(state.get("order") or {})
        self.calls = calls

    def metrics(self) -> dict[str, float]:
        """Means over this step's rollouts (the loop merges them into the step's record)."""
        if not self._metrics:
            return {}
        keys = self._metrics[0].keys()
        return {k: sum(m[k] for m in self._metrics) / len(self._metrics) for k in keys}

    def _seed(self, call: int) -> int:
        return ((self.seed * 1_000_003 + self.rank) * 1_000_003 + call) % (1 << 63)

    # -- one rollout -----------------------------------------------------------------------------------------
    @torch.no_grad()
    def rollout(self, indices: list[int], seed: int) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
        """Sample, score and compute advantages for prompts `indices` (k completions each)."""
        rows = [i for i in indices for _ in range(self.k)]
        prompts = [self.prompt_ids[i] for i in rows]
        was = self.policy.training
        self.policy.eval()
        try:
            with self.autocast():
                completions = Engine(self.policy).generate(
                    prompts,
                    self.max_new_tokens,
                    self.temperature,
                    self.top_k,
                    self.top_p,
                    seed,
                    self.stops,
                    include_stop=True,
                )
            tokens, mask = self._pack(prompts, completions)
            with self.autocast():
                old, _ = token_logps(self.policy, tokens, temperature=self.temperature, chunk=self.chunk)
                ref = self.reference(tokens) if self.reference is not None and self.beta else None
        finally:
            self.policy.train(was)
        m = mask[:, 1:].float()
        rewards, parts = self._rewards(rows, tokens, completions)
        kl_tok = ((old - ref) * m) if ref is not None else torch.zeros_like(m)
        shaped = rewards - self.beta * kl_tok.sum(-1)
        adv = leave_one_out(shaped, self.k, self.normalize)
        stopped = torch.tensor([bool(c) and c[-1] in self.stops for c in completions], dtype=torch.float32)
        lengths = torch.tensor([len(c) for c in completions], dtype=torch.float32)
        finite = rewards[~torch.isnan(rewards)]
        group_std = torch.nan_to_num(rewards.view(-1, self.k).std(1), nan=0.0)
        metrics = {"reward": _mean(finite), "reward_std": float(finite.std()) if finite.numel() > 1 else 0.0,
                   "kl": float(kl_tok.sum() / m.sum().clamp(min=1.0)), "completion_length": float(lengths.mean()),
                   "terminated": float(stopped.mean()), "frac_reward_zero_std": float((group_std == 0).float().mean())}  # fmt: skip
        metrics.update(parts)
        return {
            "tokens": tokens,
            "completion_mask": mask,
            "old_logps": old.float(),
            "advantages": adv,
        }, metrics

    def _pack(
        self, prompts: list[list[int]], completions: list[list[int]]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        width = max(len(p) + max(len(c), 1) for p, c in zip(prompts, completions, strict=True))
        tokens = torch.full((len(prompts), width), self.tokenizer.pad_id, dtype=torch.long)
        mask = torch.zeros((len(prompts), width), dtype=torch.long)
        for r, (p, c) in enumerate(zip(prompts, completions, strict=True)):
            tokens[r, : len(p) + len(c)] = torch.tensor(p + c, dtype=torch.long)
            mask[r, len(p) : len(p) + len(c)] = 1
        return tokens, mask

    def _rewards(self, rows: list[int], tokens: torch.Tensor, completions: list[list[int]]
                 ) -> tuple[torch.Tensor, dict[str, float]]:  # fmt: skip
        """(N,) total reward (NaN where no source could score) and the per-source means for the log."""
        parts: dict[str, float] = {}
        columns = []
        if self.reward_model is not None:
            self.reward_model.eval()
            score = self.reward_model(tokens).float()
            parts["rewards/model"] = float(score.mean())
            columns.append(score * self.w_rm)
        if self.reward_fn is not None:
            texts = [self.tokenizer.decode([t for t in c if t not in self.stops]) for c in completions]
            messages = [[dict(m) for m in self.rows[i].messages] for i in rows]
            keys = sorted({k for i in rows for k in self.rows[i].extra})
            extra = {k: [self.rows[i].extra.get(k) for i in rows] for k in keys}
            got = self.reward_fn(prompts=messages, completions=texts, **extra)
            values = _check_rewards(got, len(rows))
            parts["rewards/fn"] = _mean(values[~torch.isnan(values)])
            columns.append(values * self.w_fn)
        stacked = torch.stack(columns, 1)
        total = torch.nansum(stacked, 1)
        total[torch.isnan(stacked).all(1)] = float("nan")
        return total, parts


def _check_rewards(got: Any, n: int) -> torch.Tensor:
    if not isinstance(got, list | tuple) or len(got) != n:
        size = len(got) if isinstance(got, list | tuple) else type(got).__name__
        raise RLError(f"rl.reward_fn: returned {size}; expected a list of {n} floats or None")
    out = []
    for v in got:
        if v is None:
            out.append(math.nan)
        elif isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v):
            raise RLError(f"rl.reward_fn: returned {v!r}; expected finite numbers or None")
        else:
            out.append(float(v))
    return torch.tensor(out, dtype=torch.float32)


def _mean(t: torch.Tensor) -> float:
    return float(t.mean()) if t.numel() else float("nan")


def reference_logps(model: nn.Module, temperature: float, chunk: int = 256, *, adapters_off: bool = False
                    ) -> Callable[[torch.Tensor], torch.Tensor]:  # fmt: skip
    """tokens -> per-token log-probs under the frozen reference (no gradient): `model` itself, or with
    `adapters_off` the LoRA policy's base (adapters switched off for the forward, back on after)."""
    from gemmakit.lora import adapters_disabled

    def ref(tokens: torch.Tensor) -> torch.Tensor:
        with torch.no_grad(), adapters_disabled(model) if adapters_off else contextlib.nullcontext():
            return token_logps(model, tokens, temperature=temperature, chunk=chunk)[0]

    return ref
