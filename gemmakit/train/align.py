"""Alignment runs (methods "reward", "dpo", "rl"): data, reference and objective for `train.run`.

Where it sits: `train.run` builds the model, LoRA and wrapping for every method, then asks `setup`
here for the three things an alignment method changes: the loss module (`reward.RewardLoss`,
`dpo.DPOLoss`, `rl.RLLoss`), the batch source (`pairs.PairBatches` or `rl.Rollouts`) and the held-out
batches. The loop, checkpoints, resume and export are the same as for pretraining and SFT.

The checks that make a bad run fail before its first step, each one line: the preference or prompt
file (file:line, from `data.preference`), a reward model whose vocabulary or tokenizer differs from
the policy's, a reference whose architecture differs from the policy's, FSDP for RL (rollouts run on
whole weights), and prompts that leave no room for rl.max_new_tokens.

Key trade-off: the reference is never a live second model in DPO (its log-probs are computed once
and cached, see `dpo`) and not one in RL under LoRA (the base with adapters off); only full-weight RL
keeps a frozen copy, the price of a KL penalty against the starting policy.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from gemmakit.checkpoint import describe, load_model
from gemmakit.config import ModelConfig
from gemmakit.data.preference import read_preference_jsonl, read_prompt_jsonl
from gemmakit.model import Gemma
from gemmakit.tokenizer import Tokenizer
from gemmakit.train import distributed as dist
from gemmakit.train.recipe import Recipe, RecipeError

ALIGN_METHODS = ("reward", "dpo", "rl")


@dataclass
class Setup:
    """What an alignment method contributes to a run."""

    module: nn.Module  # the loss module (unwrapped; run.py wraps it for DDP)
    train: object  # the batch source
    val: Callable | None  # held-out batches, or None
    export_prefix: str  # where the Gemma sits in the loss module's state dict ("model.", ...)


def _autocast(recipe: Recipe, device: torch.device) -> Callable[[], contextlib.AbstractContextManager]:
    if recipe.loop.dtype == "bfloat16":
        return lambda: torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext


def config_diff(a: ModelConfig, b: ModelConfig) -> list[str]:
    """Fields where two configs differ, as "field a != b" strings (empty when they agree)."""
    da, db = dataclasses.asdict(a), dataclasses.asdict(b)
    return [f"{k} {da[k]!r} != {db[k]!r}" for k in da if da[k] != db[k]]


def check_reference(where: str, ref: ModelConfig, policy: ModelConfig) -> None:
    if diff := config_diff(ref, policy):
        more = f" (and {len(diff) - 1} more)" if len(diff) > 1 else ""
        raise RecipeError(f"{where}: the reference's architecture differs from the policy's: {diff[0]}{more}; "
                          "the reference must be the same model (usually the SFT checkpoint)")  # fmt: skip


def _check_vocab(
    where: str, other_cfg: ModelConfig, other_dir: Path, policy: Gemma, tokenizer: Tokenizer
) -> None:
    """A second model scoring the policy's token ids must share its vocabulary (and tokenizer file)."""
    if other_cfg.vocab_size != policy.config.vocab_size:
        raise RecipeError(f"{where}: {other_dir} has a vocabulary of {other_cfg.vocab_size} tokens, the "
                          f"policy's is {policy.config.vocab_size}; it must use the policy's tokenizer")  # fmt: skip
    tok = other_dir / "tokenizer.model"
    if tok.is_file() and Tokenizer.load(tok).sha256 != tokenizer.sha256:
        raise RecipeError(f"{where}: {tok} differs from the policy's tokenizer ({tokenizer.source}); the "
                          "same token ids would mean other text")  # fmt: skip


