"""Training recipes: TOML files mapped onto small frozen dataclasses, one per concern, strictly.

Where it sits: read by `gemmakit train --recipe X.toml [--set key=value ...]` and by `train.run`; it
only describes a run (model, data, optimizer, loop, LoRA, parallelism), nothing here trains. A
recipe is a TOML table per section (`[model]`, `[data]`, `[optim]`, `[loop]`, `[lora]`,
`[parallel]`, and for alignment `[reward]`, `[dpo]`, `[rl]`, `[reference]`) plus top-level `method`
("pretrain", "sft", "reward", "dpo" or "rl"); every key maps to a dataclass field.

Key trade-off: unknown sections and keys are errors (nanoGPT#64: a typo'd key silently kept its
default), and `--set` overrides go through the same checks, so a recipe says exactly what ran.
The cost is that a recipe must be edited when a field is renamed; the error names the valid keys.
"""

from __future__ import annotations

import dataclasses
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gemmakit.config import dataclass_from_table, read_toml
from gemmakit.errors import UserError

METHODS = ("pretrain", "sft", "reward", "dpo", "rl")


class RecipeError(UserError):
    """A recipe file or override is invalid; the message names the file, key and what was expected."""


@dataclass(frozen=True)
class ModelSection:
    """Which network to train: a preset, optionally reshaped, or weights to start from."""

    # Named size from gemmakit.config.PRESETS ("tiny", "gemma-3-270m", ...); ignored with init_from.
    preset: str = "tiny"
    # Start from these weights (a directory `gemmakit.load` reads), e.g. SFT after pretraining.
    init_from: str = ""
    # ModelConfig fields that replace the preset's (dim, n_layers, vocab_size, sliding_window, ...).
    overrides: dict[str, Any] = field(default_factory=dict)
    # Every `local_every`-th layer is global, the others sliding-window (Gemma 3: 6, i.e. 5:1); 0 keeps
    # the preset's layer_types (resized to n_layers by the same rule if n_layers changes).
    local_every: int = 0
    # Standard deviation of the random initialisation (GPT-2 / nanoGPT's 0.02).
    init_std: float = 0.02


@dataclass(frozen=True)
class DataSection:
    """Where batches come from."""

    # pretrain: a shard directory (`gemmakit shards`); sft: a chat JSONL file; reward, dpo: preference
    # pairs JSONL (TRL's {"prompt", "chosen", "rejected"}); rl: prompt rows JSONL ({"messages": [...]}).
    path: str = ""
    # Held-out data for periodic evaluation (same kind as `path`); "" = no eval for pretrain, and for
    # sft the `val_fraction` split of `path`.
    val_path: str = ""
    # sft only: fraction of examples held out for eval when val_path is empty (chosen by a seeded hash).
    val_fraction: float = 0.0
    # Tokens per row (the model sees seq_len inputs and predicts seq_len targets); reward, dpo: the
    # longest prompt + completion kept (longer pairs are dropped); rl: the longest prompt + rl.max_new_tokens.
    seq_len: int = 256
    # Rows per micro-batch on each rank (reward, dpo: pairs; rl: prompts, each sampled rl.k times).
    batch_size: int = 8
    # Tokenizer directory or tokenizer.model file; "" = the one next to model.init_from or data.path.
    tokenizer: str = ""


@dataclass(frozen=True)
class OptimSection:
    """AdamW and the learning-rate schedule."""

    # Peak learning rate.
    lr: float = 3e-4
    # Final learning rate as a fraction of `lr` (cosine floor / WSD end).
    min_lr_ratio: float = 0.1
    # AdamW betas; 0.95 for beta2 as in most LLM pretraining recipes (more stable than 0.999).
    betas: tuple[float, float] = (0.9, 0.95)
    # AdamW epsilon.
    eps: float = 1e-8
    # Decoupled weight decay on matrices only; norms and the embedding are never decayed.
    weight_decay: float = 0.1
    # Global gradient-norm clip; 0 disables clipping (the norm is still computed and checked).
    grad_clip: float = 1.0
    # Linear warmup steps from 0 to `lr`.
    warmup_steps: int = 100
    # "cosine" (to min_lr at the last step), "wsd" (warmup-stable-decay, linear decay over the last
    # `decay_fraction` of steps) or "constant".
    schedule: str = "cosine"
    # wsd only: fraction of all steps spent decaying.
    decay_fraction: float = 0.2


