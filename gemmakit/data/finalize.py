"""The last step of a data run: merge per-shard stats (checking conservation), assemble the token shards,
build the mixture, write stats.json and the report.

Where it sits: called once by `data.pipeline.run` after every shard has finished its last segment; it
reads only the small per-step stats files and the token parts, never the documents, so rerunning it
(a resumed run, `gemmakit data report`) is cheap and gives the same bytes.

Conservation is checked here, exactly, per shard and in total: docs_in == kept + sum(dropped[reason]) +
sum(malformed[category]); a mismatch is a bug and fails the run instead of writing wrong stats.

Key trade-off: the final token directory is built from hard links to the shards' parts (a copy only
where the filesystem refuses links), so assembling 100 GB of tokens costs a directory of links, not a
second copy; the price is that tokens/ shares inodes with work/tokens/, so deleting work/ is safe but
editing a part in place would change both.
"""

from __future__ import annotations

import json
import os
import shutil
from collections import Counter
from pathlib import Path
from typing import Any

from gemmakit.artifact import atomic_dir, atomic_open, write_json
from gemmakit.data.recipe import DataRecipe

STATS_FORMAT = "gemmakit-data-stats"


def _shard_stats(parts: list[dict[str, Any]], examples: int) -> dict[str, Any]:
    """One shard's totals over its segments: docs_in and malformed from the first, kept from the last."""
    first, last = parts[0], parts[-1]
    dropped, modified, shown = Counter(), Counter(), {}
    by_source: dict[str, Counter] = {}
    for p in parts:
        dropped.update(p["dropped"])
        modified.update(p["modified"])
        for reason, items in p["examples"].items():
            shown.setdefault(reason, []).extend(items)
        for name, c in p["by_source"].items():
            acc = by_source.setdefault(name, Counter())
            for k, v in c.items():
                if (
                    k.startswith("dropped:")
                    or (k in ("docs_in", "malformed") and p is first)
                    or (k == "kept" and p is last)
                ):
                    acc[k] += v
    return {"docs_in": first["docs_in"], "kept": last["kept"], "dropped": dict(sorted(dropped.items())),
            "modified": dict(sorted(modified.items())), "malformed": first["malformed"],
            "repaired": first["repaired"], "tokens": last["tokens"],
            "by_source": {k: dict(sorted(v.items())) for k, v in sorted(by_source.items())},
            "examples": {k: v[:examples] for k, v in sorted(shown.items())}}  # fmt: skip


def _conserved(s: dict[str, Any]) -> bool:
    return s["docs_in"] == s["kept"] + sum(s["dropped"].values()) + sum(s["malformed"].values())


def merge_stats(recipe: DataRecipe, out: Path, segments: list[str]) -> dict[str, Any]:
    """stats.json's content: per shard, per source and in total; RuntimeError if counts do not add up."""
    shards = []
    for s in range(recipe.pipeline.shards):
        parts = [json.loads((out / "work" / seg / f"stats-{s:05d}.json").read_text(encoding="utf-8"))
                 for seg in segments]  # fmt: skip
        shard = {"shard": s, **_shard_stats(parts, recipe.output.examples)}
        if not _conserved(shard):
            raise RuntimeError(f"shard {s}: counts do not add up: {shard}")
        shards.append(shard)
    total: dict[str, Any] = {"docs_in": 0, "kept": 0, "tokens": 0}
    acc = {k: Counter() for k in ("dropped", "modified", "malformed", "repaired")}
    by_source: dict[str, Counter] = {}
    examples: dict[str, list] = {}
    for sh in shards:
        for k in ("docs_in", "kept", "tokens"):
            total[k] += sh[k]
        for k, c in acc.items():
            c.update(sh[k])
        for name, c in sh["by_source"].items():
            by_source.setdefault(name, Counter()).update(c)
        for reason, items in sh["examples"].items():
            examples.setdefault(reason, []).extend(items)
    total.update({k: dict(sorted(c.items())) for k, c in acc.items()})
    if not _conserved(total):
        raise RuntimeError(f"total: counts do not add up: {total}")
    contamination = Counter()
    for reason, n in [*total["dropped"].items(), *total["modified"].items()]:  # drop and flag actions
        if reason.startswith("decontam_"):
            contamination[reason.removeprefix("decontam_flag_").removeprefix("decontam_")] += n
    return {"format": STATS_FORMAT, "version": 1, "shards_count": recipe.pipeline.shards,
            "fingerprint": recipe.fingerprint(), "total": total,
            "by_source": {k: _source_view(v) for k, v in sorted(by_source.items())},
            "decontamination": dict(sorted(contamination.items())), "dedup": _dedup_summary(out),
            "examples": {k: v[: recipe.output.examples] for k, v in sorted(examples.items())},
            "shards": [{k: v for k, v in sh.items() if k != "examples"} for sh in shards]}  # fmt: skip