def _reference_descriptor(recipe: Recipe) -> str:
    """What identifies the reference's weights for the DPO cache without loading them: its directory's
    manifest.json (which lists every weight file's sha256) when it has one, else the path, file sizes
    and mtimes; for the policy's own start, the recipe fields that determine it."""
    path = recipe.reference.path or recipe.model.init_from
    if not path:
        return json.dumps({"preset": recipe.model.preset, "overrides": recipe.model.overrides,
                           "seed": recipe.loop.seed, "init_std": recipe.model.init_std}, sort_keys=True,
                          default=str)  # fmt: skip
    p = Path(path)
    manifest = p / "manifest.json" if p.is_dir() else p.parent / "manifest.json"
    if manifest.is_file():
        return hashlib.sha256(manifest.read_bytes()).hexdigest()
    files = sorted(p.iterdir()) if p.is_dir() else [p]
    return json.dumps([(f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in files if f.is_file()])


def _reference_model(recipe: Recipe, policy: Gemma, tokenizer: Tokenizer, fresh: bool) -> nn.Module:
    """The frozen reference of a full-weight run: reference.path, else the policy itself when it has
    not trained yet (`fresh`), else its starting weights rebuilt. (LoRA runs use the live policy with
    `lora.adapters_disabled` instead: the base, exactly, at no second copy.)"""
    if recipe.reference.path:
        return (
            load_model(recipe.reference.path, dtype=torch.float32).set_attn_impl("sdpa").requires_grad_(False)
        )
    if fresh:
        return policy
    from gemmakit.train.run import build_model

    return build_model(recipe, tokenizer).requires_grad_(False)


def _check_reference_path(recipe: Recipe, policy: Gemma, tokenizer: Tokenizer) -> None:
    """reference.path has the policy's architecture and vocabulary: read from headers and JSON only, and
    checked even when DPO's cache would spare loading it, so a recipe cannot name an unusable reference."""
    if recipe.reference.path:
        cfg = describe(recipe.reference.path)["config"]
        check_reference(f"reference.path {recipe.reference.path}", cfg, policy.config)
        _check_vocab("reference.path", cfg, Path(recipe.reference.path), policy, tokenizer)


def setup(recipe: Recipe, model: Gemma, tokenizer: Tokenizer, run_dir: Path, *, resume: bool,
          device: torch.device) -> Setup:  # fmt: skip
    if recipe.method == "reward":
        return _reward(recipe, model, tokenizer)
    _check_reference_path(recipe, model, tokenizer)
    if recipe.method == "dpo":
        return _dpo(recipe, model, tokenizer, run_dir, resume=resume, device=device)
    return _rl(recipe, model, tokenizer, device=device)


def _pairs(recipe: Recipe, tokenizer: Tokenizer) -> tuple[list, list]:
    from gemmakit.train.pairs import drop_long, encode_pairs
    from gemmakit.train.sft import split_holdout

    d = recipe.data
    train = drop_long(encode_pairs(read_preference_jsonl(d.path), tokenizer, d.path), d.seq_len, d.path)
    held: list = []
    if d.val_path:
        held = drop_long(encode_pairs(read_preference_jsonl(d.val_path), tokenizer, d.val_path), d.seq_len,
                         d.val_path)  # fmt: skip
    elif d.val_fraction:
        train, held = split_holdout(train, d.val_fraction, recipe.loop.seed)
    return train, held


def _pair_loaders(recipe: Recipe, tokenizer: Tokenizer, train: list, held: list, ref: torch.Tensor | None = None,
                  held_ref: torch.Tensor | None = None) -> tuple[object, Callable | None]:  # fmt: skip
    from gemmakit.train.pairs import PairBatches

    d, r, w = recipe.data, dist.rank(), dist.world_size()
    loader = PairBatches(train, d.batch_size, pad_id=tokenizer.pad_id, seed=recipe.loop.seed, rank=r,
                         world_size=w, ref_logps=ref)  # fmt: skip
    val = None
    if held:
        ev = PairBatches(held, min(d.batch_size, len(held)), pad_id=tokenizer.pad_id, rank=r, world_size=w,
                         ref_logps=held_ref)  # fmt: skip
        val = ev.epoch_batches
    return loader, val


def _reward(recipe: Recipe, model: Gemma, tokenizer: Tokenizer) -> Setup:
    from gemmakit.train.reward import RewardLoss, RewardModel

    if recipe.lora.enabled:
        raise RecipeError("lora.enabled: method \"reward\" trains the whole model and its head (LoRA reward "
                          "models are not supported yet)")  # fmt: skip
    rm = RewardModel(model, pad_id=tokenizer.pad_id, seed=recipe.loop.seed)
    train, held = _pairs(recipe, tokenizer)
    loader, val = _pair_loaders(recipe, tokenizer, train, held)
    return Setup(RewardLoss(rm, recipe.reward.center_coef), loader, val, "reward_model.model.")


def _dpo(recipe: Recipe, model: Gemma, tokenizer: Tokenizer, run_dir: Path, *, resume: bool,
         device: torch.device) -> Setup:  # fmt: skip
    from gemmakit.lora import adapters_disabled
    from gemmakit.train.dpo import DPOLoss, cached_reference_logps, compute_reference_logps, data_key

    train, held = _pairs(recipe, tokenizer)
    desc = _reference_descriptor(recipe)
    base = recipe.lora.enabled and not recipe.reference.path  # the reference is the policy, adapters off
    reference: list[nn.Module] = []

    def compute(pairs: list) -> Callable[[], torch.Tensor]:
        def run() -> torch.Tensor:
            if not reference:
                reference.append(
                    model if base else _reference_model(recipe, model, tokenizer, fresh=not resume)
                )
            off = adapters_disabled(model) if base else contextlib.nullcontext()
            with off, _autocast(recipe, device)():
                return compute_reference_logps(reference[0].to(device), pairs, pad_id=tokenizer.pad_id,
                                               batch_size=recipe.data.batch_size,
                                               chunk=recipe.loop.loss_chunk).cpu()  # fmt: skip

        return run

    key = hashlib.sha256(f"{desc}|{data_key(train)}|{recipe.loop.dtype}".encode()).hexdigest()
    ref = cached_reference_logps(run_dir / "reference" / "train_logps.safetensors", key, compute(train),
                                 write=dist.rank() == 0)  # fmt: skip
    held_ref = None
    if held:
        hkey = hashlib.sha256(f"{desc}|{data_key(held)}|{recipe.loop.dtype}".encode()).hexdigest()
        held_ref = cached_reference_logps(run_dir / "reference" / "val_logps.safetensors", hkey, compute(held),
                                          write=dist.rank() == 0)  # fmt: skip
    reference.clear()
    loader, val = _pair_loaders(recipe, tokenizer, train, held, ref, held_ref)
    return Setup(
        DPOLoss(model, recipe.dpo.beta, recipe.dpo.loss, recipe.loop.loss_chunk), loader, val, "model."
    )


def _rl(recipe: Recipe, model: Gemma, tokenizer: Tokenizer, *, device: torch.device) -> Setup:
    from gemmakit.train.reward import load_reward_model
    from gemmakit.train.rl import RLLoss, Rollouts, load_reward_fn, reference_logps

    rl, d = recipe.rl, recipe.data
    if recipe.parallel.mode == "fsdp":
        raise RecipeError("parallel.mode: method \"rl\" runs with none or ddp (rollouts sample from whole "
                          "weights; FSDP shards them)")  # fmt: skip
    if d.val_path or d.val_fraction:
        raise RecipeError("data.val_path / data.val_fraction: method \"rl\" has no held-out loss; evaluate "
                          "the final model with `gemmakit eval` or benchmarks/alignment.py")  # fmt: skip
    rows = read_prompt_jsonl(d.path)
    room = d.seq_len - rl.max_new_tokens
    if room < 1:
        raise RecipeError(f"rl.max_new_tokens: {rl.max_new_tokens} leaves no room for a prompt in data.seq_len "
                          f"{d.seq_len}")  # fmt: skip
    reward_model = None
    if rl.reward_model:
        reward_model = load_reward_model(rl.reward_model, dtype=torch.float32, pad_id=tokenizer.pad_id)
        _check_vocab("rl.reward_model", reward_model.config, Path(rl.reward_model), model, tokenizer)
        reward_model = reward_model.to(device).requires_grad_(False)
        reward_model.model.set_attn_impl("sdpa")
    reward_fn = load_reward_fn(rl.reward_fn) if rl.reward_fn else None
    reference = None
    if rl.beta > 0:
        if recipe.lora.enabled and not recipe.reference.path:
            reference = reference_logps(model, rl.temperature, recipe.loop.loss_chunk, adapters_off=True)
        else:
            ref = _reference_model(recipe, model, tokenizer, fresh=False).to(device).eval()
            reference = reference_logps(ref, rl.temperature, recipe.loop.loss_chunk)
    rollouts = Rollouts(model, tokenizer, rows, k=rl.k, batch_size=d.batch_size, max_new_tokens=rl.max_new_tokens,
                        temperature=rl.temperature, top_k=rl.top_k or None,
                        top_p=rl.top_p if rl.top_p < 1 else None, beta=rl.beta,
                        normalize=rl.normalize_advantages, reference=reference, reward_model=reward_model,
                        reward_fn=reward_fn, reward_model_weight=rl.reward_model_weight,
                        reward_fn_weight=rl.reward_fn_weight, iterations=rl.iterations,
                        grad_accum=recipe.loop.grad_accum, seed=recipe.loop.seed, rank=dist.rank(),
                        world_size=dist.world_size(), chunk=recipe.loop.loss_chunk,
                        autocast=_autocast(recipe, device), max_prompt_len=room)  # fmt: skip
    loss = RLLoss(model, epsilon=rl.epsilon, epsilon_high=rl.epsilon_high or None, level=rl.ratio,
                  temperature=rl.temperature, chunk=recipe.loop.loss_chunk)  # fmt: skip
    return Setup(loss, rollouts, None, "model.")
