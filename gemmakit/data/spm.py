"""Train a SentencePiece tokenizer with Gemma's special-token layout (for models trained from scratch).

Where it sits: the first step of the nano recipe (`train.nano`), before shards are written; the
result is an ordinary `tokenizer.model` that `gemmakit.tokenizer.Tokenizer` loads and checks.

Layout (reference §4.1-4.2, Gemma 3): <pad> 0, <eos> 1, <bos> 2, <unk> 3, <mask> 4, [multimodal] 5,
<unused0..98> 6-104, <start_of_turn> 105, <end_of_turn> 106, then newline runs "\\n" .. "\\n"x8 as
atomic pieces (the official file has "\\n" at 108), 256 byte-fallback pieces and the learned merges.
Trainer settings follow the official files: BPE, byte fallback, split digits, no dummy prefix,
whitespace-only pieces allowed, identity normalisation.

Key trade-off: the 107 reserved pieces cost 107 embedding rows, 1.3% of an 8192-piece vocabulary,
in exchange for the chat format's ids being exactly Gemma 3's, so every chat, template and GGUF
path treats the nano model like an official one.
"""

from __future__ import annotations

import io
from collections.abc import Iterable

import sentencepiece

_UNUSED = [f"<unused{i}>" for i in range(99)]
# Pieces between <unk> 3 and the newline runs, per special-token layout (reference §4.2): Gemma 3 puts
# <start_of_turn> at 105, Gemma 1/2 at 106.
RESERVED = {
    "gemma3": ["<mask>", "[multimodal]", *_UNUSED, "<start_of_turn>", "<end_of_turn>"],
    "gemma1/2": ["<mask>", "<2mass>", "[@BOS@]", *_UNUSED, "<start_of_turn>", "<end_of_turn>"],
}
NEWLINES = ["\n" * k for k in range(1, 9)]


def train_spm(sentences: Iterable[str], vocab_size: int, *, layout: str = "gemma3",
              character_coverage: float = 0.9999, max_sentence_length: int = 8192,
              input_sentence_size: int = 0, seed_sentencepiece_size: int = 200_000) -> bytes:  # fmt: skip
    """A serialized SentencePiece BPE model with Gemma's special ids (`layout` "gemma3" or "gemma1/2").

    Deterministic for the same input (one trainer thread). `character_coverage` < 1 sends the rarest
    characters to byte fallback instead of giving them rows; `input_sentence_size` > 0 samples that
    many sentences (SentencePiece's own sampler) to bound memory on large corpora.
    """
    if layout not in RESERVED:
        raise ValueError(f"layout: expected one of {sorted(RESERVED)}, got {layout!r}")
    out = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(sentences),
        model_writer=out,
        model_type="bpe",
        vocab_size=vocab_size,
        character_coverage=character_coverage,
        byte_fallback=True,
        split_digits=True,
        split_by_whitespace=True,
        split_by_unicode_script=True,
        split_by_number=True,
        treat_whitespace_as_suffix=False,
        allow_whitespace_only_pieces=True,
        add_dummy_prefix=False,
        remove_extra_whitespaces=False,
        normalization_rule_name="identity",
        max_sentence_length=max_sentence_length,
        input_sentence_size=input_sentence_size,
        shuffle_input_sentence=input_sentence_size > 0,
        seed_sentencepiece_size=seed_sentencepiece_size,
        pad_id=0,
        eos_id=1,
        bos_id=2,
        unk_id=3,
        pad_piece="<pad>",
        eos_piece="<eos>",
        bos_piece="<bos>",
        unk_piece="<unk>",
        user_defined_symbols=[*RESERVED[layout], *NEWLINES],
        num_threads=1,
        minloglevel=2,
    )
    return out.getvalue()