@dataclass(frozen=True)
class LoopSection:
    """Steps, accumulation, precision, logging, evaluation and checkpoints."""

    # Optimizer steps to run in total.
    steps: int = 1000
    # Micro-batches per optimizer step; the loss is normalised by the tokens of the whole step.
    grad_accum: int = 1
    # Seed for initialisation, data order and dropout.
    seed: int = 0
    # "float32" or "bfloat16" (autocast; weights and optimizer state stay float32).
    dtype: str = "float32"
    # "cpu", "cuda" or "auto" (cuda when available).
    device: str = "auto"
    # Write a metrics.jsonl line every this many steps.
    log_every: int = 10
    # Evaluate on held-out data every this many steps (0 = only at the end).
    eval_every: int = 0
    # Batches per evaluation.
    eval_batches: int = 8
    # Save a checkpoint every this many steps (0 = only at the end).
    save_every: int = 0
    # Complete checkpoints kept; the newest good one is never deleted.
    keep_last: int = 3
    # Sequence chunk for the loss head: (B, chunk, V) logits at a time instead of (B, T, V).
    loss_chunk: int = 256
    # Peak FLOP/s of the hardware, for MFU in the metrics; 0 = unknown (MFU omitted).
    peak_flops: float = 0.0


@dataclass(frozen=True)
class LoraSection:
    """LoRA adapters (only they train) on a frozen base, optionally quantized (QLoRA)."""

    # Train adapters instead of the full model.
    enabled: bool = False
    # Adapter rank.
    r: int = 8
    # Scale numerator: the update is (alpha / r) * B @ A.
    alpha: float = 16.0
    # Dropout on the adapter input.
    dropout: float = 0.0
    # gemmakit module names that get adapters.
    targets: tuple[str, ...] = ("wq", "wk", "wv", "wo", "w_gate", "w_up", "w_down")
    # Quantize the frozen base first: "none", "int8" or "int4" (QLoRA).
    quantize: str = "none"


@dataclass(frozen=True)
class RewardSection:
    """method "reward": a scalar head on the model, Bradley-Terry loss on preference pairs."""

    # TRL's center_rewards_coefficient: adds coef * (r_chosen + r_rejected)^2 per pair (0 = off; 0.01
    # is TRL's suggestion) so scores stay near zero, which the loss alone (differences only) does not do.
    center_coef: float = 0.0


@dataclass(frozen=True)
class DPOSection:
    """method "dpo": the policy against a frozen reference on preference pairs."""

    # Inverse temperature of the implicit reward (TRL's default 0.1); higher keeps closer to the reference.
    beta: float = 0.1
    # "sigmoid" (DPO) or "ipo" (squared loss on per-token log-ratios, target 1 / (2 beta)).
    loss: str = "sigmoid"


@dataclass(frozen=True)
class RLSection:
    """method "rl": sample k completions per prompt, reward them, RLOO advantages, clipped ratio."""

    # Completions per prompt (TRL's num_generations); the leave-one-out baseline needs >= 2.
    k: int = 2
    # KL penalty coefficient: reward - beta * sum_t (log pi_old - log pi_ref) (TRL RLOO's 0.05).
    beta: float = 0.05
    # Clip range of the ratio: [1 - epsilon, 1 + epsilon_high]; epsilon_high 0 means epsilon.
    epsilon: float = 0.2
    epsilon_high: float = 0.0
    # "sequence" (RLOO: one ratio per completion) or "token" (PPO / GRPO-style, per token).
    ratio: str = "sequence"
    # Optimizer steps per batch of rollouts (TRL's num_iterations); > 1 reuses them, where clipping acts.
    iterations: int = 1
    # Sampling of the rollouts; log-probs divide the logits by the same temperature.
    temperature: float = 1.0
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1 = off
    # Longest completion in tokens; a row that reaches it without a stop token is kept, truncated.
    max_new_tokens: int = 64
    # Normalise advantages over the micro-batch (mean 0, std 1).
    normalize_advantages: bool = False
    # A reward model directory (`gemmakit train` method "reward" writes one to RUN/final).
    reward_model: str = ""
    # A verifiable reward: "package.module:function" called as fn(prompts, completions, **columns).
    reward_fn: str = ""
    # Weights of the two sources when both are set (their weighted sum is the reward).
    reward_model_weight: float = 1.0
    reward_fn_weight: float = 1.0


@dataclass(frozen=True)
class ReferenceSection:
    """The frozen reference of DPO and RL."""

    # A model directory; "" = the policy's starting weights (model.init_from, or the seeded init),
    # which under LoRA is the frozen base itself (no second copy).
    path: str = ""


@dataclass(frozen=True)
class ParallelSection:
    """How several processes (torchrun) share the work."""

    # "none" (one process), "ddp" (replicated model) or "fsdp" (FSDP2 fully_shard: sharded model and
    # optimizer state, data parallel).
    mode: str = "none"


