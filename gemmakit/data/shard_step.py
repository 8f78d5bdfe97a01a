"""One shard's share of one pipeline segment: read documents, apply the segment's filters, write outputs.

Where it sits: called by `data.pipeline` once per (segment, shard), in a worker process or a Ray task,
never directly by users. A segment is the run of per-document stages between two global stages
(dedup). Segment 0 reads the shard's input units (whole files or byte ranges of JSONL files) through
`data.sources`; later segments read the previous segment's survivors back from `work/` and drop the
documents the global dedup step marked. The last segment writes the kept JSONL, the shard's token part
and its examples; the others write survivors and (before a dedup) their MinHash signatures.

Preference sources (`format = "preference"`, TRL rows read by `data.preference`): each answer is judged
as the chat conversation prompt + answer, with the same filters a chat source gets, and the pair is
dropped when either fails, counted once under the first failure's reason (`_judge_pair`). Between
segments and for dedup, a pair's text is prompt + chosen + rejected, so dedup removes repeated *pairs*,
never different answers to one prompt (a DPO set may hold several pairs per prompt). Kept pairs go to
kept/ as normalised conversational rows {"id", "prompt", "chosen", "rejected", ["margin"], ...,
"corpus"} that `read_preference_jsonl` reads back; like chat sources, they add nothing to tokens/
(token shards are packed pretraining text; a preference trainer renders and tokenizes pairs itself).

Every output goes to a temp file that is fsynced and renamed into place, and the caller writes the
completion marker only after this function returns, so a kill at any point leaves either nothing or
complete files under final names, and a rerun redoes the unit, producing the same bytes.

Key trade-off: survivors pass between segments as JSONL on disk, not in memory, so a segment never
holds more than one document and a global step can wait for slow shards; the cost is one extra write
and read of the surviving text per global stage (~1 GB/s, small next to the filters).
"""

from __future__ import annotations

import dataclasses
import json
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from gemmakit.artifact import atomic_open, write_json
from gemmakit.data import decontam, dedup, filters
from gemmakit.data.pii import redact_all
from gemmakit.data.recipe import DataRecipe, Stage
from gemmakit.data.shards import ShardWriter
from gemmakit.data.sources import Doc, Quarantine, SourceStats, chat_text, read_source

SIG_BATCH = 4096  # texts held for one vectorised signature call (~10 MB of text, not the whole shard)
EXAMPLE_CHARS = 300  # a removed document's first and last characters kept for the report


@dataclass(frozen=True)
class Unit:
    """One input piece: a whole file (or directory), or the byte range of a JSONL file one shard reads."""

    source: int  # index into recipe.sources
    path: str  # absolute path
    byte_range: tuple[int, int] | None = None


@dataclass
class StepStats:
    """Exact counts for one (segment, shard): docs_in == kept + sum(dropped) + sum(malformed)."""

    docs_in: int = 0
    kept: int = 0
    dropped: Counter = field(default_factory=Counter)
    modified: Counter = field(default_factory=Counter)  # kept, rewritten (e.g. pii_redacted)
    malformed: Counter = field(default_factory=Counter)  # segment 0 only; "blank" lines included
    repaired: Counter = field(default_factory=Counter)
    by_source: dict[str, Counter] = field(default_factory=dict)  # name -> docs_in/kept/dropped counts
    tokens: int = 0
    examples: dict[str, list[dict]] = field(default_factory=dict)

    def source(self, name: str) -> Counter:
        return self.by_source.setdefault(name, Counter())

    def as_dict(self) -> dict[str, Any]:
        return {"docs_in": self.docs_in, "kept": self.kept, "dropped": dict(sorted(self.dropped.items())),
                "modified": dict(sorted(self.modified.items())), "malformed": dict(sorted(self.malformed.items())),
                "repaired": dict(sorted(self.repaired.items())), "tokens": self.tokens,
                "by_source": {k: dict(sorted(v.items())) for k, v in sorted(self.by_source.items())},
                "examples": self.examples}  # fmt: skip


_BUILT: dict[
    str, Any
] = {}  # per-process cache of built filters: loading a language model once, not per shard


def _build(stage: Stage, recipe: DataRecipe) -> Any:
    key = json.dumps([stage.kind, stage.params, str(recipe.root)], sort_keys=True, default=str)
    if key not in _BUILT:
        if stage.kind == "decontam":
            cfg = stage.config
            evals = tuple(str(p if Path(p).is_absolute() else recipe.root / p) for p in cfg.evals)
            _BUILT[key] = decontam.decontam_filter(dataclasses.replace(cfg, evals=evals))
        else:
            params = dict(stage.params)
            lexicon = params.get("lexicon_file")
            if lexicon and not Path(lexicon).is_absolute():  # recipe paths are relative to the recipe
                params["lexicon_file"] = str(recipe.root / lexicon)
            _BUILT[key] = filters.build_filter(stage.kind, params)
    return _BUILT[key]


