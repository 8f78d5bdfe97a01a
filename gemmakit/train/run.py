"""A whole training run from a recipe: model, tokenizer, data, LoRA, parallelism, then `loop.fit`.

Where it sits: `gemmakit train --recipe X.toml` calls `run`; it is the one place that turns a
`Recipe` into objects. The run directory receives `recipe.json`, `metrics.jsonl`, `loss.png`,
`checkpoints/step-N/` and, at the end, `final/`: the model as HF safetensors (LoRA: the merged model
plus `adapter/` in PEFT's format) with the tokenizer and `train.json` (recipe, steps, final losses,
data hashes), a directory that `gemmakit chat --model` and transformers both open.

Key trade-off: the model is built and initialised identically on every rank from the recipe's seed
before wrapping, so no weights are broadcast at start; the price is that every rank reads the
init_from checkpoint itself (memory-mapped, so cheap on one machine).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil
from collections.abc import Callable
from pathlib import Path

import torch

from gemmakit.artifact import atomic_dir, sha256_file, verify, write_errors, write_json
from gemmakit.checkpoint import load_model, save_hf
from gemmakit.config import ModelConfig, get_preset, layer_pattern
from gemmakit.memory import available_bytes, gib
from gemmakit.model import Gemma, param_count
from gemmakit.tokenizer import Tokenizer
from gemmakit.train import distributed as dist
from gemmakit.train.align import ALIGN_METHODS
from gemmakit.train.align import setup as align_setup
from gemmakit.train.loop import Hooks, Result, fit
from gemmakit.train.objectives import NextTokenLoss
from gemmakit.train.recipe import Recipe, RecipeError, recipe_to_dict

log = logging.getLogger(__name__)


def model_config(recipe: Recipe, vocab_size: int | None = None) -> ModelConfig:
    """The preset with the recipe's overrides (and `local_every` pattern) applied."""
    base = get_preset(recipe.model.preset)
    fields = {f.name for f in dataclasses.fields(ModelConfig)}
    unknown = sorted(set(recipe.model.overrides) - fields)
    if unknown:
        raise RecipeError(f"model.overrides: unknown ModelConfig field(s) {unknown}; valid: {sorted(fields)}")
    values = dict(recipe.model.overrides)
    if "layer_types" in values:
        values["layer_types"] = tuple(values["layer_types"])
    n_layers = values.get("n_layers", base.n_layers)
    every = recipe.model.local_every
    if every or ("layer_types" not in values and n_layers != base.n_layers):
        if every == 0:
            every = next((i + 1 for i, t in enumerate(base.layer_types) if t == "global"), 1)
        values["layer_types"] = layer_pattern(n_layers, every)
    if vocab_size is not None and "vocab_size" not in values:
        values["vocab_size"] = vocab_size
    try:
        return dataclasses.replace(base, **values)
    except (ValueError, TypeError) as e:
        raise RecipeError(f"model.overrides: {e}") from None


def resolve_tokenizer(recipe: Recipe) -> Tokenizer:
    for candidate in (recipe.data.tokenizer, recipe.model.init_from):
        if candidate:
            return Tokenizer.load(candidate)
    raise RecipeError("data.tokenizer: no tokenizer given (set data.tokenizer, or model.init_from to a "
                      "directory that holds tokenizer.model)")  # fmt: skip


def check_seq_len(recipe: Recipe, cfg: ModelConfig) -> None:
    """data.seq_len within the model's positions (RoPE and the masks are built for max_seq_len): a
    longer row would otherwise fail deep in attention, or first try to allocate (B, T, T) scores. The
    message also says what a step at that length would need against what the machine has."""
    if recipe.data.seq_len > cfg.max_seq_len:
        n = param_count(cfg)
        need = _step_bytes(recipe, cfg, 4 * n, 0 if recipe.lora.enabled else n)
        have = available_bytes()
        room = f"; a step at that length needs at least {gib(need)}" + (
            f" of the {gib(have)} this machine has available" if have is not None else "")  # fmt: skip
        raise RecipeError(f"data.seq_len: {recipe.data.seq_len} exceeds the model's max position "
                          f"(max_seq_len {cfg.max_seq_len}); use at most {cfg.max_seq_len}{room}")  # fmt: skip


def build_model(recipe: Recipe, tokenizer: Tokenizer) -> Gemma:
    """A float32 Gemma: loaded from model.init_from, or the preset/overrides initialised from the seed."""
    if recipe.model.init_from:
        model = load_model(recipe.model.init_from, dtype=torch.float32)
        check_seq_len(recipe, model.config)
    else:
        cfg = model_config(recipe, vocab_size=None)
        check_seq_len(recipe, cfg)  # before the weights are allocated
        with torch.device("meta"):
            model = Gemma(cfg)
        model = model.to_empty(device="cpu").init_weights(recipe.model.init_std, seed=recipe.loop.seed)
    if tokenizer.vocab_size > model.config.vocab_size:
        raise RecipeError(f"the tokenizer has {tokenizer.vocab_size} pieces but the model only "
                          f"{model.config.vocab_size} embedding rows (set model.overrides.vocab_size)")  # fmt: skip
    return model.set_attn_impl("sdpa")


