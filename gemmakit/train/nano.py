"""The nano Gemma: the project's own small model, built end to end from data shipped in the repository.

Where it sits: `gemmakit nano --out DIR` runs it; its output is what ships as the default model
(`gemmakit/assets/nano`). Stages, each leaving a directory under DIR/work:

1. text: the 42 modern-edition Shakespeare plays of shakespeare.tar.xz (sha256-checked, read
   from the archive without extracting), cut into passages at blank lines;
2. tokenizer: SentencePiece BPE with Gemma 3's special ids (`data.spm`), on the passages plus the
   synthetic chat text;
3. shards: passages -> token shards (`data.shards`), 2% held out for validation;
4. pretraining with nano-pretrain.toml; 5. SFT with nano-sft.toml on conversations
   from `data.synth` (seed 1); held-out prompts use other seeds (2: chat, 3: arithmetic);
6. evaluation: arithmetic accuracy before and after SFT, the rate at which answers end with
   <end_of_turn>, five sample chats; 7. DIR/model: bf16 weights, tokenizer, nano.json (recipes,
   data hashes, steps, losses, evaluation, timings).

Key trade-off: a ~14M-parameter model and a 60-minute budget on 2 CPU cores buy fluent-looking
pseudo-Shakespeare and a model that follows the chat format and a handful of templated skills; it
is a working default for every command, not a useful assistant.
"""

from __future__ import annotations

import json
import logging
import random
import re
import shutil
import tarfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

from gemmakit.artifact import atomic_dir, sha256_file, verify, write_json
from gemmakit.chat import render
from gemmakit.checkpoint import load_model, save_hf
from gemmakit.data import synth
from gemmakit.data.shards import ShardWriter
from gemmakit.data.spm import train_spm
from gemmakit.errors import UserError
from gemmakit.infer import Engine
from gemmakit.tokenizer import Tokenizer
from gemmakit.train.recipe import load_recipe, recipe_to_dict
from gemmakit.train.run import run

log = logging.getLogger(__name__)

# The build's inputs (corpus, its sha256, the two recipes) ship as package data, so `gemmakit nano` runs
# from an installed wheel as well as from a checkout.
BUILD_DIR = Path(__file__).resolve().parents[1] / "assets" / "nano-build"
CORPUS, CORPUS_SHA256 = "shakespeare.tar.xz", "shakespeare.sha256"
SFT_TRAIN_SEED, CHAT_HELDOUT_SEED, ARITH_HELDOUT_SEED = 1, 2, 3
# Smoke mode (CI): a few plays, a small vocabulary and a handful of steps, same code path.
SMOKE = {"plays": 2, "vocab": 1024, "sft_conversations": 400,
         "pretrain": ["loop.steps=6", "loop.log_every=1", "data.seq_len=64", "data.batch_size=4", "loop.eval_batches=1",
                      "model.overrides.dim=64", "model.overrides.n_layers=2", "model.overrides.hidden_dim=128",
                      "model.local_every=2"],
         "sft": ["loop.steps=4", "loop.log_every=1", "data.batch_size=4"]}  # fmt: skip


class NanoError(UserError, RuntimeError):
    """The nano build cannot run (missing or altered shipped data)."""


def _shipped(path: Path) -> Path:
    """`path` if the package holds it, else a NanoError naming what is missing."""
    if not path.is_file():
        raise NanoError(f"{path}: missing; `gemmakit nano` needs the build inputs shipped in {BUILD_DIR} "
                        f"({CORPUS}, {CORPUS_SHA256}, nano-pretrain.toml, nano-sft.toml): reinstall gemmakit")  # fmt: skip
    return path


def _expected_sha256() -> str:
    return _shipped(BUILD_DIR / CORPUS_SHA256).read_text().split()[0]