@dataclass(frozen=True)
class Recipe:
    """A whole training run."""

    # "pretrain" (next-token loss on packed shards), "sft" (loss on model turns of chat data), "reward"
    # (a reward model on preference pairs), "dpo" (preference pairs vs a reference) or "rl" (prompts,
    # sampled completions, rewards: RLOO).
    method: str = "pretrain"
    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    optim: OptimSection = field(default_factory=OptimSection)
    loop: LoopSection = field(default_factory=LoopSection)
    lora: LoraSection = field(default_factory=LoraSection)
    parallel: ParallelSection = field(default_factory=ParallelSection)
    reward: RewardSection = field(default_factory=RewardSection)
    dpo: DPOSection = field(default_factory=DPOSection)
    rl: RLSection = field(default_factory=RLSection)
    reference: ReferenceSection = field(default_factory=ReferenceSection)

    def __post_init__(self) -> None:
        checks = [
            (self.method in METHODS, "method", f"one of {METHODS}", self.method),
            (
                self.optim.schedule in ("cosine", "wsd", "constant"),
                "optim.schedule",
                "cosine, wsd or constant",
                self.optim.schedule,
            ),  # fmt: skip
            (
                self.loop.dtype in ("float32", "bfloat16"),
                "loop.dtype",
                "float32 or bfloat16",
                self.loop.dtype,
            ),
            (
                self.loop.device in ("auto", "cpu", "cuda"),
                "loop.device",
                "auto, cpu or cuda",
                self.loop.device,
            ),
            (
                self.parallel.mode in ("none", "ddp", "fsdp"),
                "parallel.mode",
                "none, ddp or fsdp",
                self.parallel.mode,
            ),  # fmt: skip
            (
                self.lora.quantize in ("none", "int8", "int4"),
                "lora.quantize",
                "none, int8 or int4",
                self.lora.quantize,
            ),  # fmt: skip
            (self.loop.steps >= 1, "loop.steps", ">= 1", self.loop.steps),
            (self.loop.grad_accum >= 1, "loop.grad_accum", ">= 1", self.loop.grad_accum),
            (self.loop.keep_last >= 1, "loop.keep_last", ">= 1", self.loop.keep_last),
            (self.loop.loss_chunk >= 1, "loop.loss_chunk", ">= 1", self.loop.loss_chunk),
            # log_every 0 would divide by zero mid-run; a negative save/eval period never fires
            (self.loop.log_every >= 1, "loop.log_every", ">= 1", self.loop.log_every),
            (
                self.loop.save_every >= 0,
                "loop.save_every",
                ">= 0 (0 = only at the end)",
                self.loop.save_every,
            ),
            (
                self.loop.eval_every >= 0,
                "loop.eval_every",
                ">= 0 (0 = only at the end)",
                self.loop.eval_every,
            ),
            (self.loop.eval_batches >= 1, "loop.eval_batches", ">= 1", self.loop.eval_batches),
            (self.loop.peak_flops >= 0, "loop.peak_flops", ">= 0 (0 = unknown)", self.loop.peak_flops),
            # r = 0 builds empty adapters (and alpha / r divides by zero); checked even when disabled so a
            # recipe's values are valid whichever way lora.enabled is later set
            (self.lora.r >= 1, "lora.r", ">= 1", self.lora.r),
            (0.0 <= self.lora.dropout < 1.0, "lora.dropout", "in [0, 1)", self.lora.dropout),
            (self.data.seq_len >= 2, "data.seq_len", ">= 2", self.data.seq_len),
            (self.data.batch_size >= 1, "data.batch_size", ">= 1", self.data.batch_size),
            (0.0 <= self.data.val_fraction < 1.0, "data.val_fraction", "in [0, 1)", self.data.val_fraction),
            (self.optim.lr > 0, "optim.lr", "> 0", self.optim.lr),
            (
                0.0 <= self.optim.min_lr_ratio <= 1.0,
                "optim.min_lr_ratio",
                "in [0, 1]",
                self.optim.min_lr_ratio,
            ),
            (
                0.0 < self.optim.decay_fraction <= 1.0,
                "optim.decay_fraction",
                "in (0, 1]",
                self.optim.decay_fraction,
            ),  # fmt: skip
            (self.optim.warmup_steps >= 0, "optim.warmup_steps", ">= 0", self.optim.warmup_steps),
            (self.optim.grad_clip >= 0, "optim.grad_clip", ">= 0", self.optim.grad_clip),
            (self.reward.center_coef >= 0, "reward.center_coef", ">= 0", self.reward.center_coef),
            (self.dpo.beta > 0, "dpo.beta", "> 0", self.dpo.beta),
            (self.dpo.loss in ("sigmoid", "ipo"), "dpo.loss", "sigmoid or ipo", self.dpo.loss),
            (self.rl.k >= 2, "rl.k", ">= 2 (the leave-one-out baseline needs siblings)", self.rl.k),
            (self.rl.beta >= 0, "rl.beta", ">= 0", self.rl.beta),
            (0 < self.rl.epsilon < 1, "rl.epsilon", "in (0, 1)", self.rl.epsilon),
            (self.rl.epsilon_high >= 0, "rl.epsilon_high", ">= 0 (0 = rl.epsilon)", self.rl.epsilon_high),
            (self.rl.ratio in ("sequence", "token"), "rl.ratio", "sequence or token", self.rl.ratio),
            (self.rl.iterations >= 1, "rl.iterations", ">= 1", self.rl.iterations),
            (self.rl.temperature > 0, "rl.temperature", "> 0", self.rl.temperature),
            (self.rl.top_k >= 0, "rl.top_k", ">= 0 (0 = off)", self.rl.top_k),
            (0 < self.rl.top_p <= 1, "rl.top_p", "in (0, 1]", self.rl.top_p),
            (self.rl.max_new_tokens >= 1, "rl.max_new_tokens", ">= 1", self.rl.max_new_tokens),
            (
                self.method != "rl"
                or self.rl.iterations == 1
                or self.loop.save_every % self.rl.iterations == 0,
                "loop.save_every",
                f"a multiple of rl.iterations ({self.rl.iterations}): reused rollouts are not checkpointed",
                self.loop.save_every,
            ),
        ]
        for ok, key, want, got in checks:
            if not ok:
                raise RecipeError(f"{key}: expected {want}, got {got!r}")


