"""Data pipeline throughput: gemmakit's quality + MinHash dedup vs HF datatrove's, side by side in one run.

Both systems read the same synthetic web-like corpus (`gemmakit.data.webgen.web_docs`, default 100,000
documents, written once as 4 plain JSONL files), apply Gopher quality + repetition rules, C4-style
boilerplate rules and MinHash near-duplicate removal, and write the kept documents as plain JSONL.
Each system runs in its own fresh subprocess; the wall time covers everything from reading the corpus
to the last kept document on disk (imports excluded). Reported per system: wall s, docs/s, docs/s per
core (= docs / (wall x worker processes)), CPU s of the process and its children (a check: CPU/wall
near the worker count means the shared host did not starve the run), documents kept after the quality
stage, removed by dedup and kept at the end, and the ratio gemmakit / datatrove per core.
Results: JSON in benchmarks/results/data_throughput.json and a section of benchmarks/RESULTS.md.

    python benchmarks/data_throughput.py --quick                    # 5,000 docs, 1 worker each
    python benchmarks/data_throughput.py                            # 100,000 docs; gemmakit also at 2 workers
    python benchmarks/data_throughput.py --quick --skip-datatrove --profile   # where gemmakit's time goes

gemmakit: `data.pipeline.run` on a recipe of [pipeline] shards=4, a "quality" stage (QualityConfig
defaults: Gopher quality + repetition, C4 boilerplate markers) and a "dedup" stage (DedupConfig
defaults: word 5-grams, 112 permutations, 16 bands x 7 rows, candidates verified at Jaccard >= 0.8),
[output] tokenizer = "" (no token shards), executor "local" with `workers` processes.

datatrove 0.10.1 (`pip install "datatrove[processing]==0.10.1" spacy orjson`), LocalPipelineExecutor
with workers=1 for the per-core number, five executor runs in sequence:
  1. quality (tasks = 4 files): JsonlReader -> GopherRepetitionFilter() -> GopherQualityFilter() ->
     C4QualityFilter(C4_OPTIONS) -> JsonlWriter(compression=None); Gopher filters at their published
     defaults, the same thresholds as gemmakit's QualityConfig.
  2. signatures (4 tasks): JsonlReader(step 1 output) -> MinhashDedupSignature;
  3. buckets (16 tasks, one per band): MinhashDedupBuckets; 4. cluster (1 task): MinhashDedupCluster;
  5. filter (4 tasks): JsonlReader(step 1 output) -> MinhashDedupFilter -> JsonlWriter(compression=None).
  MinhashConfig(n_grams=5, num_buckets=16, hashes_per_bucket=7, seed=1): the same n-gram size and
  bands x rows as gemmakit's default (taken from DedupConfig().band_rows() at run time); datatrove's
  64-bit xxhash shingles and its default text normalisation; it does not verify candidate pairs.
C4 options (C4_OPTIONS): only the boilerplate rules gemmakit also has (lorem ipsum: drop the document;
javascript and cookie/terms/privacy-policy lines: datatrove drops the LINE, gemmakit the document).
Off, because gemmakit's defaults do not apply them: terminal-punctuation line removal, the >= 5
sentences rule (which would also sentence-split every line), >= 3 words per line, the 1000-character
word rule, citation removal and the curly-bracket rule.

Word tokenizer, offline: datatrove's Gopher filters and MinHash signatures split words with the
tokenizer its assets/tokenizer_assignment.csv assigns to the language; for English ("eng", the default)
that is SpaCyTokenizer("en") = `spacy.blank("en")` + the rule-based "sentencizer" pipe. Both ship
inside the spacy wheel from PyPI (no model download, no NLTK punkt data: datatrove 0.10.1 assigns NLTK
to no language, and step 1 never sentence-splits with min_num_sentences=-1), so `pip install spacy`
(3.8.18 here) is all it takes; orjson is needed by datatrove's JSONL reader and writer. This is the
tokenizer datatrove runs on English in production, so its cost is part of the comparison.

The kept counts differ by design: datatrove's rules differ in details (it counts words with spaCy,
drops boilerplate lines instead of documents, and keeps every LSH candidate pair as a duplicate while
gemmakit verifies them), so the table reports both counts and a per-kind breakdown of what survived.
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import importlib.metadata
import json
import os
import pstats
import resource
import shutil
import statistics
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
FILES = 4  # corpus files; also gemmakit's shard count and datatrove's task count for per-file steps
C4_OPTIONS = {"split_paragraph": True, "remove_citations": False, "filter_no_terminal_punct": False,
              "min_num_sentences": -1, "min_words_per_line": -1, "max_word_length": -1,
              "filter_lorem_ipsum": True, "filter_javascript": True, "filter_curly_bracket": False,
              "filter_policy": True}  # fmt: skip
STARVED = 0.85  # CPU/wall under this share of the worker count: the run did not get its cores
SECTION = "data_throughput"  # its marked section of RESULTS.md (results_md.update_section)


# ---- corpus --------------------------------------------------------------------------------------------


def write_corpus(root: Path, docs: int, seed: int) -> Path:
    """`docs` webgen documents as FILES plain JSONL files under root/corpus-<docs>-<seed>/ (reused when
    complete: a marker is written after every file is closed)."""
    from gemmakit.data.webgen import web_docs

    corpus = root / f"corpus-{docs}-{seed}"
    if (corpus / ".complete").exists():
        return corpus
    shutil.rmtree(corpus, ignore_errors=True)
    corpus.mkdir(parents=True)
    with contextlib.ExitStack() as stack:
        handles = [stack.enter_context(open(corpus / f"part-{k}.jsonl", "w", encoding="utf-8"))
                   for k in range(FILES)]  # fmt: skip
        for i, doc in enumerate(web_docs(docs, seed)):  # contiguous chunks: file k holds docs [k n/4, ...)
            handles[i * FILES // docs].write(json.dumps(doc, ensure_ascii=False) + "\n")
    (corpus / ".complete").touch()
    return corpus


def kinds_of(paths: list[Path]) -> Counter:
    """Documents per webgen "kind" in JSONL files (gemmakit keeps it top-level, datatrove in metadata)."""
    counts: Counter = Counter()
    for path in paths:
        with open(path, encoding="utf-8") as f:
            for line in f:
                rec = json.loads(line)
                counts[rec.get("kind") or rec.get("metadata", {}).get("kind", "?")] += 1
    return counts


def _lines(paths: list[Path]) -> int:
    n = 0
    for path in paths:
        with open(path, "rb") as f:
            n += sum(1 for _ in f)
    return n


# ---- the two systems (each runs inside a worker process) ---------------------------------------------


def gemmakit_run(corpus: Path, run_dir: Path, workers: int) -> dict[str, Any]:
    """The gemmakit pipeline over the corpus into run_dir; timing and counts."""
    from gemmakit.data.pipeline import run
    from gemmakit.data.recipe import recipe_from_dict

    raw = {"pipeline": {"shards": FILES, "workers": workers},
           "source": [{"name": "web", "paths": [str(corpus / "*.jsonl")]}],
           "stage": [{"kind": "quality"}, {"kind": "dedup", "method": "minhash"}],
           "output": {"tokenizer": ""}}  # fmt: skip
    recipe = recipe_from_dict(raw, "data_throughput", corpus)
    t0, c0 = time.perf_counter(), _cpu_s()
    stats = run(recipe, run_dir, executor="local", workers=workers)
    wall, cpu = time.perf_counter() - t0, _cpu_s() - c0
    total = stats["total"]
    dedup_removed = sum(v for k, v in total["dropped"].items() if k.startswith("dedup_"))
    return {"wall_s": wall, "cpu_s": cpu, "docs_in": total["docs_in"], "kept": total["kept"],
            "dedup_removed": dedup_removed, "after_quality": total["kept"] + dedup_removed,
            "quality_dropped": {k: v for k, v in total["dropped"].items() if not k.startswith("dedup_")},
            "kept_by_kind": kinds_of(sorted((run_dir / "kept").glob("*.jsonl")))}  # fmt: skip


def datatrove_stages(corpus: Path, run_dir: Path) -> list[tuple[str, list, int]]:
    """(name, pipeline, tasks) of the five datatrove executor runs (see the module docstring)."""
    from datatrove.pipeline.dedup.minhash import (
        MinhashConfig,
        MinhashDedupBuckets,
        MinhashDedupCluster,
        MinhashDedupFilter,
        MinhashDedupSignature,
    )
    from datatrove.pipeline.filters import C4QualityFilter, GopherQualityFilter, GopherRepetitionFilter
    from datatrove.pipeline.readers import JsonlReader
    from datatrove.pipeline.writers import JsonlWriter

    from gemmakit.data.dedup import DedupConfig

    ours = DedupConfig()
    bands, rows = ours.band_rows()
    mh = MinhashConfig(n_grams=ours.ngram, num_buckets=bands, hashes_per_bucket=rows, seed=1)
    d = {k: str(run_dir / k) for k in ("filtered", "sigs", "buckets", "remove", "kept")}

    def reader(folder: str) -> Any:
        return JsonlReader(folder, glob_pattern="*.jsonl", compression=None)

    return [
        ("quality", [reader(str(corpus)), GopherRepetitionFilter(), GopherQualityFilter(),
                     C4QualityFilter(**C4_OPTIONS), JsonlWriter(d["filtered"], compression=None)], FILES),
        ("signatures", [reader(d["filtered"]), MinhashDedupSignature(output_folder=d["sigs"], config=mh)], FILES),
        ("buckets", [MinhashDedupBuckets(input_folder=d["sigs"], output_folder=d["buckets"], config=mh)], bands),
        ("cluster", [MinhashDedupCluster(input_folder=d["buckets"], output_folder=d["remove"], config=mh)], 1),
        ("filter", [reader(d["filtered"]), MinhashDedupFilter(input_folder=d["remove"]),
                    JsonlWriter(d["kept"], compression=None)], FILES),
    ]  # fmt: skip


def datatrove_run(corpus: Path, run_dir: Path, workers: int) -> dict[str, Any]:
    """The datatrove pipelines over the corpus into run_dir; timing (total and per executor run) and counts."""
    from datatrove.executor import LocalPipelineExecutor

    stage_s = {}
    t0, c0 = time.perf_counter(), _cpu_s()
    for name, pipeline, tasks in datatrove_stages(corpus, run_dir):
        ts = time.perf_counter()
        LocalPipelineExecutor(pipeline, tasks=tasks, workers=min(workers, tasks),
                              logging_dir=str(run_dir / "logs" / name)).run()  # fmt: skip
        stage_s[name] = time.perf_counter() - ts
    wall, cpu = time.perf_counter() - t0, _cpu_s() - c0
    after_quality = _lines(sorted((run_dir / "filtered").glob("*.jsonl")))
    kept_files = sorted((run_dir / "kept").glob("*.jsonl"))
    kept = _lines(kept_files)
    return {"wall_s": wall, "cpu_s": cpu, "stage_s": stage_s, "docs_in": _lines(sorted(corpus.glob("*.jsonl"))),
            "after_quality": after_quality, "dedup_removed": after_quality - kept, "kept": kept,
            "kept_by_kind": kinds_of(kept_files)}  # fmt: skip


def _cpu_s() -> float:
    """User + system CPU seconds of this process and its reaped children."""
    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def run_worker(args: argparse.Namespace) -> int:
    fn = {"gemmakit": gemmakit_run, "datatrove": datatrove_run}[args.worker]
    run_dir = Path(args.run_dir)
    shutil.rmtree(run_dir, ignore_errors=True)
    result = fn(Path(args.corpus), run_dir, args.worker_n)
    print("RESULT " + json.dumps(result), flush=True)
    return 0


def spawn(system: str, corpus: Path, run_dir: Path, workers: int, timeout: int) -> dict | None:
    """One measurement in a fresh interpreter; None (with the error's tail printed) if it failed."""
    cmd = [sys.executable, __file__, "--worker", system, "--worker-n", str(workers), "--corpus", str(corpus),
           "--run-dir", str(run_dir)]  # fmt: skip
    load = os.getloadavg()[0]  # other users of a shared host show up here (and in CPU/wall)
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return {
                **json.loads(line[7:]),
                "loadavg_1min_before": load,
                "loadavg_1min_after": os.getloadavg()[0],
            }
    tail = (proc.stderr or proc.stdout).strip().splitlines()[-4:]
    print(f"  {system} x{workers}: failed ({' | '.join(tail)})", flush=True)
    return None


# ---- profile, machine, report --------------------------------------------------------------------------


def profile_gemmakit(corpus: Path, run_dir: Path, top: int) -> list[dict[str, Any]]:
    """cProfile of the gemmakit half with one worker (every shard runs in this process): the `top`
    functions by cumulative time."""
    shutil.rmtree(run_dir, ignore_errors=True)
    prof = cProfile.Profile()
    prof.runcall(gemmakit_run, corpus, run_dir, 1)
    rows = []
    for (file, line, func), (_, ncalls, tottime, cumtime, _) in pstats.Stats(prof).stats.items():
        if file.startswith("<frozen"):  # the import machinery (matplotlib's import in the report): noise
            continue
        where = f"{Path(file).name}:{line}({func})" if line else func
        rows.append({"function": where, "ncalls": ncalls, "tottime_s": tottime, "cumtime_s": cumtime})
    return sorted(rows, key=lambda r: -r["cumtime_s"])[:top]


def machine() -> dict[str, Any]:
    """The shared machine record (machine_info.py) plus RAM and the data libraries' versions."""
    sys.path.insert(0, str(HERE))
    from machine_info import machine as base

    out = base()
    with contextlib.suppress(OSError), open("/proc/meminfo") as f:
        kb = next(int(ln.split()[1]) for ln in f if ln.startswith("MemTotal:"))
        out["ram_gb"] = round(kb / 1e6, 1)
    for pkg in ("datatrove", "spacy", "numpy"):
        try:
            out[pkg] = importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            out[pkg] = None
    return out


def derive(r: dict[str, Any], workers: int) -> None:
    r["workers"] = workers
    r["docs_s"] = r["docs_in"] / r["wall_s"]
    r["docs_s_per_core"] = r["docs_s"] / workers


def report(results: dict[str, Any]) -> str:
    m, a = results["machine"], results["args"]
    rows = results["rows"]
    anchor = rows.get("datatrove x1")
    lines = ["## Data pipeline throughput: gemmakit vs datatrove (quality + MinHash dedup)\n",
             f"Machine: {m['cpu']}, {m['cores']} cores, {m.get('ram_gb', '?')} GB RAM; ISA level "
             f"{m.get('isa_level', 'unknown')}, kernels {m.get('kernel_backend', 'unknown')}; python {m['python']}, "
             f"torch {m['torch']}, datatrove {m['datatrove']}, spacy {m['spacy']}, numpy {m['numpy']}.",
             f"Corpus: {results['docs']:,} webgen documents (seed {a['seed']}), {results['corpus_mb']:.0f} MB in "
             f"{FILES} JSONL files. Command: `python benchmarks/data_throughput.py {results['command']}`. "
             "Wall time from reading to the last kept document written; per core = docs / (wall x workers).\n",
             "| system | workers | wall s | docs/s | docs/s per core | CPU s (CPU/wall) | kept after quality "
             "| removed by dedup | kept | per core vs datatrove |",
             "|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for name, r in rows.items():
        if r is None:
            lines.append(f"| {name} | failed | | | | | | | | |")
            continue
        ratio = f"{r['docs_s_per_core'] / anchor['docs_s_per_core']:.2f}x" if anchor else "-"
        starved = r["cpu_s"] / r["wall_s"] < STARVED * r["workers"]
        lines.append(f"| {name.split(' x')[0]} | {r['workers']} | {r['wall_s']:.1f} | {r['docs_s']:,.0f} | "
                     f"{r['docs_s_per_core']:,.0f} | {r['cpu_s']:.1f} ({r['cpu_s'] / r['wall_s']:.2f}{'*' * starved}) | "
                     f"{r['after_quality']:,} | {r['dedup_removed']:,} | {r['kept']:,} | {ratio} |")  # fmt: skip
    if any(r and r["cpu_s"] / r["wall_s"] < STARVED * r["workers"] for r in rows.values()):
        lines.append(
            f"\n\\* CPU/wall below {STARVED:.0%} of the worker count: the shared host gave this run "
            "fewer cores than it asked for (another job was running); its docs/s understate it."
        )
    if anchor:
        parts = ", ".join(f"{k} {v:.1f} s" for k, v in anchor["stage_s"].items())
        lines.append(f"\ndatatrove wall by executor run: {parts}.")
    kinds = sorted(results["corpus_kinds"])
    done = [(n, r) for n, r in rows.items() if r]
    lines += ["\nKept documents per webgen kind (what each system's rules let through):\n",
              "| kind | in corpus | " + " | ".join(n for n, _ in done) + " |",
              "|---|---|" + "---|" * len(done)]  # fmt: skip
    for k in kinds:
        cells = " | ".join(f"{r['kept_by_kind'].get(k, 0):,}" for _, r in done)
        lines.append(f"| {k} | {results['corpus_kinds'][k]:,} | {cells} |")
    if results.get("profile"):
        lines += [f"\ngemmakit profile (cProfile, 1 worker, {results['profile_docs']:,} documents; top functions "
                  "by cumulative time):\n",
                  "| function | calls | own s | cumulative s |", "|---|---|---|---|"]  # fmt: skip
        for p in results["profile"]:
            lines.append(
                f"| `{p['function']}` | {p['ncalls']} | {p['tottime_s']:.2f} | {p['cumtime_s']:.2f} |"
            )
    return "\n".join(lines)


# ---- the orchestrator -----------------------------------------------------------------------------------


def _parse(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description="gemmakit vs datatrove: quality + MinHash dedup throughput")
    ap.add_argument("--docs", type=int, default=100_000, help="documents in the corpus")
    ap.add_argument("--quick", action="store_true", help="a smoke run: 5,000 documents, 1 worker")
    ap.add_argument("--seed", type=int, default=0, help="webgen seed")
    ap.add_argument("--workers", default="1,2", help="gemmakit worker counts to measure (comma-separated)")
    ap.add_argument("--anchor-workers", default="1", help="datatrove worker counts to measure")
    ap.add_argument("--reps", type=int, default=1, help="runs per row (median wall reported), alternating")
    ap.add_argument("--skip-datatrove", action="store_true", help="measure gemmakit only")
    ap.add_argument("--profile", action="store_true", help="also cProfile gemmakit with 1 worker")
    ap.add_argument("--profile-docs", type=int, default=5_000, help="corpus size of the profiled run")
    ap.add_argument("--profile-top", type=int, default=25)
    ap.add_argument("--work", default=str(Path.home() / ".cache" / "gemmakit-bench" / "data-throughput"),
                    help="corpus cache and run directories")  # fmt: skip
    ap.add_argument("--keep", action="store_true", help="keep the run directories (outputs of both systems)")
    ap.add_argument("--out", default=str(HERE / "results" / "data_throughput.json"))
    ap.add_argument("--markdown", default=str(HERE / "RESULTS.md"))
    ap.add_argument("--timeout", type=int, default=3600, help="seconds per measured run")
    ap.add_argument("--worker", choices=["gemmakit", "datatrove"], help=argparse.SUPPRESS)
    ap.add_argument("--worker-n", type=int, default=1, help=argparse.SUPPRESS)
    ap.add_argument("--corpus", help=argparse.SUPPRESS)
    ap.add_argument("--run-dir", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.quick:
        args.docs, args.workers = 5_000, "1"
    return args


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    if args.worker:
        return run_worker(args)
    if not args.skip_datatrove:
        try:
            importlib.metadata.version("datatrove")
            importlib.metadata.version("spacy")
        except importlib.metadata.PackageNotFoundError as e:
            print(f"error: {e.name} is not installed: pip install 'datatrove[processing]==0.10.1' spacy orjson, "
                  "or pass --skip-datatrove", file=sys.stderr)  # fmt: skip
            return 2
    work = Path(args.work)
    t0 = time.perf_counter()
    corpus = write_corpus(work, args.docs, args.seed)
    files = sorted(corpus.glob("*.jsonl"))
    print(f"corpus: {args.docs:,} docs in {corpus} ({time.perf_counter() - t0:.0f} s)", flush=True)
    plan = [("gemmakit", int(w)) for w in args.workers.split(",")]
    if not args.skip_datatrove:  # datatrove second: between gemmakit's 1-worker and multi-worker rows
        plan[1:1] = [("datatrove", int(w)) for w in args.anchor_workers.split(",")]
    runs: dict[str, list[dict]] = {f"{s} x{w}": [] for s, w in plan}
    failed: set[str] = set()
    for rep in range(args.reps):
        for system, w in plan if rep % 2 == 0 else plan[::-1]:  # alternate so host drift hits both
            name = f"{system} x{w}"
            r = spawn(system, corpus, work / "runs" / name.replace(" ", "-"), w, args.timeout)
            if r is None:
                failed.add(name)
                continue
            derive(r, w)
            runs[name].append(r)
            print(f"  {name:14s} {r['wall_s']:7.1f} s  {r['docs_s']:8,.0f} docs/s  {r['docs_s_per_core']:8,.0f} "
                  f"per core  CPU {r['cpu_s']:.1f} s  kept {r['kept']:,}", flush=True)  # fmt: skip
    rows: dict[str, dict | None] = {}
    for name, rs in runs.items():  # the run with the median wall time (the middle one of 3)
        walls = [r["wall_s"] for r in rs]
        rows[name] = {**min(rs, key=lambda r: abs(r["wall_s"] - statistics.median(walls))),
                      "wall_s_all": walls} if rs else None  # fmt: skip
    results = {"machine": machine(), "args": {k: v for k, v in vars(args).items() if not k.startswith("worker")},
               "command": " ".join(sys.argv[1:]) if argv is None else " ".join(argv), "docs": args.docs,
               "corpus_mb": sum(f.stat().st_size for f in files) / 1e6, "corpus_kinds": kinds_of(files),
               "rows": rows}  # fmt: skip
    if args.profile:  # on its own (smaller) corpus: cProfile slows the pure-Python rules ~2.5x
        pcorpus = write_corpus(work, args.profile_docs, args.seed)
        results["profile_docs"] = args.profile_docs
        results["profile"] = profile_gemmakit(pcorpus, work / "runs" / "profile", args.profile_top)
    if not args.keep:
        shutil.rmtree(work / "runs", ignore_errors=True)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    md = report(results)
    sys.path.insert(0, str(HERE))
    from results_md import update_section

    update_section(Path(args.markdown), SECTION, md)
    print(md)
    return 0 if not failed else 1


if __name__ == "__main__":
    sys.exit(main())
