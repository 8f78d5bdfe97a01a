"""THE training loop: every method (pretraining, SFT, LoRA, reward models, DPO, RL) runs through `fit`.

Where it sits: `train.run` builds a loss module (`objectives.NextTokenLoss` around the model, or
`reward.RewardLoss`, `dpo.DPOLoss`, `rl.RLLoss`; maybe wrapped by DDP / FSDP2) and batch sources,
then calls `fit`. Methods differ only in the batches they give and the objective; accumulation,
clipping, the schedule, non-finite halting, metrics, evaluation and checkpoints live here once
(litgpt#1073 / torchtune#2307: per-recipe loops drift).

A loss module's forward takes a batch's tensors as keyword arguments and returns the loss SUM over
its units (or that and a dict of statistic sums, logged as per-unit means); its `units(batch)` says
what the sum counts: target tokens (the default), preference pairs, or RL sequences. A batch source
with a `metrics()` method (RL rollouts: reward, KL, lengths) adds those to each step's record.

One optimizer step: draw `grad_accum` micro-batches, count their units over all ranks,
backpropagate each micro-batch's loss SUM divided by that global count (times the world size,
because DDP / FSDP average gradients over ranks), so the gradient is that of the global per-unit
mean whatever the split. Then the global gradient norm is computed and clipped; a non-finite loss
or norm halts BEFORE `optimizer.step()` (torchtitan#916: skipping hides bugs), naming the step and
the last good checkpoint, and nothing is saved after it.

Key trade-off: exact resume over speed: the RNG states of every rank, the loader positions and the
optimizer state are checkpointed, and the learning rate is a pure function of the step, so a run
killed at step N and resumed reproduces the uninterrupted run's losses bit for bit on CPU.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import random
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from gemmakit.artifact import write_json
from gemmakit.errors import UserError
from gemmakit.train import checkpoints as ckpt
from gemmakit.train import distributed as dist
from gemmakit.train.objectives import count_targets
from gemmakit.train.optim import lr_at, make_optimizer
from gemmakit.train.recipe import Recipe

log = logging.getLogger(__name__)


class TrainError(UserError, RuntimeError):
    """Training cannot go on; the message names the step and what to do."""


class NonFiniteError(TrainError):
    """A non-finite loss or gradient norm: the loop stopped before the optimizer step."""


class Batches(Protocol):
    """A resumable source of micro-batches: dicts of CPU tensors, the loss module's keyword arguments
    ("tokens" (B, T+1) and maybe "loss_mask" for next-token losses)."""

    def next_batch(self) -> dict[str, torch.Tensor]: ...
    def state_dict(self) -> dict: ...
    def load_state_dict(self, state: dict) -> None: ...


@dataclass
class Hooks:
    """What a run adds around the loop; every field optional."""

    # Held-out batches for evaluation (called anew each time, so it yields the same batches).
    val_batches: Callable[[], Iterable[dict[str, torch.Tensor]]] | None = None
    # Writes the model (full state dict on CPU, internal names) in a readable format into a directory.
    export: Callable[[dict[str, torch.Tensor], Path], None] | None = None
    # Called on rank 0 with each metrics record (the CLI prints a progress line from it).
    on_log: Callable[[dict], None] | None = None
    # Called before every micro-batch forward with (step, micro index); tests inject faults here.
    on_micro: Callable[[int, int], None] | None = None
    # Identifies the run; a checkpoint whose fingerprint differs is refused on resume.
    fingerprint: dict | None = None


@dataclass
class Result:
    steps: int  # optimizer steps completed in total
    losses: list[float]  # the loss of every step this call ran
    last_checkpoint: Path | None
    final_val_loss: float | None
    target_tokens: int = 0  # tokens that carried loss over the steps this call ran (all ranks)


# ---- state that makes resume exact --------------------------------------------------------------------


def rng_state() -> dict[str, Any]:
    np_state = np.random.get_state()
    state = {"python": random.getstate(), "numpy": [np_state[0], torch.from_numpy(np_state[1].copy()),
             int(np_state[2]), int(np_state[3]), float(np_state[4])], "torch": torch.get_rng_state()}  # fmt: skip
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy(), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


# ---- the loop -------------------------------------------------------------------------------------------


def _autocast(device: torch.device, dtype: str) -> contextlib.AbstractContextManager:
    if dtype == "bfloat16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _no_sync(module: nn.Module, last: bool) -> contextlib.AbstractContextManager:
    """Skip the gradient all-reduce on all but the last micro-batch (DDP no_sync / FSDP2 requires_grad sync)."""
    if hasattr(module, "no_sync") and not last:
        return module.no_sync()
    if hasattr(module, "set_requires_gradient_sync"):
        module.set_requires_gradient_sync(last)
    return contextlib.nullcontext()


def units_of(module: nn.Module) -> Callable[[dict], int]:
    """The loss module's normalising count of a batch (`units(batch)`: target tokens for next-token
    losses, pairs for reward models and DPO, sequences for RL), looked up through a DDP wrapper."""
    inner = getattr(module, "module", module)
    return getattr(inner, "units", count_targets)


def _call(module: nn.Module, batch: dict[str, torch.Tensor], device: torch.device
          ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:  # fmt: skip
    """module(**batch) -> (loss sum, statistic sums); a plain tensor result has no statistics."""
    out = module(**{k: v.to(device) for k, v in batch.items()})
    return (out, {}) if isinstance(out, torch.Tensor) else out


def _add_stats(sums: dict[str, torch.Tensor], stats: dict[str, torch.Tensor]) -> None:
    """Accumulate a micro-batch's statistic sums (float64 on CPU, detached) into `sums`."""
    for k, v in stats.items():
        v = v.detach().double().cpu()
        sums[k] = sums[k] + v if k in sums else v


