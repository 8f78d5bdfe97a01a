"""The data-run report: report.md (counts per filter, per source, per shard; examples of removed
documents per reason) and report.png (a bar chart of removals), rendered from stats.json alone.

Where it sits: written by `data.finalize` at the end of a run and by `gemmakit data report DIR`; it
reads nothing but stats.json, so a report can be re-rendered anywhere the directory is copied.
Examples come from the shards (first ones in shard order) with every personal-data finding already
replaced by a typed placeholder when they were recorded (`pii.redact_all`).

Key trade-off: the chart needs matplotlib (the data extra); without it report.md is still written and
says how to get the chart, so a minimal install never fails at its last step.
"""

from __future__ import annotations

import io
import json
import logging
from pathlib import Path
from typing import Any

from gemmakit.artifact import atomic_open
from gemmakit.errors import UserError

log = logging.getLogger(__name__)


class ReportError(UserError):
    """The directory holds no readable stats.json."""


def _pct(n: int, total: int) -> str:
    return f"{100 * n / total:.2f}%" if total else "-"


def _table(header: list[str], rows: list[list[Any]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]


def render_markdown(stats: dict[str, Any]) -> str:
    t = stats["total"]
    n = t["docs_in"]
    lines = ["# Data run report", "",
             f"Records in: {n:,}; kept: {t['kept']:,} ({_pct(t['kept'], n)}); removed: "
             f"{sum(t['dropped'].values()):,}; malformed: {sum(t['malformed'].values()):,}; "
             f"tokens: {t['tokens']:,}. Shards: {stats['shards_count']}.", "",
             "Conservation (checked, per shard and in total): records in = kept + removed + malformed.", "",
             "## Removed, by reason", ""]  # fmt: skip
    rows = [[r, f"{c:,}", _pct(c, n)] for r, c in sorted(t["dropped"].items(), key=lambda kv: -kv[1])]
    lines += _table(["reason", "documents", "share of records"], rows) if rows else ["(none)"]
    if t["modified"]:
        lines += ["", "## Kept but rewritten", ""]
        lines += _table(["reason", "documents"], [[r, f"{c:,}"] for r, c in sorted(t["modified"].items())])
    if t["malformed"]:
        lines += ["", "## Malformed input (quarantine/part-*.jsonl has each with file:line)", ""]
        lines += _table(["category", "records"], [[r, f"{c:,}"] for r, c in sorted(t["malformed"].items())])
    lines += ["", "## By source", ""]
    rows = [[name, f"{s['docs_in']:,}", f"{s['kept']:,}", _pct(s["kept"], s["docs_in"]), f"{s['malformed']:,}",
             ", ".join(f"{r} {c:,}" for r, c in sorted(s["dropped"].items(), key=lambda kv: -kv[1])[:4]) or "-"]
            for name, s in stats["by_source"].items()]  # fmt: skip
    lines += _table(["source", "records", "kept", "kept %", "malformed", "top removals"], rows)
    if stats["decontamination"]:
        lines += ["", "## Evaluation-set contamination", ""]
        lines += _table(
            ["eval set", "documents hit"], [[k, f"{v:,}"] for k, v in stats["decontamination"].items()]
        )
    for name, d in stats["dedup"].items():
        lines += ["", f"## Deduplication ({name})", "",
                  f"{d['clusters']:,} clusters, {d['removed']:,} documents removed, largest cluster "
                  f"{d['largest']:,}; members listed in `{d['file']}` (kept document first)."]  # fmt: skip
    if stats.get("tokens"):
        tk = stats["tokens"]
        lines += [
            "",
            f"Token shards: `{tk['dir']}/` ({tk['n_docs']:,} documents, {tk['n_tokens']:,} tokens).",
        ]
    if stats.get("mixture"):
        lines += ["", "## Mixture", ""]
        rows = [[ph["dir"], ph["fraction"], f"{ph['tokens']:,}",
                 ", ".join(f"{s} {v['tokens']:,} ({v['epochs_started']} new epochs)" for s, v in ph["sources"].items())]
                for ph in stats["mixture"]["phases"]]  # fmt: skip
        lines += _table(["phase", "fraction", "tokens", "per source"], rows)
    lines += ["", "## Per shard", ""]
    rows = [[s["shard"], f"{s['docs_in']:,}", f"{s['kept']:,}", f"{sum(s['dropped'].values()):,}",
             f"{sum(s['malformed'].values()):,}"] for s in stats["shards"]]  # fmt: skip
    lines += _table(["shard", "records", "kept", "removed", "malformed"], rows)
    if stats["examples"]:
        lines += ["", "## Examples of removed documents (personal data redacted)", ""]
        for reason, items in stats["examples"].items():
            lines += [f"### {reason}", ""]
            for e in items:
                text = " ".join(e["text"].split())
                lines += [f"- `{e['id']}` ({e['source']}): {text}"]
            lines.append("")
    lines += ["", "![removals by reason](report.png)", ""]
    return "\n".join(lines)


def render_png(stats: dict[str, Any]) -> bytes | None:
    """A horizontal bar chart of removals by reason (PNG bytes), or None without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    items = sorted({**stats["total"]["dropped"], **stats["total"]["malformed"]}.items(), key=lambda kv: kv[1])
    fig, ax = plt.subplots(figsize=(8, 0.35 * max(len(items), 3) + 1.2))
    ax.barh([k for k, _ in items], [v for _, v in items], color="#4a78b5")
    ax.set_xlabel("documents")
    ax.set_title(f"Removed or malformed, of {stats['total']['docs_in']:,} records")
    fig.tight_layout()
    buf = io.BytesIO()
    # Fixed metadata: the same stats give the same bytes (matplotlib otherwise stamps its version/date).
    fig.savefig(buf, format="png", dpi=100, metadata={"Software": None})
    plt.close(fig)
    return buf.getvalue()


def write_report(out: Path, stats: dict[str, Any] | None = None) -> Path:
    """report.md and report.png in `out` (stats read from out/stats.json when not given)."""
    out = Path(out)
    if stats is None:
        try:
            stats = json.loads((out / "stats.json").read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ReportError(f"{out}: no stats.json (not a finished data run)") from None
        except ValueError as e:
            raise ReportError(f"{out / 'stats.json'}: not valid JSON ({e})") from None
    png = render_png(stats)
    md = render_markdown(stats)
    if png is None:
        md += "\n(Install matplotlib, e.g. pip install 'gemmakit[data]', for report.png.)\n"
    else:
        with atomic_open(out / "report.png", "wb") as f:
            f.write(png)
    with atomic_open(out / "report.md") as f:
        f.write(md)
    return out / "report.md"
