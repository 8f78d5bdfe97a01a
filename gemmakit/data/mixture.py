"""Data mixtures: sample kept documents by source weight into token shards, one directory per phase.

Where it sits: the end of a data run (`data.finalize`), after tokens/ is assembled; it reads tokens/
and the source of each document (work/tokens/part-*.src.npy) and writes mixture/phase-K/ (the
data.shards format) plus mixture/mixture.json. A staged mixture (the recipe's [[mixture.phase]]
tables) gives each phase a share of the token budget and its own weights, so high-quality sources can
be raised late in training: train phase 0's directory, then start the next run from its weights
(`model.init_from`) on phase 1's.

Sampling: each source walks a seeded permutation of its documents, continuing across phases, and
starts a new permutation (an epoch, reported) when a phase needs more than it has left; a phase takes
documents from a source until that source's share of the phase budget (weight x budget) is reached,
then the phase's documents are shuffled together. Everything derives from (seed, phase, source), so
the mixture is a pure function of the kept data and the recipe.

Key trade-off: budgets are met to within one document per source (the last document is taken whole,
never cut), so a phase may exceed its share by up to one document's length per source; cutting
documents would leave fragments without BOS that the packing loader does not expect.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import numpy as np

from gemmakit.artifact import write_json
from gemmakit.data.recipe import DataRecipe
from gemmakit.data.shards import Shards, ShardWriter


def _rng(seed: int, *parts: object) -> np.random.Generator:
    digest = hashlib.sha256(":".join(map(str, ("gemmakit.data.mixture", seed, *parts))).encode()).digest()
    return np.random.default_rng(int.from_bytes(digest[:8], "little"))


def _doc_sources(recipe: DataRecipe, out: Path) -> np.ndarray:
    parts = [out / "work" / "tokens" / f"part-{s:05d}.src.npy" for s in range(recipe.pipeline.shards)]
    arrays = [np.load(p, allow_pickle=False) for p in parts if p.exists()]
    return np.concatenate(arrays) if arrays else np.zeros(0, dtype=np.int32)


class _Cursor:
    """A source's documents in seeded order, epoch after epoch."""

    def __init__(self, docs: np.ndarray, seed: int, source: int) -> None:
        self.docs, self.seed, self.source = docs, seed, source
        self.epoch, self.pos = 0, 0
        self.order = docs[_rng(seed, source, 0).permutation(len(docs))]

    def next(self) -> int:
        if self.pos == len(self.order):
            self.epoch += 1
            self.order = self.docs[_rng(self.seed, self.source, self.epoch).permutation(len(self.docs))]
            self.pos = 0
        self.pos += 1
        return int(self.order[self.pos - 1])


def build_mixture(recipe: DataRecipe, out: Path) -> dict[str, Any]:
    """Write mixture/phase-K/ for every phase and mixture/mixture.json; returns the summary."""
    mix = recipe.mixture
    assert mix is not None
    tokens = Shards.open(out / "tokens")
    src_of = _doc_sources(recipe, out)
    names = [s.name for s in recipe.sources]
    spans = tokens.docs
    lengths = spans[:, 2] - spans[:, 1]
    cursors = {i: _Cursor(np.flatnonzero(src_of == i), mix.seed, i) for i in range(len(names))}
    summary: dict[str, Any] = {"tokens": mix.tokens, "seed": mix.seed, "phases": []}
    for k, phase in enumerate(mix.phase):
        budget = round(mix.tokens * phase.fraction)
        total_w = sum(phase.weights.values())
        picked: list[int] = []
        info: dict[str, Any] = {"dir": f"mixture/phase-{k}", "fraction": phase.fraction, "sources": {}}
        for name, w in sorted(phase.weights.items()):
            i = names.index(name)
            cur, want, got, n = cursors[i], budget * w / total_w, 0, 0
            if w > 0 and len(cur.docs) == 0:
                raise RuntimeError(
                    f"mixture.phase[{k}]: source {name!r} has weight {w} but kept no documents"
                )
            epoch0 = cur.epoch
            while got < want and w > 0:
                d = cur.next()
                picked.append(d)
                got += int(lengths[d])
                n += 1
            info["sources"][name] = {
                "weight": w,
                "docs": n,
                "tokens": got,
                "epochs_started": cur.epoch - epoch0,
            }
        order = _rng(mix.seed, "phase", k).permutation(len(picked))
        with ShardWriter(out / "mixture" / f"phase-{k}", vocab_size=tokens.vocab_size,
                         tokenizer_sha256=tokens.tokenizer_sha256, bos_id=tokens.bos_id, overwrite=True,
                         meta={"created_by": "gemmakit.data.mixture", "phase": k}) as w:  # fmt: skip
            for j in order:
                w.add(tokens.doc(picked[j]))
        info["tokens"] = int(sum(int(lengths[d]) for d in picked))
        summary["phases"].append(info)
    write_json(out / "mixture" / "mixture.json", summary)
    return summary