def _reduce_stats(sums: dict[str, torch.Tensor], n: int) -> dict[str, float]:
    """Per-unit means over all ranks of the statistic sums (keys sorted: every rank reduces the same list)."""
    if not sums:
        return {}
    keys = sorted(sums)
    total = dist.all_reduce_sum(torch.stack([sums[k] for k in keys]))
    return {k: float(v) / n for k, v in zip(keys, total.tolist(), strict=True)}


def _step(module: nn.Module, opt: torch.optim.Optimizer, micro: list[dict], recipe: Recipe, step: int,
          device: torch.device, hooks: Hooks) -> tuple[float, float, int, dict[str, float]]:  # fmt: skip
    """One optimizer step (or a NonFiniteError before it); returns (loss, grad norm, units, statistics).

    `step` is the 0-based index of the step (what `on_micro` receives); messages name `step + 1`, the
    number metrics.jsonl and the progress line give the same step, so a halt and the log agree."""
    units = units_of(module)
    n = int(dist.all_reduce_sum(torch.tensor(float(sum(units(b) for b in micro)))).item())
    if n == 0:
        raise TrainError(f"step {step + 1}: the batch has no target tokens (every loss_mask is 0)")
    scale = dist.world_size() / n
    total = torch.zeros((), dtype=torch.float64)
    sums: dict[str, torch.Tensor] = {}
    for i, batch in enumerate(micro):
        if hooks.on_micro:
            hooks.on_micro(step, i)
        with _no_sync(module, i == len(micro) - 1), _autocast(device, recipe.loop.dtype):
            loss_sum, stats = _call(module, batch, device)
        (loss_sum * scale).backward()
        total += loss_sum.detach().double().cpu()
        _add_stats(sums, stats)
    loss = dist.all_reduce_sum(total).item() / n
    params = [p for p in module.parameters() if p.grad is not None]
    clip = recipe.optim.grad_clip if recipe.optim.grad_clip > 0 else math.inf
    norm = torch.nn.utils.clip_grad_norm_(params, clip, foreach=True)
    norm = float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)
    if not (math.isfinite(loss) and math.isfinite(norm)):
        opt.zero_grad(set_to_none=True)
        raise NonFiniteError(f"step {step + 1}: loss {loss} / gradient norm {norm}")
    opt.step()
    opt.zero_grad(set_to_none=True)
    return loss, norm, n, _reduce_stats(sums, n)