def _source_view(c: Counter) -> dict[str, Any]:
    dropped = {k.removeprefix("dropped:"): v for k, v in sorted(c.items()) if k.startswith("dropped:")}
    return {"docs_in": c["docs_in"], "kept": c["kept"], "malformed": c["malformed"], "dropped": dropped}


def _dedup_summary(out: Path) -> dict[str, Any]:
    summary = {}
    for path in sorted((out / "dedup").glob("clusters-*.jsonl")):
        sizes = [json.loads(line)["size"] for line in path.read_text(encoding="utf-8").splitlines()]
        summary[path.stem] = {"clusters": len(sizes), "removed": sum(sizes) - len(sizes),
                              "largest": max(sizes, default=0), "file": f"dedup/{path.name}"}  # fmt: skip
    return summary


def _link(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)
    except OSError:  # filesystems without hard links (some network mounts): copy
        shutil.copyfile(src, dst)


def assemble_tokens(recipe: DataRecipe, out: Path) -> dict[str, Any] | None:
    """tokens/: every shard's part, in shard order, as one shard directory (index.json written last)."""
    parts = [out / "work" / "tokens" / f"part-{s:05d}" for s in range(recipe.pipeline.shards)]
    parts = [p for p in parts if (p / "index.json").exists()]
    if not parts:
        return None
    # a shard directory: index.json is its manifest, so the artifact writes none of its own
    with atomic_dir(out / "tokens", overwrite=True, producer="gemmakit.data.finalize", manifest=False) as tmp:
        entries, head = [], None
        for part in parts:
            index = json.loads((part / "index.json").read_text(encoding="utf-8"))
            head = head or index
            for e in index["shards"]:
                j = len(entries)
                _link(part / e["file"], tmp / f"shard-{j:05d}.bin")
                _link(part / e["docs_file"], tmp / f"shard-{j:05d}.docs.npy")
                entries.append({**e, "file": f"shard-{j:05d}.bin", "docs_file": f"shard-{j:05d}.docs.npy"})
        index = {**head, "shards": entries, "n_tokens": sum(e["n_tokens"] for e in entries),
                 "n_docs": sum(e["n_docs"] for e in entries),
                 "meta": {"created_by": "gemmakit.data.pipeline", "recipe_fingerprint": recipe.fingerprint(),
                          "sources": [s.name for s in recipe.sources]}}  # fmt: skip
        with atomic_open(tmp / "index.json") as f:
            f.write(json.dumps(index, indent=1) + "\n")
    return {"dir": "tokens", "n_docs": index["n_docs"], "n_tokens": index["n_tokens"], "files": len(entries)}


def finalize(recipe: DataRecipe, out: Path, steps: list[Any]) -> dict[str, Any]:
    """Merge stats, assemble tokens and the mixture, write stats.json and the report."""
    from gemmakit.data.mixture import build_mixture
    from gemmakit.data.report import write_report

    stats = merge_stats(recipe, out, [s.name for s in steps if s.kind == "segment"])
    stats["tokens"] = assemble_tokens(recipe, out)
    if recipe.mixture is not None:
        stats["mixture"] = build_mixture(recipe, out)
    write_json(out / "stats.json", stats)
    write_report(out, stats)
    return stats