_SECTION_CLASSES = {
    "model": ModelSection,
    "data": DataSection,
    "optim": OptimSection,
    "loop": LoopSection,
    "lora": LoraSection,
    "parallel": ParallelSection,
    "reward": RewardSection,
    "dpo": DPOSection,
    "rl": RLSection,
    "reference": ReferenceSection,
}


def _section(name: str, table: Any, source: str) -> Any:
    return dataclass_from_table(_SECTION_CLASSES[name], table, source, name, RecipeError)


def recipe_from_dict(raw: dict[str, Any], source: str = "<recipe>") -> Recipe:
    """A Recipe from parsed TOML; unknown sections/keys and wrongly typed values are RecipeErrors."""
    unknown = sorted(set(raw) - set(_SECTION_CLASSES) - {"method"})
    if unknown:
        raise RecipeError(f"{source}: unknown section(s) or key(s) {', '.join(unknown)}; valid: method, "
                          f"{', '.join(_SECTION_CLASSES)}")  # fmt: skip
    sections = {name: _section(name, raw[name], source) for name in _SECTION_CLASSES if name in raw}
    method = raw.get("method", "pretrain")
    if not isinstance(method, str):
        raise RecipeError(f"{source}: method: expected a string, got {method!r}")
    try:
        return Recipe(method=method, **sections)
    except RecipeError as e:
        raise RecipeError(f"{source}: {e}") from None


def _parse_value(text: str) -> Any:
    """A TOML value (`3e-4`, `true`, `[1, 2]`, `"x"`); anything that is not TOML is taken as a string."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """`section.key=value` strings applied to a parsed recipe (a copy); `model.overrides.dim=64` nests."""
    raw = {k: dict(v) if isinstance(v, dict) else v for k, v in raw.items()}
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise RecipeError(f"--set {item!r}: expected section.key=value")
        parts = key.strip().split(".")
        if parts == ["method"]:
            raw["method"] = _parse_value(value)
            continue
        if len(parts) < 2:
            raise RecipeError(f"--set {item!r}: expected section.key=value (e.g. optim.lr=1e-3)")
        table = raw.setdefault(parts[0], {})
        if not isinstance(table, dict):
            raise RecipeError(f"--set {item!r}: {parts[0]} is not a section")
        for p in parts[1:-1]:
            table[p] = dict(table.get(p, {}))
            table = table[p]
        table[parts[-1]] = _parse_value(value)
    return raw


def load_recipe(path: str | Path, overrides: list[str] | None = None) -> Recipe:
    """Read a TOML recipe, apply `--set` overrides, validate; RecipeError names the file and key."""
    if Path(path).is_dir():  # read_toml would raise IsADirectoryError, a traceback rather than a line
        raise RecipeError(f"{path}: is a directory, not a recipe TOML file (e.g. recipes/sft-lora.toml)")
    raw = read_toml(path, RecipeError)
    return recipe_from_dict(apply_overrides(raw, overrides or []), str(path))


def recipe_to_dict(recipe: Recipe) -> dict[str, Any]:
    """Plain data (for manifests and metrics); tuples become lists, so it is JSON/TOML-serialisable."""

    def plain(v: Any) -> Any:
        if isinstance(v, tuple | list):
            return [plain(x) for x in v]
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        return v

    return plain(dataclasses.asdict(recipe))