def evaluate(module: nn.Module, batches: Iterable[dict[str, torch.Tensor]], device: torch.device,
             dtype: str = "float32") -> tuple[float, dict[str, float]]:  # fmt: skip
    """Mean per-unit loss over `batches` (summed over ranks) and the loss module's statistics."""
    was_training = module.training
    module.eval()
    units = units_of(module)
    total, n = torch.zeros((), dtype=torch.float64), 0
    sums: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        for batch in batches:
            with _autocast(device, dtype):
                loss_sum, stats = _call(module, batch, device)
            total += loss_sum.double().cpu()
            _add_stats(sums, stats)
            n += units(batch)
    module.train(was_training)
    n = int(dist.all_reduce_sum(torch.tensor(float(n))).item())
    return dist.all_reduce_sum(total).item() / max(n, 1), _reduce_stats(sums, max(n, 1))


def fit(module: nn.Module, train: Batches, recipe: Recipe, run_dir: str | Path, *, resume: bool = False,
        hooks: Hooks | None = None, device: torch.device | str = "cpu") -> Result:  # fmt: skip
    """Train `module` (a loss module: forward(tokens, loss_mask) -> loss sum) for recipe.loop.steps steps."""
    hooks, run_dir, device = hooks or Hooks(), Path(run_dir), torch.device(device)
    cfg = recipe.loop
    opt = make_optimizer(module, recipe.optim)
    metrics = Metrics(run_dir / "metrics.jsonl", enabled=dist.rank() == 0)
    start, last_ckpt = 0, None
    if not resume:
        found = ckpt.latest(run_dir)
        if found is not None:
            raise TrainError(f"{run_dir} already holds checkpoints (newest: {found.path.name}); pass --resume "
                             "to continue that run, or choose a new run directory")  # fmt: skip
    restored = _resume(run_dir, module, opt, train, hooks) if resume else None
    if restored is not None:
        start, last_ckpt = restored
        log.info("resumed from %s (step %d)", last_ckpt, start)
    else:  # per-rank streams (dropout); the model was initialised identically on every rank before
        seed_everything(cfg.seed + dist.rank())
    metrics.truncate_after(start)
    module.train()
    # what `units` counts, as the metrics key: "target_tokens", or "pairs" / "sequences" for alignment
    unit_name = getattr(getattr(module, "module", module), "unit_name", "target_tokens")
    losses, tokens_per_step, target_tokens = [], None, 0
    for step in range(start, cfg.steps):
        t0 = time.perf_counter()
        lr = lr_at(step, cfg.steps, recipe.optim)
        for group in opt.param_groups:
            group["lr"] = lr
        micro = [train.next_batch() for _ in range(cfg.grad_accum)]
        tokens_per_step = sum(b["tokens"][:, :-1].numel() for b in micro) * dist.world_size()
        try:
            loss, norm, n, stats = _step(module, opt, micro, recipe, step, device, hooks)
        except NonFiniteError as e:
            where = f"last good checkpoint: {last_ckpt}" if last_ckpt else "no checkpoint was written yet"
            raise NonFiniteError(f"{e} is not finite; halted before the optimizer step ({where})") from None
        losses.append(loss)
        target_tokens += n
        dt = time.perf_counter() - t0
        record = {"step": step + 1, "total_steps": cfg.steps, "loss": loss, "lr": lr, "grad_norm": norm, unit_name: n,
                  "tokens_per_s": tokens_per_step / dt, "step_s": dt, **stats}  # fmt: skip
        if hasattr(train, "metrics"):  # what the batch source measured (RL: rewards, KL, lengths)
            record.update(_mean_over_ranks(train.metrics()))
        if cfg.peak_flops > 0:
            record["mfu"] = (
                6 * _n_params(module) * tokens_per_step / dt / (cfg.peak_flops * dist.world_size())
            )
        done = step + 1
        if hooks.val_batches and ((cfg.eval_every and done % cfg.eval_every == 0) or done == cfg.steps):
            record["val_loss"], val_stats = evaluate(module, hooks.val_batches(), device, cfg.dtype)
            record.update({f"val_{k}": v for k, v in val_stats.items()})
        if done % cfg.log_every == 0 or done == cfg.steps or "val_loss" in record or step == start:
            metrics.write(record)
            if hooks.on_log and dist.rank() == 0:
                hooks.on_log(record)
        if (cfg.save_every and done % cfg.save_every == 0) or done == cfg.steps:
            last_ckpt = save(run_dir, done, module, opt, train, recipe, hooks)
    metrics.close()
    if dist.rank() == 0:
        plot_losses(run_dir / "metrics.jsonl", run_dir / "loss.png")
    final_val = metrics.last_val
    return Result(steps=cfg.steps, losses=losses, last_checkpoint=last_ckpt, final_val_loss=final_val,
                  target_tokens=target_tokens)  # fmt: skip


