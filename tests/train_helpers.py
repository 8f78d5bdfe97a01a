"""Shared by the training tests: a tiny chat dataset, its tokenizer and a recipe over them."""

from __future__ import annotations

import json
import random
from pathlib import Path

from spm_helpers import train_gemma_spm

WORDS = [
    "the",
    "a",
    "of",
    "and",
    "to",
    "in",
    "is",
    "it",
    "that",
    "was",
    "for",
    "on",
    "with",
    "as",
    "he",
    "she",
    "they",
    "you",
    "we",
    "this",
    "be",
    "at",
    "by",
    "not",
    "are",
]


def write_chat_data(path: Path, n: int = 64, seed: int = 0) -> Path:
    """`n` learnable conversations: the model repeats the user's words backwards."""
    rng = random.Random(seed)
    with open(path, "w", encoding="utf-8") as f:
        for i in range(n):
            words = [rng.choice(WORDS) for _ in range(rng.randint(2, 6))]
            if i % 3 == 0:
                row = {"prompt": "reverse: " + " ".join(words), "completion": " ".join(reversed(words))}
            else:
                row = {"messages": [{"role": "user", "content": "reverse: " + " ".join(words)},
                                    {"role": "assistant", "content": " ".join(reversed(words))}]}  # fmt: skip
            f.write(json.dumps(row) + "\n")
    return path


def chat_setup(tmp: Path) -> tuple[Path, Path]:
    """(chat JSONL, tokenizer.model) under `tmp`."""
    tok = train_gemma_spm(tmp / "tok", "gemma3")
    return write_chat_data(tmp / "chat.jsonl"), tok


def sft_recipe(data_path: Path, tok_path: Path, **sections: dict) -> dict:
    """A raw recipe dict (as parsed from TOML) for SFT of the tiny preset on `data_path`."""
    raw = {
        "method": "sft",
        "model": {"preset": "tiny", "overrides": {"vocab_size": 640}},
        "data": {"path": str(data_path), "tokenizer": str(tok_path), "seq_len": 40, "batch_size": 4},
        "optim": {"lr": 3e-3, "warmup_steps": 2, "weight_decay": 0.0},
        "loop": {"steps": 20, "log_every": 1, "device": "cpu", "save_every": 0},
    }
    for name, values in sections.items():
        raw[name] = {**raw.get(name, {}), **values}
    return raw


def write_pair_data(path: Path, n: int = 48, seed: int = 0) -> Path:
    """`n` preference pairs on the reverse task: chosen reverses the user's words, rejected shuffles
    other words (TRL's conversational format, a third as plain strings)."""
    rng = random.Random(seed)
    with open(path, "w", encoding="utf-8") as f:
        for i in range(n):
            words = [rng.choice(WORDS) for _ in range(rng.randint(2, 5))]
            prompt, good = "reverse: " + " ".join(words), " ".join(reversed(words))
            bad = " ".join(rng.choice(WORDS) for _ in range(len(words) + 2))
            if i % 3 == 0:
                row = {"prompt": prompt, "chosen": good, "rejected": bad}
            else:
                row = {"prompt": [{"role": "user", "content": prompt}],
                       "chosen": [{"role": "assistant", "content": good}],
                       "rejected": [{"role": "assistant", "content": bad}]}  # fmt: skip
            f.write(json.dumps(row) + "\n")
    return path


def write_prompt_data(path: Path, n: int = 32, seed: int = 0) -> Path:
    """RL prompt rows on the reverse task, each with its `answer` column for `align_rewards`."""
    rng = random.Random(seed)
    with open(path, "w", encoding="utf-8") as f:
        for _ in range(n):
            words = [rng.choice(WORDS) for _ in range(rng.randint(2, 4))]
            row = {"messages": [{"role": "user", "content": "reverse: " + " ".join(words)}],
                   "answer": " ".join(reversed(words))}  # fmt: skip
            f.write(json.dumps(row) + "\n")
    return path
