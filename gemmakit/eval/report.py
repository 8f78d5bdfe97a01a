"""The evaluation report: report.md (measured scores with standard errors, beside the Gemma reports'
published numbers for the same model size) and report.png (a grouped bar chart), from results.json.

Where it sits: written by `eval.runner.evaluate` and re-rendered by `gemmakit eval --report DIR`; reads
only results.json. Published numbers (`eval.published`) appear only when the evaluated model is one of
the report's sizes (its preset name), labelled with their source and protocol.

Key trade-off: scores are shown in percent with one standard error, and the gap to the published number
is printed but never judged: the reports' prompts are not public in full, so agreement within a few
points is what a faithful reimplementation can expect (shared/reference §3.2 caveat).
"""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

from gemmakit.artifact import atomic_open
from gemmakit.errors import UserError
from gemmakit.eval.published import published_for


def _pct(entry: dict[str, Any]) -> tuple[float, float | None]:
    """(value, stderr) in percent for rate metrics; perplexity metrics stay as they are."""
    value, err = entry["value"], entry["stderr"].get(entry["metric"])
    if entry["kind"] == "perplexity":
        return value, None
    return 100 * value, (100 * err if err is not None else None)


def render_markdown(results: dict[str, Any], chart: bool = True) -> str:
    model = results.get("model", {})
    pub = published_for(model.get("preset"))
    lines = ["# Evaluation report", "",
             f"Model: `{model.get('dir') or model.get('preset') or results['lm']}`; adapter {results['lm']}; "
             f"protocol `{results['protocol']}`; limit {results['limit'] or 'none'}; gemmakit "
             f"{results['gemmakit_version']}.", ""]  # fmt: skip
    header = ["task", "metric", "score", "± stderr", "n", "shots"]
    if pub:
        header += [f"published ({pub['source']}, protocol {pub['protocol']})", "difference"]
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name, e in results["tasks"].items():
        value, err = _pct(e)
        row = [name, e["metric"], f"{value:.2f}", f"{err:.2f}" if err is not None else "-", str(e["n"]),
               str(e["num_fewshot"])]  # fmt: skip
        if pub:
            ref = pub["scores"].get(name)
            row += [
                f"{ref:.1f}" if ref is not None else "-",
                f"{value - ref:+.1f}" if ref is not None else "-",
            ]
        lines.append("| " + " | ".join(row) + " |")
    lines += ["", "Scores in percent (perplexity rows: bits per byte). Per-document requests and answers: "
              "`samples/<task>.jsonl`; data file digests: `results.json`.", ""]  # fmt: skip
    if chart:
        lines += ["![scores](report.png)", ""]
    return "\n".join(lines)


def render_png(results: dict[str, Any]) -> bytes | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    pub = published_for(results.get("model", {}).get("preset"))
    names = [n for n, e in results["tasks"].items() if e["kind"] == "task"]
    if not names:
        return None
    measured = [_pct(results["tasks"][n])[0] for n in names]
    fig, ax = plt.subplots(figsize=(max(6, 0.9 * len(names) + 2), 4))
    xs = range(len(names))
    width = 0.4 if pub else 0.6
    ax.bar([x - (width / 2 if pub else 0) for x in xs], measured, width, label="measured", color="#4a78b5")
    if pub:
        ref = [pub["scores"].get(n, 0.0) for n in names]
        ax.bar([x + width / 2 for x in xs], ref, width, label=f"published ({pub['source']})", color="#c9a227")
    ax.set_xticks(list(xs), names, rotation=30, ha="right")
    ax.set_ylabel("score (%)")
    ax.set_title(f"protocol {results['protocol']}")
    ax.legend()
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, metadata={"Software": None})
    plt.close(fig)
    return buf.getvalue()


class ReportError(UserError):
    """A results.json that cannot be re-rendered (missing, not JSON, or not an eval run's results)."""


# the keys render_markdown reads; an eval run always writes them
_RESULT_KEYS = ("lm", "protocol", "limit", "gemmakit_version", "tasks")


def read_results(path: Path) -> dict[str, Any]:
    """An eval run's results.json, checked to hold what the report renders."""
    try:
        results = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ReportError(f"{path}: no results.json here (expected an eval run's output directory)") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ReportError(f"{path}: cannot read as JSON ({e})") from None
    if not isinstance(results, dict) or not all(k in results for k in _RESULT_KEYS):
        raise ReportError(f"{path}: expected an eval run's results with keys {list(_RESULT_KEYS)}")
    if not isinstance(results["tasks"], dict) or not all(
        isinstance(e, dict) for e in results["tasks"].values()
    ):
        raise ReportError(f"{path}: 'tasks' must map task names to result objects")
    return results


def write_report(out: Path, results: dict[str, Any] | None = None) -> Path:
    """report.md (and report.png with matplotlib) in `out`, from `results` or out/results.json."""
    out = Path(out)
    if results is None:
        results = read_results(out / "results.json")
    png = render_png(results)
    if png is not None:
        with atomic_open(out / "report.png", "wb") as f:
            f.write(png)
    with atomic_open(out / "report.md") as f:
        f.write(render_markdown(results, chart=png is not None))
    return out / "report.md"
