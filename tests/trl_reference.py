"""Test helper (not a test file): TRL's own numbers for reward-model loss, DPO loss and RLOO on pre-tokenized batches.

Each function builds the real TRL trainer (minimal CPU config, tiny in-memory dataset, a tiny HF GemmaTokenizer
trained by spm_helpers) and drives TRL's own code paths, so parity tests compare gemmakit against an independent
reference rather than a copy of TRL's formulas:

- `trl_reward_loss`: `trl.trainer.reward_trainer.DataCollatorForPreference` on `{"chosen_ids","rejected_ids"}` rows,
  then `RewardTrainer.compute_loss`; metrics are read from `trainer._metrics`.
- `trl_dpo_loss`: `trl.trainer.dpo_trainer.DataCollatorForPreference` on `{"prompt_ids","chosen_ids","rejected_ids"}`
  rows, then `DPOTrainer.compute_loss` (-> `_compute_loss`). DPOTrainer 1.10 always re-tokenizes its train_dataset
  from text (no pre-tokenized shortcut), so the trainer is built on a one-row dummy text dataset and the
  pre-tokenized rows go straight to its collator.
- `trl_rloo`: `RLOOTrainer._generate_and_score_completions` with the prompt tokenizer
  (`_tokenize_prompts`) and the policy's `generate` patched to return the given ids, so TRL's own
  `_generate_single_turn` EOS cut, padding, masks, old/ref log-probs, KL shaping and leave-one-out advantages all
  run; then `RLOOTrainer._compute_loss` on its output.

Only parity tests import this module (it imports trl, datasets and transformers).
"""

from __future__ import annotations

import contextlib
import copy
import functools
import logging
import tempfile
import warnings
from collections.abc import Iterator
from pathlib import Path

import torch
from conftest import HF_CASES

_TINY_VOCAB = 640  # spm_helpers' default piece count, so the tiny tokenizer covers every model id


def tiny_hf_gemma3(
    seed: int = 0, vocab: int = _TINY_VOCAB, *, seq_cls: bool = False, std: float = 0.3, **overrides
):
    """A small random float32 transformers Gemma 3 (eager attention), conftest's "gemma3" case with overrides.

    `seq_cls=True` returns a `Gemma3TextForSequenceClassification` with `num_labels=1` (a reward model), otherwise a
    `Gemma3ForCausalLM`. Every weight is drawn from N(0, std^2) as in conftest.make_hf_model (norms included).
    """
    import transformers

    cfg_name, _, kwargs = HF_CASES["gemma3"]
    kwargs = dict(kwargs, vocab_size=vocab, **overrides)
    if seq_cls:
        kwargs.setdefault("num_labels", 1)
        kwargs.setdefault("pad_token_id", 0)
    cfg = getattr(transformers, cfg_name)(**kwargs)
    cls = transformers.Gemma3TextForSequenceClassification if seq_cls else transformers.Gemma3ForCausalLM
    torch.manual_seed(seed)
    model = cls._from_config(cfg, attn_implementation="eager", dtype=torch.float32).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * std)
    return model


@functools.lru_cache(maxsize=1)
def _base_tokenizer():
    import transformers
    from spm_helpers import train_gemma_spm

    root = Path(tempfile.mkdtemp(prefix="trl_ref_tok_"))
    path = train_gemma_spm(root, "gemma3", vocab_size=_TINY_VOCAB)
    return transformers.GemmaTokenizer.from_pretrained(str(path.parent))


def _tokenizer(pad_id: int, eos_id: int | None = None):
    """A fresh copy of the tiny Gemma 3 tokenizer (trainers mutate pad/eos) with the given pad (and eos) id."""
    tok = copy.deepcopy(_base_tokenizer())
    tok.pad_token = tok.convert_ids_to_tokens(pad_id)
    if eos_id is not None:
        tok.eos_token = tok.convert_ids_to_tokens(eos_id)
    assert tok.pad_token_id == pad_id and (eos_id is None or tok.eos_token_id == eos_id)
    return tok