def _segment0_docs(recipe: DataRecipe, units: list[Unit], stats: StepStats,
                   quarantine: Quarantine) -> Iterator[tuple[int, Doc]]:  # fmt: skip
    for unit in units:
        src = recipe.sources[unit.source]
        st = SourceStats()
        kwargs: dict[str, Any] = {"text_field": src.text_field, "id_field": src.id_field,
                                  "max_line_bytes": src.max_line_bytes, "quarantine": quarantine, "stats": st}  # fmt: skip
        if src.format == "chat":
            kwargs["chat"] = True
        elif src.format == "preference":
            kwargs["preference"] = True
        if unit.byte_range is not None:
            kwargs["byte_range"] = unit.byte_range
        for doc in read_source(unit.path, **kwargs):
            yield unit.source, doc
        bad = Counter(st.malformed)
        if st.blank:
            bad["blank"] += st.blank  # a record that is no document: counted so docs_in adds up exactly
        stats.docs_in += sum(bad.values())  # the documents themselves are counted as they are yielded
        stats.malformed.update(bad)
        stats.repaired.update(st.repaired)
        counts = stats.source(src.name)
        counts["docs_in"] += sum(bad.values())
        counts["malformed"] += sum(bad.values())


def _work_docs(path: Path, dropped: np.ndarray | None, method: str,
               stats: StepStats, recipe: DataRecipe) -> Iterator[tuple[int, Doc]]:  # fmt: skip
    with open(path, encoding="utf-8") as f:
        for i, line in enumerate(f):
            rec = json.loads(line)
            doc = Doc(rec["id"], rec["text"], rec["meta"])
            if dropped is not None and dropped[i]:
                _drop(stats, recipe.sources[rec["src"]].name, doc, f"dedup_{method}", recipe, count_in=True)
                continue
            yield rec["src"], doc


def _example(doc: Doc, source: str) -> dict:
    text = redact_all(doc.text)  # personal data is never shown, even in a removal report
    if len(text) > 2 * EXAMPLE_CHARS + 5:  # head and tail: what a filter objects to is often at the end
        text = f"{text[:EXAMPLE_CHARS]} […] {text[-EXAMPLE_CHARS:]}"
    return {"id": doc.id, "source": source, "text": text}


def _drop(
    stats: StepStats, name: str, doc: Doc, reason: str, recipe: DataRecipe, count_in: bool = False
) -> None:
    if count_in:
        stats.docs_in += 1
        stats.source(name)["docs_in"] += 1
    stats.dropped[reason] += 1
    stats.source(name)[f"dropped:{reason}"] += 1
    shown = stats.examples.setdefault(reason, [])
    if len(shown) < recipe.output.examples:
        shown.append(_example(doc, name))


def _judge_doc(built: list[Any], doc: Doc) -> tuple[Doc | None, str, Doc, list[str]]:
    """(the document or None, the drop reason, the document the dropping filter saw, modified reasons)."""
    modified = []
    for fn in built:
        new, reason = fn(doc)
        if new is None:
            return None, reason, doc, modified
        if reason:
            modified.append(reason)
        doc = new
    return doc, "", doc, modified


def _judge_pair(built: list[Any], doc: Doc) -> tuple[Doc | None, str, Doc, list[str]]:
    """`_judge_doc` for a preference pair: each answer is judged as the chat document prompt + answer.

    Stage by stage, chosen then rejected: the pair is dropped at the first stage either answer fails,
    once, under that answer's reason (the report's example is that answer's conversation). A rewrite
    (pii_redacted) counts once per stage however many answers it changed; the prompt kept is the
    chosen side's (filters are pure per turn, so both sides rewrite it alike)."""
    pair = doc.meta["preference"]
    base = {k: v for k, v in doc.meta.items() if k != "preference"}
    n = len(pair["prompt"])
    sides = [
        Doc(doc.id, chat_text(turns), {**base, "messages": turns})
        for turns in (pair["prompt"] + pair["chosen"], pair["prompt"] + pair["rejected"])
    ]
    modified = []
    for fn in built:
        reasons = []
        for i, side in enumerate(sides):
            new, reason = fn(side)
            if new is None:
                return None, reason, side, modified
            if reason and reason not in reasons:
                reasons.append(reason)
            sides[i] = new
        modified += reasons
    chosen, rejected = (s.meta["messages"] for s in sides)
    record = {**pair, "prompt": chosen[:n], "chosen": chosen[n:], "rejected": rejected[n:]}
    return Doc(doc.id, chat_text(chosen + rejected[n:]), {**base, "preference": record}), "", doc, modified


def _record(doc: Doc, name: str, fmt: str) -> dict:
    """The kept document as written to kept/: its original fields, the id, and the (filtered) text; a
    preference pair as the normalised row `data.preference.read_preference_jsonl` reads."""
    meta = dict(doc.meta)
    if fmt == "chat":
        return {"id": doc.id, "messages": meta.pop("messages"), **meta, "corpus": name}
    if fmt == "preference":
        return {"id": doc.id, **meta.pop("preference"), **meta, "corpus": name}
    return {"id": doc.id, "text": doc.text, **meta, "corpus": name}