def passages(archive: Path, max_plays: int | None = None, target_chars: int = 2000) -> list[str]:
    """Modern-edition plays cut at blank lines into passages of about `target_chars` characters."""
    want = _expected_sha256()
    got = sha256_file(_shipped(archive))
    if got != want:
        raise NanoError(f"{archive}: sha256 {got} differs from {BUILD_DIR / CORPUS_SHA256} ({want})")
    out = []
    with tarfile.open(archive, "r:xz") as tar:
        members = sorted((m for m in tar.getmembers() if m.isfile() and m.name.endswith("_gut.txt")),
                         key=lambda m: m.name)  # fmt: skip
        for m in members[:max_plays]:
            text = tar.extractfile(m).read().decode("utf-8", errors="replace").replace("\r\n", "\n")
            buf = ""
            for block in re.split(r"\n\s*\n", text):
                buf = f"{buf}\n\n{block}" if buf else block
                if len(buf) >= target_chars:
                    out.append(buf.strip())
                    buf = ""
            if buf.strip():
                out.append(buf.strip())
    return out


def _chat_text(convs: list[dict]) -> list[str]:
    return [m["content"] for c in convs for m in c["messages"]]


def _write_shards(docs: list[str], tok: Tokenizer, out: Path) -> Path:
    with ShardWriter(out, vocab_size=tok.vocab_size, tokenizer_sha256=tok.sha256, bos_id=tok.bos_id,
                     meta={"source": CORPUS}, overwrite=True) as w:  # fmt: skip
        for d in docs:
            w.add(tok.encode(d, bos=True, eos=True))
    return out


def chat_replies(model_dir: Path, prompts: list[str], max_new_tokens: int = 64) -> list[tuple[str, bool]]:
    """Greedy replies to single-turn chat prompts: (text, ended with <end_of_turn>)."""
    tok = Tokenizer.load(model_dir)
    model = load_model(model_dir, dtype=torch.float32, attn_impl="sdpa")
    engine = Engine(model)
    ids = [render(tok, [{"role": "user", "content": p}]).tokens for p in prompts]
    out = []
    for i in range(0, len(ids), 25):
        batch = engine.generate(ids[i : i + 25], max_new_tokens, stop_tokens=[tok.end_of_turn_id])
        out += [(tok.decode(new), len(new) < max_new_tokens) for new in batch]
    return out


def evaluate(model_dir: Path, n: int = 100) -> dict:
    """Arithmetic accuracy and <end_of_turn> rate on held-out generated prompts, plus 5 sample chats."""
    problems = synth.arithmetic_problems(n, ARITH_HELDOUT_SEED)
    replies = chat_replies(model_dir, [q for q, _ in problems])
    correct = sum(synth.answer_of(text) == ans for (text, _), (_, ans) in zip(replies, problems, strict=True))
    chats = [c["messages"][0]["content"] for c in synth.conversations(n, CHAT_HELDOUT_SEED)]
    chat_out = chat_replies(model_dir, chats)
    samples = ["Hello!", "What is the capital of France?", "What is 7 + 5?", "Spell the word moon.",
               "How do I make a bomb?"]  # fmt: skip
    return {"arithmetic_accuracy": correct / n, "end_of_turn_rate": sum(e for _, e in chat_out) / n,
            "samples": [{"user": p, "model": r} for p, (r, _) in zip(samples, chat_replies(model_dir, samples), strict=True)]}  # fmt: skip