def training_bytes(recipe: Recipe, model: Gemma) -> int:
    """A LOWER bound on the memory one training step needs: the weights, then for each trainable
    parameter its gradient and two AdamW moments (float32), then the activations every layer keeps
    for backward (its inputs to the q/k/v/o and three MLP projections, at the compute dtype).

    A lower bound on purpose: `memory.check_fits` refuses only what cannot fit, so a run that might fit
    is never turned away; attention scores, the loss head and allocator slack come on top."""
    weights = sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers()))
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return _step_bytes(recipe, model.config, weights, trainable)


def _step_bytes(recipe: Recipe, cfg: ModelConfig, weights: int, trainable: int) -> int:
    """`training_bytes` from its parts: weight bytes, trainable parameter count, the batch's activations."""
    act_bytes = 2 if recipe.loop.dtype == "bfloat16" else 4
    per_token = cfg.n_layers * (4 * cfg.dim + 3 * cfg.hidden_dim) * act_bytes
    rows = recipe.data.batch_size * {"reward": 2, "dpo": 2, "rl": recipe.rl.k}.get(recipe.method, 1)
    return weights + 3 * 4 * trainable + rows * recipe.data.seq_len * per_token


def check_memory(recipe: Recipe, model: Gemma, device: torch.device) -> None:
    """MemoryLimitError (one line: needed vs available, /proc/meminfo MemAvailable on CPU) before the
    first batch is allocated, rather than the kernel's OOM killer ending the run mid-step."""
    from gemmakit.memory import check_fits

    d = recipe.data
    check_fits(f"training (data.batch_size {d.batch_size} x data.seq_len {d.seq_len}, "
               f"{model.config.n_layers} layers)", training_bytes(recipe, model), str(device))  # fmt: skip


def _lora(recipe: Recipe, model: Gemma) -> Gemma:
    from gemmakit.lora import LoraConfig, apply_lora

    if recipe.parallel.mode == "fsdp":
        raise RecipeError("lora.enabled: LoRA runs use parallel.mode none or ddp (adapters are small)")
    if recipe.lora.quantize != "none":
        from gemmakit.quantize import quantize_model

        model = quantize_model(model, recipe.lora.quantize)
    cfg = LoraConfig(r=recipe.lora.r, alpha=recipe.lora.alpha, dropout=recipe.lora.dropout,
                     targets=recipe.lora.targets)  # fmt: skip
    return apply_lora(model, cfg, seed=recipe.loop.seed)


def _fingerprint(recipe: Recipe, model: Gemma, tokenizer: Tokenizer) -> dict:
    """What must match for a checkpoint to be resumed (reliability T11): flattened for readable diffs."""
    fp = {f"model.{k}": (list(v) if isinstance(v, tuple) else v)
          for k, v in dataclasses.asdict(model.config).items()}  # fmt: skip
    fp.update({"method": recipe.method, "tokenizer_sha256": tokenizer.sha256, "world_size": dist.world_size(),
               "data.seq_len": recipe.data.seq_len, "data.batch_size": recipe.data.batch_size,
               "loop.grad_accum": recipe.loop.grad_accum, "loop.seed": recipe.loop.seed,
               "lora": json.dumps(dataclasses.asdict(recipe.lora), sort_keys=True)})  # fmt: skip
    section = {"reward": recipe.reward, "dpo": recipe.dpo, "rl": recipe.rl}.get(recipe.method)
    if section is not None:  # a resumed alignment run must optimise the same objective
        fp[recipe.method] = json.dumps(dataclasses.asdict(section), sort_keys=True)
        fp["reference.path"] = recipe.reference.path
    return fp


_FILE_KIND = {"sft": "a chat JSONL file", "reward": "a preference-pairs JSONL file",
              "dpo": "a preference-pairs JSONL file", "rl": "a prompts JSONL file"}  # fmt: skip


def _check_data_kind(method: str, key: str, path: Path | None) -> None:
    """pretrain reads a token shard directory, the other methods a JSONL file; the other kind is named as
    such rather than failing inside the reader with an IsADirectoryError or a shard-index error."""
    if path is None or not path.exists():
        return  # the readers name a missing path themselves
    if method != "pretrain" and path.is_dir():
        raise RecipeError(f"{key}: {path} is a directory (token shards are for method = \"pretrain\"); "
                          f"method = \"{method}\" reads {_FILE_KIND[method]}")  # fmt: skip
    if method == "pretrain" and not path.is_dir():
        raise RecipeError(f"{key}: {path} is a file; method = \"pretrain\" reads a token shard directory "
                          "(`gemmakit shards`), method = \"sft\" a chat JSONL file")  # fmt: skip