def _mean_over_ranks(values: dict[str, float]) -> dict[str, float]:
    """Each value averaged over the ranks (every rank has the same keys: the same code measured them)."""
    if not values or dist.world_size() == 1:
        return values
    keys = sorted(values)
    total = dist.all_reduce_sum(torch.tensor([float(values[k]) for k in keys], dtype=torch.float64))
    return {k: v / dist.world_size() for k, v in zip(keys, total.tolist(), strict=True)}


def _n_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


# ---- saving and restoring ------------------------------------------------------------------------------

_FULL = StateDictOptions(full_state_dict=True, cpu_offload=True)
_TRAINABLE = StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=True)


def _trainable_state(module: nn.Module) -> dict[str, torch.Tensor]:
    """Full (unsharded) trainable parameters on CPU; buffers (e.g. a QLoRA base's packed weights) excluded."""
    names = {n.removeprefix("module.") for n, p in module.named_parameters() if p.requires_grad}
    return {k: v for k, v in get_model_state_dict(module, options=_TRAINABLE).items() if k in names}


def save(run_dir: Path, step: int, module: nn.Module, opt: torch.optim.Optimizer, train: Batches,
         recipe: Recipe, hooks: Hooks) -> Path:  # fmt: skip
    """Write and commit the checkpoint of `step` (all ranks call this); returns its directory."""
    trainable = _trainable_state(module)
    optim_state = get_optimizer_state_dict(module, opt, options=_FULL)
    full = get_model_state_dict(module, options=_FULL) if hooks.export else None
    tmp = dist.broadcast_object(str(ckpt.begin(run_dir, step)) if dist.rank() == 0 else None)
    tmp = Path(tmp)
    try:
        r = dist.rank()
        ckpt.write_torch(tmp / f"rank-{r}.pt", {"rng": rng_state(), "step": step})
        write_json(tmp / f"rank-{r}.json", {"step": step, "loader": train.state_dict()})
        if r == 0:
            ckpt.write_tensors(tmp / "trainable.safetensors", trainable)
            ckpt.write_torch(tmp / "optimizer.pt", optim_state)
            if hooks.export and full is not None:
                hooks.export(full, tmp)
        dist.barrier()
        final = ckpt.commit(tmp, step, hooks.fingerprint or {}, recipe.loop.keep_last) if r == 0 else None
    except OSError as e:
        if dist.rank() == 0:
            ckpt.abort(tmp)
        raise ckpt.CheckpointError(f"{run_dir}: saving step {step} failed ({e}); the previous checkpoint "
                                   "is intact") from None  # fmt: skip
    dist.barrier()
    return Path(dist.broadcast_object(str(final) if final else None))