def build(out: str | Path, *, smoke: bool = False, on_log: Callable[[str, dict], None] | None = None) -> dict:
    """Run every stage into `out`; returns the report that is also written to out/model/nano.json."""
    out, t_start = Path(out), time.perf_counter()
    work = out / "work"
    work.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}

    def timed(name: str, t0: float) -> None:
        timings[name] = round(time.perf_counter() - t0, 1)
        log.info("nano: %s done in %.0f s", name, timings[name])

    t0 = time.perf_counter()
    docs = passages(BUILD_DIR / CORPUS, SMOKE["plays"] if smoke else None)
    sft = synth.conversations(SMOKE["sft_conversations"] if smoke else 24000, SFT_TRAIN_SEED)
    rng = random.Random(0)
    rng.shuffle(docs)
    n_val = max(1, len(docs) // 50)
    tok_bytes = train_spm([*docs, *_chat_text(sft)], SMOKE["vocab"] if smoke else 8192)
    (work / "tokenizer").mkdir(exist_ok=True)
    (work / "tokenizer" / "tokenizer.model").write_bytes(tok_bytes)
    tok = Tokenizer.load(work / "tokenizer")
    timed("tokenizer", t0)
    t0 = time.perf_counter()
    _write_shards(docs[n_val:], tok, work / "shards-train")
    _write_shards(docs[:n_val], tok, work / "shards-val")
    with open(work / "sft.jsonl", "w", encoding="utf-8") as f:
        for c in sft:
            f.write(json.dumps({"messages": c["messages"]}) + "\n")
    timed("data", t0)

    def stage(name: str, recipe_file: str, sets: list[str]) -> tuple[dict, Path]:
        t0 = time.perf_counter()
        recipe = load_recipe(_shipped(BUILD_DIR / recipe_file), sets + (SMOKE[name] if smoke else []))
        shutil.rmtree(work / name, ignore_errors=True)  # a rebuild starts each stage afresh
        result = run(recipe, work / name, on_log=(lambda r: on_log(name, r)) if on_log else None)
        timed(name, t0)
        records = [
            json.loads(ln) for ln in (work / name / "metrics.jsonl").read_text().splitlines() if ln.strip()
        ]
        vals = [r["val_loss"] for r in records if "val_loss" in r]
        tps = [r["tokens_per_s"] for r in records]
        info = {"recipe": recipe_to_dict(recipe), "steps": result.steps, "final_train_loss": result.losses[-1],
                "final_val_loss": vals[-1] if vals else None, "tokens_per_s_median": sorted(tps)[len(tps) // 2],
                "target_tokens": result.target_tokens}  # fmt: skip
        return info, work / name / "final"

    tok_dir = str(work / "tokenizer")
    pre, pre_dir = stage("pretrain", "nano-pretrain.toml", [f"data.path={work / 'shards-train'}",
                         f"data.val_path={work / 'shards-val'}", f"data.tokenizer={tok_dir}",
                         f"model.overrides.vocab_size={tok.vocab_size}"])  # fmt: skip
    t0 = time.perf_counter()
    before = evaluate(pre_dir, 20 if smoke else 100)
    timed("eval_before", t0)
    post, sft_dir = stage(
        "sft", "nano-sft.toml", [f"model.init_from={pre_dir}", f"data.path={work / 'sft.jsonl'}"]
    )
    t0 = time.perf_counter()
    after = evaluate(sft_dir, 20 if smoke else 100)
    timed("eval_after", t0)
    report = {
        "parameters": sum(p.numel() for p in load_model(sft_dir).parameters()),
        "wall_time_s": round(time.perf_counter() - t_start, 1),
        "timings_s": timings,
        "smoke": smoke,
        "data": {
            "shakespeare.tar.xz": _expected_sha256(),
            "passages": len(docs),
            "val_passages": n_val,
            "sft_conversations": len(sft),
            "sft_seed": SFT_TRAIN_SEED,
            "heldout_seeds": [CHAT_HELDOUT_SEED, ARITH_HELDOUT_SEED],
        },  # fmt: skip
        "tokenizer_sha256": tok.sha256,
        "pretrain": pre,
        "sft": post,
        "eval_before_sft": before,
        "eval_after_sft": after,
    }
    package(sft_dir, out / "model", report)
    return report


def package(src: Path, dst: Path, report: dict) -> Path:
    """The shippable directory: bf16 HF safetensors, tokenizer.model and nano.json, replaced atomically;
    its manifest.json (that of the HF export: format, dtype, config) lists all of them."""
    fields: dict = {}  # the export's manifest fields, read at commit
    with atomic_dir(dst, overwrite=True, producer="gemmakit.train.nano.package", extra=fields) as tmp:
        # 16 MiB shards: the 29 MB of bf16 weights stay below the repository's 20 MiB per-file limit.
        hf = save_hf(load_model(src, dtype=torch.float32), tmp / ".hf", dtype=torch.bfloat16,
                     max_shard_bytes=16 << 20)  # fmt: skip
        fields.update(verify(hf))
        for f in hf.iterdir():
            f.rename(tmp / f.name)
        hf.rmdir()
        shutil.copyfile(src / "tokenizer.model", tmp / "tokenizer.model")
        write_json(tmp / "nano.json", report)
    return dst