def _common_args(out: str) -> dict:
    return dict(
        output_dir=out,
        report_to="none",
        bf16=False,
        fp16=False,
        use_cpu=True,
        gradient_checkpointing=False,
        logging_strategy="no",
        save_strategy="no",
        eval_strategy="no",
        disable_tqdm=True,
        dataloader_num_workers=0,
        seed=0,
    )


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Silence the construction-time chatter of transformers / TRL / datasets (warnings and info logs)."""
    import datasets

    names = ("transformers", "trl", "datasets", "accelerate")
    levels = {n: logging.getLogger(n).level for n in names}
    bars = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for n in names:
            logging.getLogger(n).setLevel(logging.ERROR)
        try:
            yield
        finally:
            for n, lvl in levels.items():
                logging.getLogger(n).setLevel(lvl)
            if bars:
                datasets.enable_progress_bars()


@contextlib.contextmanager
def _keep_mode(*models) -> Iterator[None]:
    """Run in eval mode (TRL then logs under "eval"; Gemma has no dropout anyway) and restore each model's mode."""
    modes = [m.training for m in models]
    for m in models:
        m.eval()
    try:
        yield
    finally:
        for m, mode in zip(models, modes, strict=True):
            m.train(mode)


def _last_metrics(trainer) -> dict[str, float]:
    mode = "train" if trainer.model.training else "eval"
    return {k: float(v[-1]) for k, v in trainer._metrics[mode].items() if len(v)}


def trl_reward_loss(
    model,
    chosen_ids: list[list[int]],
    rejected_ids: list[list[int]],
    *,
    pad_id: int = 0,
    margin: list[float] | None = None,
    center_rewards_coefficient: float | None = None,
) -> tuple[float, dict[str, float]]:
    """model: a transformers Gemma*ForSequenceClassification (num_labels=1), float32.

    Returns `RewardTrainer.compute_loss`'s loss and the metrics TRL logs for that batch (`accuracy`, `margin`,
    `mean_reward`, `min_reward`, `max_reward`, `num_tokens`), using TRL's reward `DataCollatorForPreference` (right
    padding with `pad_id`, chosen half first). Note: TRL sets `model.config.pad_token_id = pad_id` (the HF head pools
    at the rightmost token != pad id) and `disable_dropout_in_model(model)`; both persist on `model`.
    """
    import datasets
    from trl import RewardConfig, RewardTrainer

    if len(chosen_ids) != len(rejected_ids):
        raise ValueError("chosen_ids and rejected_ids must have the same number of rows")
    rows = [
        {"chosen_ids": list(c), "rejected_ids": list(r)}
        for c, r in zip(chosen_ids, rejected_ids, strict=True)
    ]
    if margin is not None:
        for row, m in zip(rows, margin, strict=True):
            row["margin"] = float(m)
    with tempfile.TemporaryDirectory() as out, _quiet(), _keep_mode(model):
        args = RewardConfig(
            **_common_args(out),
            max_length=None,
            center_rewards_coefficient=center_rewards_coefficient,
            per_device_train_batch_size=len(rows),
        )
        trainer = RewardTrainer(
            model=model,
            args=args,
            train_dataset=datasets.Dataset.from_list(rows),
            processing_class=_tokenizer(pad_id),
        )
        batch = trainer._prepare_inputs(trainer.data_collator(rows))
        with torch.no_grad():
            loss = trainer.compute_loss(trainer.model, batch)
        return float(loss), _last_metrics(trainer)