def run_segment(recipe: DataRecipe, out: Path, seg: int, stages: list[Stage], shard: int,
                units: list[Unit], last: bool, next_dedup: dedup.DedupConfig | None,
                prev_dedup: dedup.DedupConfig | None) -> dict[str, Any]:  # fmt: skip
    """Process one shard of one segment; returns its stats (also written to work/seg{seg}/stats-*.json)."""
    stats, name = StepStats(), f"{shard:05d}"
    work = out / "work" / f"seg{seg}"
    built = [_build(s, recipe) for s in stages]
    quarantine = Quarantine(out / "quarantine" / f"part-{name}.jsonl" if seg == 0 else None)
    if seg == 0:
        docs = _segment0_docs(recipe, units, stats, quarantine)
    else:
        prev = out / "work" / f"seg{seg - 1}"
        mask = np.load(out / "work" / f"dedup{seg - 1}" / f"dropped-{name}.npy", allow_pickle=False)
        docs = _work_docs(prev / f"part-{name}.jsonl", mask, prev_dedup.method, stats, recipe)
    pending: list[str] = []  # survivors' texts awaiting signatures, at most SIG_BATCH of them
    sigs: list[np.ndarray] = []
    tokens = _TokenPart(out, name, _tokenizer(recipe)) if last and recipe.output.tokenizer else None
    target = out / "kept" / f"part-{name}.jsonl" if last else work / f"part-{name}.jsonl"
    with atomic_open(target) as f:
        for src_idx, doc in docs:
            src = recipe.sources[src_idx]
            stats.docs_in += 1
            stats.source(src.name)["docs_in"] += 1
            judge = _judge_pair if src.format == "preference" else _judge_doc
            new, reason, judged, modified = judge(built, doc)
            stats.modified.update(modified)
            if new is None:
                _drop(stats, src.name, judged, reason, recipe)
                continue
            doc = new
            stats.kept += 1
            stats.source(src.name)["kept"] += 1
            if last:
                f.write(
                    json.dumps(_record(doc, src.name, src.format), ensure_ascii=False, default=str) + "\n"
                )
                if tokens is not None and src.format == "text" and doc.text:
                    tokens.add(doc.text, src_idx)
            else:
                rec = {"id": doc.id, "src": src_idx, "text": doc.text, "meta": doc.meta}
                f.write(json.dumps(rec, ensure_ascii=False, default=str) + "\n")
                if next_dedup is not None:
                    pending.append(doc.text)
                    if len(pending) == SIG_BATCH:
                        sigs.append(dedup.signatures(pending, next_dedup))
                        pending = []
    if seg == 0:
        quarantine.close()
    if next_dedup is not None:
        sigs.append(dedup.signatures(pending, next_dedup))  # signatures do not depend on the batching
        with atomic_open(work / f"sig-{name}.npy", "wb") as g:
            np.save(g, np.concatenate(sigs), allow_pickle=False)
    if tokens is not None:
        stats.tokens = tokens.close()
    result = {"shard": shard, "segment": seg, **stats.as_dict()}
    write_json(work / f"stats-{name}.json", result)
    return result


_TOKENIZERS: dict[str, Any] = {}


def _tokenizer(recipe: DataRecipe) -> Any:
    from gemmakit.tokenizer import Tokenizer

    spec = recipe.output.tokenizer
    if spec == "nano":
        path = Path(__file__).resolve().parents[1] / "assets" / "nano" / "tokenizer.model"
    else:
        path = Path(spec) if Path(spec).is_absolute() else recipe.root / spec
    if str(path) not in _TOKENIZERS:
        _TOKENIZERS[str(path)] = Tokenizer.load(path)
    return _TOKENIZERS[str(path)]


class _TokenPart:
    """The shard's token part: work/tokens/part-NNNNN (a complete shard directory, written by
    ShardWriter: atomic), plus the source index of each document (for the mixture). Nothing at all
    when the shard keeps no text documents; the writer opens on the first one."""

    def __init__(self, out: Path, name: str, tok: Any) -> None:
        self.dir, self.name, self.tok = out / "work" / "tokens", name, tok
        self.writer: ShardWriter | None = None
        self.src: list[int] = []

    def add(self, text: str, src: int) -> None:
        if self.writer is None:
            self.writer = ShardWriter(self.dir / f"part-{self.name}", vocab_size=self.tok.vocab_size,
                                      tokenizer_sha256=self.tok.sha256, bos_id=self.tok.bos_id,
                                      meta={"created_by": "gemmakit.data.pipeline"}, overwrite=True)  # fmt: skip
        self.writer.add(self.tok.encode(text, bos=True, eos=True))
        self.src.append(src)

    def close(self) -> int:
        if self.writer is None:
            return 0
        self.writer.close()
        with atomic_open(self.dir / f"part-{self.name}.src.npy", "wb") as g:
            np.save(g, np.asarray(self.src, dtype=np.int32), allow_pickle=False)
        return self.writer.n_tokens
