"""Test helper: train a tiny SentencePiece BPE model with Gemma's special-token layout, offline.

The official tokenizer files (4+ MiB, reference §4.1) cannot be downloaded in tests, so this trains
one in about a second with the library's `gemmakit.data.spm.train_spm` and the official trainer settings (BPE, byte_fallback, split_digits, no dummy
prefix, whitespace-only pieces, identity normalization) and the same special ids: <pad> 0, <eos> 1,
<bos> 2, <unk> 3, then in order <mask>, <2mass>, [@BOS@], <unused0..98>, <start_of_turn> 106,
<end_of_turn> 107 (layout "gemma1/2") or <mask>, [multimodal], <unused0..98>, <start_of_turn> 105,
<end_of_turn> 106 (layout "gemma3"). As in the official files those reserved pieces are
USER_DEFINED (SentencePiece matches them inside raw text), and so are newline runs ("\\n" is id 108
in the 256k file), which is the worst case for control-token injection.

Usage from any test:  `path = train_gemma_spm(tmp_path, "gemma2")` -> `.../tokenizer.model`.
The trained bytes are cached per (layout, vocab_size) for the test session; each call only writes
the file. The default 640 pieces hold the 108 reserved ids, 256 byte pieces, ~140 characters and ~130
merges, so a model paired with it needs vocab_size >= 640 (conftest's VOCAB = 320 is too small).
"""

from __future__ import annotations

import functools
import random
from pathlib import Path

from gemmakit.data.spm import train_spm

_SLUGS = {"gemma1/2": "gemma1_2", "gemma3": "gemma3"}  # layout -> directory name
_ALIASES = {"gemma1": "gemma1/2", "gemma2": "gemma1/2", "gemma1/2": "gemma1/2", "gemma3": "gemma3"}

_WORDS_TEXT = (
    "the a of and to in is it that was for on with as he she they you I we this be at by not are "
    "from or have an but what all were when there can more if no out so up said about which time "
    "user model system hello world Gemma token piece start end turn of_turn data text code print "
    "def return import class self None True False café naïve über São Zürich 日本 語 中文 한국어 "
    "Привет мир ça va? — … «quote» x y z i j k foo bar baz"
)
_SEPARATORS = [" ", " ", " ", " ", "  ", "   ", ", ", ". ", "! ", "? ", ": ", "_", "-", "<", ">",
               "/", "(", ")", "\t", " = ", "'", '"']  # fmt: skip


def _corpus(n_lines: int = 4000, seed: int = 0) -> list[str]:
    """Deterministic synthetic text: words, digits, punctuation, accents, CJK, whitespace runs."""
    rng = random.Random(seed)
    words = _WORDS_TEXT.split()
    lines = []
    for _ in range(n_lines):
        parts = []
        for _ in range(rng.randint(3, 16)):
            word = rng.choice(words) if rng.random() > 0.12 else str(rng.randint(0, 99999))
            parts.append(word.capitalize() if rng.random() < 0.1 else word)
            parts.append(rng.choice(_SEPARATORS))
        lines.append(("    " if rng.random() < 0.1 else "") + "".join(parts))
    return lines


@functools.lru_cache(maxsize=8)
def gemma_spm_bytes(layout: str, vocab_size: int = 640) -> bytes:
    """Serialized ModelProto of a tiny Gemma-layout BPE model (cached for the session)."""
    return train_spm(_corpus(), vocab_size, layout=_ALIASES[layout], character_coverage=1.0)


def train_gemma_spm(tmpdir: Path, generation: str, vocab_size: int = 640) -> Path:
    """Write a tiny Gemma tokenizer for `generation` ("gemma1", "gemma2", "gemma3", or a layout
    name "gemma1/2") to `tmpdir/<layout>/tokenizer.model` and return that file's path."""
    if generation not in _ALIASES:
        raise ValueError(f"unknown generation {generation!r}; expected one of {sorted(_ALIASES)}")
    slug = _SLUGS[_ALIASES[generation]]
    path = Path(tmpdir) / slug / "tokenizer.model"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(gemma_spm_bytes(_ALIASES[generation], vocab_size))
    return path