def trl_dpo_loss(
    policy,
    ref,
    prompt_ids: list[list[int]],
    chosen_ids: list[list[int]],
    rejected_ids: list[list[int]],
    *,
    beta: float = 0.1,
    loss_type: str = "sigmoid",
    pad_id: int = 0,
) -> tuple[float, dict[str, float]]:
    """policy, ref: transformers Gemma*ForCausalLM, float32. chosen/rejected ids are completion ids only.

    Returns `DPOTrainer.compute_loss` (-> `_compute_loss`) on the batch built by TRL's DPO `DataCollatorForPreference`
    (rows prompt+chosen then prompt+rejected, right padding, completion_mask over completion tokens, no truncation),
    and its logged metrics: `rewards/chosen`, `rewards/rejected`, `rewards/accuracies`, `rewards/margins`,
    `logps/chosen`, `logps/rejected`, `logits/chosen`, `logits/rejected`, `mean_token_accuracy`, `entropy`,
    `num_tokens`. `policy is ref` is allowed (TRL refuses it, so a deep copy is used as the reference).
    """
    import datasets
    from trl import DPOConfig, DPOTrainer

    if loss_type not in ("sigmoid", "ipo"):
        raise ValueError(f"loss_type must be 'sigmoid' or 'ipo', got {loss_type!r}")
    if not len(prompt_ids) == len(chosen_ids) == len(rejected_ids):
        raise ValueError("prompt_ids, chosen_ids and rejected_ids must have the same number of rows")
    if ref is policy:
        ref = copy.deepcopy(policy)
    rows = [
        {"prompt_ids": list(p), "chosen_ids": list(c), "rejected_ids": list(r)}
        for p, c, r in zip(prompt_ids, chosen_ids, rejected_ids, strict=True)
    ]
    # DPOTrainer 1.10 always tokenizes its train_dataset from text; a one-row dummy satisfies the constructor.
    dummy = datasets.Dataset.from_dict({"prompt": ["a"], "chosen": [" b"], "rejected": [" c"]})
    with tempfile.TemporaryDirectory() as out, _quiet(), _keep_mode(policy, ref):
        args = DPOConfig(
            **_common_args(out),
            beta=beta,
            loss_type=[loss_type],
            max_length=None,
            per_device_train_batch_size=len(rows),
        )
        trainer = DPOTrainer(
            model=policy, ref_model=ref, args=args, train_dataset=dummy, processing_class=_tokenizer(pad_id)
        )
        batch = trainer._prepare_inputs(trainer.data_collator(rows))
        with torch.no_grad():
            loss = trainer.compute_loss(trainer.model, batch)
        return float(loss), _last_metrics(trainer)