def _check_data_paths(recipe: Recipe) -> None:
    """data.path is given, and it and data.val_path are of the kind the method reads."""
    if not recipe.data.path:
        raise RecipeError("data.path: no training data given")
    for key, value in (("data.path", recipe.data.path), ("data.val_path", recipe.data.val_path)):
        _check_data_kind(recipe.method, key, Path(value) if value else None)


def _batches(recipe: Recipe, tokenizer: Tokenizer) -> tuple[object, Callable | None]:
    d, r, w = recipe.data, dist.rank(), dist.world_size()
    _check_data_paths(recipe)
    if recipe.method == "pretrain":
        from gemmakit.train.pretrain import ShardBatches, eval_batches

        train = ShardBatches(d.path, d.seq_len, d.batch_size, seed=recipe.loop.seed, rank=r, world_size=w,
                             tokenizer=tokenizer)  # fmt: skip
        val = None
        if d.val_path:
            n = recipe.loop.eval_batches
            val = lambda: eval_batches(d.val_path, d.seq_len, d.batch_size, n, rank=r, world_size=w)  # noqa: E731
        return train, val
    from gemmakit.train.sft import ChatBatches, encode_conversations, read_chat_jsonl, split_holdout

    examples = encode_conversations(read_chat_jsonl(d.path), tokenizer, d.path)
    held: list = []
    if d.val_path:
        held = encode_conversations(read_chat_jsonl(d.val_path), tokenizer, d.val_path)
    elif d.val_fraction:
        examples, held = split_holdout(examples, d.val_fraction, recipe.loop.seed)
    train = ChatBatches(examples, d.seq_len, d.batch_size, pad_id=tokenizer.pad_id, seed=recipe.loop.seed,
                        rank=r, world_size=w)  # fmt: skip
    if train.stats["truncated"]:
        log.warning("%d of %d conversations are longer than seq_len + 1 = %d tokens and are cut",
                    train.stats["truncated"], len(examples), d.seq_len + 1)  # fmt: skip
    val = None
    if held:
        ev = ChatBatches(held, d.seq_len, min(d.batch_size, len(held)), pad_id=tokenizer.pad_id, rank=r,
                         world_size=1)  # fmt: skip
        val = ev.epoch_batches
    return train, val


def _exporter(recipe: Recipe, model: Gemma, tokenizer: Tokenizer, prefix: str = "model."
              ) -> Callable[[dict, Path], None]:  # fmt: skip
    """Writes the trained model into a checkpoint: `hf/` (a reward model: the HF sequence-classification
    layout), or `adapter/` under LoRA; `prefix` is the Gemma's place in the loss module's state dict."""
    cfg = model.config

    def export(full: dict[str, torch.Tensor], out: Path) -> None:
        if recipe.lora.enabled:
            from gemmakit.lora import LoraConfig, save_adapter

            lcfg = LoraConfig(r=recipe.lora.r, alpha=recipe.lora.alpha, dropout=recipe.lora.dropout,
                              targets=recipe.lora.targets)  # fmt: skip
            save_adapter(model, out / "adapter", lcfg)  # the live model: LoRA runs are never FSDP-sharded
            return
        sd = {k.removeprefix(prefix): v for k, v in full.items() if k.startswith(prefix)}
        with torch.device("meta"):
            plain = Gemma(cfg)
        plain.load_state_dict(sd, assign=True, strict=True)
        if recipe.method == "reward":
            from gemmakit.train.reward import RewardModel, save_reward_model

            rm = RewardModel(plain, full["reward_model.score.weight"], pad_id=tokenizer.pad_id)
            save_reward_model(rm, out / "hf", tokenizer)
            return
        save_hf(plain, out / "hf")
        shutil.copyfile(tokenizer.source, out / "hf" / "tokenizer.model")

    return export


# Dense bf16 peak FLOP/s of common accelerators (vendor datasheets), for MFU when the recipe gives none.
PEAK_BF16_FLOPS = {
    "H200": 989e12,
    "H100": 989e12,
    "A100": 312e12,
    "L40S": 362e12,
    "A10G": 70e12,
    "L4": 121e12,
}


def _with_peak_flops(recipe: Recipe, device: torch.device) -> Recipe:
    if recipe.loop.peak_flops > 0 or device.type != "cuda":
        return recipe
    name = torch.cuda.get_device_name(device)
    peak = next((v for k, v in PEAK_BF16_FLOPS.items() if k in name), 0.0)
    return (
        dataclasses.replace(recipe, loop=dataclasses.replace(recipe.loop, peak_flops=peak))
        if peak
        else recipe
    )