def _resume(run_dir: Path, module: nn.Module, opt: torch.optim.Optimizer, train: Batches,
            hooks: Hooks) -> tuple[int, Path] | None:  # fmt: skip
    """Restore the newest checkpoint whose every piece validates; None when the run has none at all.

    A checkpoint that verifies (its hashes match) but whose contents are unusable (a refused pickle,
    a missing tensor, an empty optimizer state: a rehashed or hostile file) is skipped for the next
    older one, with a warning once one restores; when none restores, the newest one's error is raised
    as one line (exit 2), never a fresh start that would overwrite the run. Every rank must agree on
    the checkpoint, so a failure on any rank skips it on all.
    """
    errors: list[ckpt.CheckpointError] = []
    for found in ckpt.candidates(run_dir):
        try:
            restored = _restore(found, module, opt, train, hooks)
            failed = 0.0
        except ckpt.CheckpointError as e:
            errors.append(e)
            failed = 1.0
        if dist.all_reduce_sum(torch.tensor(failed)).item() == 0:
            for e in errors:  # told only now, so a run that cannot resume prints just its one error line
                log.warning("skipping checkpoint: %s", e)
            return restored
        if not failed:
            errors.append(ckpt.CheckpointError(f"{found.path}: unusable on another rank"))
    if errors:
        more = f" (and {len(errors) - 1} older checkpoint(s) unusable)" if len(errors) > 1 else ""
        raise ckpt.CheckpointError(f"{errors[0]}{more}; no usable checkpoint to resume from")
    if ckpt.any_complete(run_dir):  # checkpoints exist but none verifies: starting over would discard them
        raise ckpt.CheckpointError(f"{ckpt.checkpoints_dir(run_dir)}: no checkpoint passes its checksum "
                                   "check; nothing to resume from")  # fmt: skip
    return None


def _missing(what: Path, keys: Iterable[str]) -> str:
    keys = sorted(keys)
    more = f" (and {len(keys) - 1} more)" if len(keys) > 1 else ""
    return f"{what}: missing key {keys[0]!r}{more}"