def trl_rloo(
    policy,
    ref,
    prompt_ids: list[list[int]],
    completion_ids: list[list[int]],
    rewards: list[float],
    *,
    num_generations: int = 2,
    beta: float = 0.05,
    temperature: float = 1.0,
    eos_id: int,
    pad_id: int = 0,
    normalize_advantages: bool = False,
) -> dict[str, object]:
    """One RLOO scoring + loss pass through TRL on fixed completions.

    prompt_ids: one entry per completion, groups of `num_generations` consecutive rows share a prompt.
    completion_ids: the generated tokens, each ending in `eos_id` or truncated (a truncated row should then have the
    full generation length: like HF `generate`, rows are right-padded with `pad_id` and TRL's EOS cut keeps everything
    in a row without EOS, padding included). rewards: the raw reward per completion, returned by a reward function.

    Drives `RLOOTrainer._generate_and_score_completions` with `_tokenize_prompts` and the policy's `generate` patched
    (so TRL's `_generate`, `_generate_single_turn` EOS masking, padding, log-probs, KL shaping and advantages run),
    then `RLOOTrainer._compute_loss`. The reference is injected by patching `create_model_from_path` (RLOOTrainer
    loads its reference from the policy's path and takes no `ref_model` argument).

    Returns {"advantages", "kl" (TRL's logged kl; None when beta == 0), "kl_per_seq" (the per-sequence sum TRL
    subtracts as beta * kl from the reward; None when beta == 0), "loss", "old_logps", "completion_mask",
    "completion_ids" (as TRL kept them), "clip_ratio/..." and every other metric TRL logged}.
    TRL does not expose the KL-shaped rewards; they are `rewards - beta * kl_per_seq` (rloo_trainer.py).
    """
    import datasets
    import trl.trainer.rloo_trainer as rloo_mod
    from trl import RLOOConfig, RLOOTrainer

    n = len(prompt_ids)
    if not n == len(completion_ids) == len(rewards):
        raise ValueError("prompt_ids, completion_ids and rewards must have one entry per completion")
    if n % num_generations:
        raise ValueError(f"{n} completions are not whole groups of num_generations={num_generations}")
    if beta != 0.0 and ref is policy:
        ref = copy.deepcopy(policy)
    keys = [f"row-{i}" for i in range(n)]
    index = {k: i for i, k in enumerate(keys)}
    max_len = max(len(c) for c in completion_ids)

    def reward_fn(prompts, completions, completion_ids, **kwargs):
        return [float(rewards[index[p]]) for p in prompts]

    captured: dict[str, torch.Tensor] = {}
    real_gather = rloo_mod.gather

    def gather_spy(t):
        out = real_gather(t)
        if isinstance(t, torch.Tensor) and t.dim() == 1:  # the only 1-D gather is `kl = gather(kl)`
            captured["kl_per_seq"] = out.detach().clone()
        return out

    def fake_tokenize_prompts(prompts):
        return [list(prompt_ids[index[p]]) for p in prompts], None, {}

    def fake_generate(input_ids=None, attention_mask=None, **kwargs):
        rows = [index[p] for p in current_prompts]
        comp = torch.full((len(rows), max_len), pad_id, dtype=input_ids.dtype, device=input_ids.device)
        for j, i in enumerate(rows):
            comp[j, : len(completion_ids[i])] = torch.tensor(completion_ids[i], dtype=input_ids.dtype)
        return torch.cat([input_ids, comp], dim=1)

    train = datasets.Dataset.from_dict({"prompt": keys})
    inputs = [{"prompt": k} for k in keys]
    current_prompts = keys
    with (
        tempfile.TemporaryDirectory() as out,
        _quiet(),
        _keep_mode(policy, ref),
        _patched(rloo_mod, "create_model_from_path", lambda *a, **k: ref),
        _patched(rloo_mod, "gather", gather_spy),
    ):
        args = RLOOConfig(
            **_common_args(out),
            num_generations=num_generations,
            beta=beta,
            temperature=temperature,
            normalize_advantages=normalize_advantages,
            max_completion_length=max_len,
            per_device_train_batch_size=n,
            per_device_eval_batch_size=n,
            log_completions=False,
        )
        trainer = RLOOTrainer(
            model=policy,
            reward_funcs=reward_fn,
            args=args,
            train_dataset=train,
            processing_class=_tokenizer(pad_id, eos_id),
        )
        trainer._tokenize_prompts = fake_tokenize_prompts
        gen_model = trainer.accelerator.unwrap_model(trainer.model_wrapped)
        with _patched(gen_model, "generate", fake_generate), torch.no_grad():
            batch = trainer._generate_and_score_completions(inputs)
            loss = trainer._compute_loss(trainer.model, batch)
        metrics = _last_metrics(trainer)
    kl_seq = captured.get("kl_per_seq")
    result: dict[str, object] = dict(metrics)
    result.update(
        advantages=batch["advantages"].tolist(),
        kl=metrics.get("kl"),
        kl_per_seq=None if kl_seq is None else kl_seq.tolist(),
        loss=float(loss),
        old_logps=batch["old_logps"].tolist(),
        completion_mask=batch["completion_mask"].tolist(),
        completion_ids=batch["completion_ids"].tolist(),
    )
    return result


@contextlib.contextmanager
def _patched(obj, name: str, value) -> Iterator[None]:
    """Set obj.name = value for the duration (an instance attribute or module global), then restore it."""
    missing = object()
    old = obj.__dict__.get(name, missing) if hasattr(obj, "__dict__") else getattr(obj, name)
    setattr(obj, name, value)
    try:
        yield
    finally:
        if old is missing:
            delattr(obj, name)
        else:
            setattr(obj, name, old)