def run(recipe: Recipe, run_dir: str | Path, *, resume: bool = False,
        on_log: Callable[[dict], None] | None = None, on_micro: Callable[[int, int], None] | None = None) -> Result:  # fmt: skip
    """Train as the recipe says, writing into `run_dir`; `resume` continues from its newest good checkpoint."""
    run_dir = Path(run_dir)
    if run_dir.exists() and not run_dir.is_dir():
        raise RecipeError(f"--out {run_dir}: exists and is not a directory (the run directory holds "
                          "metrics, checkpoints and the final model)")  # fmt: skip
    want = recipe.loop.device
    if want == "cuda" and not torch.cuda.is_available():
        why = (
            "this torch is built without CUDA" if torch.version.cuda is None else "no CUDA device is visible"
        )
        raise RecipeError(f'loop.device: \'cuda\' but {why}; use loop.device = "cpu" or "auto"')
    device = dist.setup(recipe.parallel.mode, "cuda" if want == "cuda" or (want == "auto" and torch.cuda.is_available()) else "cpu")  # fmt: skip
    recipe = _with_peak_flops(recipe, device)
    tokenizer = resolve_tokenizer(recipe)
    model = build_model(recipe, tokenizer)
    if recipe.lora.enabled:
        model = _lora(recipe, model)
    check_memory(recipe, model, device)
    fingerprint = _fingerprint(recipe, model, tokenizer)
    model = model.to(device)
    if recipe.method in ALIGN_METHODS:
        _check_data_paths(recipe)
        with write_errors(run_dir):  # DPO caches the reference's log-probs in the run directory
            s = align_setup(recipe, model, tokenizer, run_dir, resume=resume, device=device)
        loss_module, train, val, prefix = s.module.to(device), s.train, s.val, s.export_prefix
    else:
        train, val = _batches(recipe, tokenizer)
        loss_module, prefix = NextTokenLoss(model, recipe.loop.loss_chunk), "model."
    module = dist.wrap(loss_module, recipe.parallel.mode, device)
    hooks = Hooks(val_batches=val, export=_exporter(recipe, model, tokenizer, prefix), on_log=on_log,
                  on_micro=on_micro, fingerprint=fingerprint)  # fmt: skip
    with write_errors(run_dir):  # a read-only or full disk under --out is one line naming it, not a traceback
        if dist.rank() == 0:
            run_dir.mkdir(parents=True, exist_ok=True)
            write_json(run_dir / "recipe.json", recipe_to_dict(recipe))
        result = fit(module, train, recipe, run_dir, resume=resume, hooks=hooks, device=device)
        if dist.rank() == 0 and result.last_checkpoint is not None:
            finalize(recipe, run_dir, result, tokenizer)
    dist.barrier()
    return result


def finalize(recipe: Recipe, run_dir: Path, result: Result, tokenizer: Tokenizer) -> Path:
    """run_dir/final: the last checkpoint's export, the tokenizer and train.json, replaced atomically.

    Its manifest.json keeps the export's fields (format, dtype, config: what loaders read) and lists
    every file of final/, train.json and the tokenizer included.
    """
    ckpt = result.last_checkpoint
    src = ckpt / ("adapter" if recipe.lora.enabled else "hf")
    final = run_dir / "final"
    fields = verify(src)  # the export is checked before it is copied and hashed anew
    with atomic_dir(final, overwrite=True, producer="gemmakit.train.run.finalize", extra=fields) as tmp:
        shutil.copytree(src, tmp, dirs_exist_ok=True)
        if not (tmp / "tokenizer.model").exists():
            shutil.copyfile(tokenizer.source, tmp / "tokenizer.model")
        records = [
            json.loads(ln) for ln in (run_dir / "metrics.jsonl").read_text().splitlines() if ln.strip()
        ]
        data = [p for p in (recipe.data.path, recipe.data.val_path) if p]
        write_json(tmp / "train.json", {
            "recipe": recipe_to_dict(recipe),
            "steps": result.steps,
            "final_train_loss": records[-1]["loss"] if records else None,
            "final_val_loss": next((r["val_loss"] for r in reversed(records) if "val_loss" in r), None),
            "data": {p: _data_hash(Path(p)) for p in data},
            "tokenizer_sha256": tokenizer.sha256,
            "checkpoint": ckpt.name,
        })  # fmt: skip
    return final


def _data_hash(path: Path) -> str:
    """sha256 of a data file, or of a shard directory's index.json (which lists its shards' hashes)."""
    if path.is_dir():
        path = path / "index.json"
    return sha256_file(path) if path.is_file() else "missing"