def _check_tensors(path: Path, got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    """Exactly the model's trainable tensors, each of its shape (a missing one would keep its init)."""
    if missing := set(want) - set(got):
        raise ckpt.CheckpointError(_missing(path, missing))
    if extra := sorted(set(got) - set(want)):
        raise ckpt.CheckpointError(f"{path}: unexpected key {extra[0]!r} (not a trainable parameter of this "
                                   "model)")  # fmt: skip
    for k, v in want.items():
        if tuple(got[k].shape) != tuple(v.shape):
            raise ckpt.CheckpointError(f"{path}: key {k!r} has shape {list(got[k].shape)}, the model's is "
                                       f"{list(v.shape)}")  # fmt: skip


# Per-parameter AdamW state: what `optimizer.step()` leaves for every parameter it updated.
_ADAM_KEYS = ("step", "exp_avg", "exp_avg_sq")


def _check_optimizer(path: Path, saved: Any, current: dict, shapes: dict[str, torch.Tensor]) -> None:
    """`saved` has the current optimizer's param groups (same parameters, same order) and full AdamW
    state for each parameter, moments shaped like it: load_state_dict alone would accept `{}` or a
    state with parameters missing, silently restarting their moments from zero."""
    if not isinstance(saved, dict):
        raise ckpt.CheckpointError(f"{path}: expected a state dict, got {type(saved).__name__}")
    if missing := {"state", "param_groups"} - set(saved):
        raise ckpt.CheckpointError(_missing(path, missing))
    state, groups = saved["state"], saved["param_groups"]
    if not isinstance(state, dict) or not isinstance(groups, list):
        raise ckpt.CheckpointError(f"{path}: 'state' must be a dict and 'param_groups' a list")
    want_groups = [list(g["params"]) for g in current["param_groups"]]
    got_groups = [list(g.get("params", [])) if isinstance(g, dict) else None for g in groups]
    if got_groups != want_groups:
        raise ckpt.CheckpointError(f"{path}: 'param_groups' has {len(groups)} group(s) that do not list this "
                                   f"model's trainable parameters ({[len(g) for g in want_groups]} expected)")  # fmt: skip
    for name in (n for g in want_groups for n in g):
        entry = state.get(name)
        if not isinstance(entry, dict):
            raise ckpt.CheckpointError(_missing(path, [f"state.{name}"]))
        if missing := [k for k in _ADAM_KEYS if not isinstance(entry.get(k), torch.Tensor)]:
            raise ckpt.CheckpointError(_missing(path, [f"state.{name}.{k}" for k in missing]))
        shape = tuple(shapes[name].shape) if name in shapes else None
        for k in ("exp_avg", "exp_avg_sq"):
            if shape is not None and tuple(entry[k].shape) != shape:
                raise ckpt.CheckpointError(f"{path}: key 'state.{name}.{k}' has shape {list(entry[k].shape)}, "
                                           f"the parameter's is {list(shape)}")  # fmt: skip
    if extra := sorted(set(state) - {n for g in want_groups for n in g}):
        raise ckpt.CheckpointError(f"{path}: unexpected key 'state.{extra[0]}'")


def _read_rank_state(found: ckpt.Found) -> tuple[dict, dict]:
    """(loader state from rank-<r>.json, RNG states from rank-<r>.pt), both present and of the right
    types and written at this checkpoint's step."""
    r = dist.rank()
    json_path, pt_path = found.path / f"rank-{r}.json", found.path / f"rank-{r}.pt"
    for p in (json_path, pt_path):
        if not p.is_file():
            raise ckpt.CheckpointError(
                f"{p}: missing (no state for rank {r}; saved with another world size?)"
            )
    try:
        state = json.loads(json_path.read_text(encoding="utf-8"))
    except (ValueError, OSError) as e:
        raise ckpt.CheckpointError(f"{json_path}: not readable JSON ({e})") from None
    if not isinstance(state, dict) or not isinstance(state.get("loader"), dict):
        raise ckpt.CheckpointError(_missing(json_path, ["loader"]))
    saved = ckpt.read_torch(pt_path)
    if not isinstance(saved, dict):
        raise ckpt.CheckpointError(f"{pt_path}: expected a dict with 'rng' and 'step', got "
                                   f"{type(saved).__name__}")  # fmt: skip
    if missing := {"rng", "step"} - set(saved):
        raise ckpt.CheckpointError(_missing(pt_path, missing))
    for path, step in ((json_path, state.get("step")), (pt_path, saved["step"])):
        if step != found.step:
            raise ckpt.CheckpointError(f"{path}: key 'step' is {step!r}, the checkpoint's is {found.step}")
    rng = saved["rng"]
    if not isinstance(rng, dict):
        raise ckpt.CheckpointError(f"{pt_path}: key 'rng' must be a dict, got {type(rng).__name__}")
    if missing := {"python", "numpy", "torch"} - set(rng):
        raise ckpt.CheckpointError(_missing(pt_path, [f"rng.{k}" for k in missing]))
    if not isinstance(rng["torch"], torch.Tensor) or rng["torch"].dtype != torch.uint8:
        raise ckpt.CheckpointError(f"{pt_path}: key 'rng.torch' must be a uint8 tensor")
    return state["loader"], rng


def _restore(found: ckpt.Found, module: nn.Module, opt: torch.optim.Optimizer, train: Batches,
             hooks: Hooks) -> tuple[int, Path]:  # fmt: skip
    """Load checkpoint `found` into the module, optimizer, loader and RNGs. Every file is read and its
    keys, types and shapes checked before anything is applied; a CheckpointError (this checkpoint is
    unusable; an older one may be) from the few checks only applying can do (the loader's own) may
    leave the model loaded, which is harmless: the caller restores an older checkpoint whole, or exits.
    A different run's checkpoint is a TrainError, since every checkpoint of the run shares it."""
    saved = found.manifest.get("fingerprint", {})
    diff = ckpt.fingerprint_diff(saved, hooks.fingerprint or {})
    if diff:
        raise TrainError(f"{found.path}: this checkpoint belongs to a different run: {'; '.join(diff)}")
    loader, rng = _read_rank_state(found)
    want = _trainable_state(module)
    tensors_path = found.path / "trainable.safetensors"
    trainable = ckpt.read_tensors(tensors_path)
    _check_tensors(tensors_path, trainable, want)
    optim_path = found.path / "optimizer.pt"
    optim_state = ckpt.read_torch(optim_path)
    _check_optimizer(optim_path, optim_state, get_optimizer_state_dict(module, opt, options=_FULL), want)
    set_model_state_dict(module, trainable, options=StateDictOptions(full_state_dict=True, strict=False))
    # strict=False: buffers are not in the file; _check_tensors already demanded every trainable key
    try:
        set_optimizer_state_dict(module, opt, optim_state, options=_FULL)
    except (KeyError, ValueError, TypeError, RuntimeError) as e:
        raise ckpt.CheckpointError(f"{optim_path}: does not match this optimizer ({e})") from None
    try:
        train.load_state_dict(loader)
    except (KeyError, ValueError, TypeError, UserError) as e:
        raise ckpt.CheckpointError(f"{found.path / f'rank-{dist.rank()}.json'}: key 'loader': {e}") from None
    before = rng_state()
    try:
        set_rng_state(rng)
    except (KeyError, ValueError, TypeError, IndexError, RuntimeError) as e:
        set_rng_state(before)  # a half-applied state would make the next checkpoint's draws unreproducible
        raise ckpt.CheckpointError(f"{found.path / f'rank-{dist.rank()}.pt'}: key 'rng' is malformed "
                                   f"({type(e).__name__}: {e})") from None  # fmt: skip
    return found.step, found.path


# ---- metrics --------------------------------------------------------------------------------------------


class Metrics:
    """metrics.jsonl: one JSON object per logged step, flushed as written (rank 0 only)."""

    def __init__(self, path: Path, enabled: bool = True) -> None:
        self.path, self.enabled, self.last_val = path, enabled, None
        self._f = None

    def truncate_after(self, step: int) -> None:
        """Drop records past `step` (left by a killed run that is now resumed from `step`)."""
        if not self.enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        lines = self.path.read_text(encoding="utf-8").splitlines() if self.path.exists() else []
        kept = [ln for ln in lines if ln.strip() and _record_step(ln) <= step]
        tmp = self.path.with_suffix(".jsonl.tmp")
        tmp.write_text("".join(ln + "\n" for ln in kept), encoding="utf-8")
        os.replace(tmp, self.path)
        self._f = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 (closed in close())

    def write(self, record: dict) -> None:
        if "val_loss" in record:
            self.last_val = record["val_loss"]
        if self._f is not None:
            self._f.write(json.dumps(record) + "\n")
            self._f.flush()

    def close(self) -> None:
        if self._f is not None:
            self._f.close()
            self._f = None


def _record_step(line: str) -> int:
    try:
        return int(json.loads(line).get("step", 0))
    except (ValueError, AttributeError):
        return 1 << 62  # a torn last line from a kill: dropped


def plot_losses(metrics_path: Path, out: Path) -> Path | None:
    """loss.png: train (and val) loss against step, if matplotlib is installed (the `train` extra)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log.warning("matplotlib is not installed; no loss curve written (pip install 'gemmakit[train]')")
        return None
    records = [json.loads(ln) for ln in metrics_path.read_text(encoding="utf-8").splitlines() if ln.strip()]
    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    ax.plot([r["step"] for r in records], [r["loss"] for r in records], label="train")
    val = [r for r in records if "val_loss" in r]
    if val:
        ax.plot([r["step"] for r in val], [r["val_loss"] for r in val], "o-", label="val")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats / token)")
    ax.legend()
    ax.grid(alpha=0.3)
    tmp = out.with_name(out.name + ".tmp")
    fig.savefig(tmp, format="png")
    plt.close(fig)
    os.replace(tmp, out)
    return out
