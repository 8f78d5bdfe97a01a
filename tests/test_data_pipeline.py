"""The data pipeline end to end: counts conserved, filters applied, resumable after kill -9, byte-identical
across reruns, worker counts and executors (reliability-tests.md D1-D7)."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
from data_helpers import RECIPE, kept_ids, tree_digest, write_corpus, write_recipe

from gemmakit.data import shard_step
from gemmakit.data.pipeline import PipelineError, run
from gemmakit.data.recipe import DataRecipeError, load_recipe
from gemmakit.data.shards import Shards
from gemmakit.data.sources import read_jsonl

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, str]]:
    root = tmp_path_factory.mktemp("corpus")
    return root, write_corpus(root)


@pytest.fixture(scope="module")
def reference(corpus: tuple[Path, dict[str, str]]) -> tuple[Path, dict]:
    """One uninterrupted in-process run that the other tests compare against."""
    root, _ = corpus
    out = root / "ref"
    stats = run(load_recipe(write_recipe(root)), out)
    return out, stats


def _check_conservation(s: dict) -> None:
    assert s["docs_in"] == s["kept"] + sum(s["dropped"].values()) + sum(s["malformed"].values()), s


def test_end_to_end_counts_filters_tokens_and_report(corpus, reference) -> None:
    root, records = corpus
    kinds = {i: r["kind"] for i, r in records.items()}
    out, stats = reference
    total = stats["total"]
    assert total["docs_in"] == len(kinds)
    for shard in stats["shards"]:
        _check_conservation(shard)
    _check_conservation(total)
    assert sum(s["docs_in"] for s in stats["by_source"].values()) == len(kinds)

    ids = kept_ids(out)
    assert len(ids) == len(set(ids)) == total["kept"]
    kept_kinds = Counter(kinds[i] for i in ids)
    # What each filter is for never survives it.
    for bad in ("french", "german", "short", "symbols", "boilerplate", "pii_card", "contaminated"):
        assert kept_kinds[bad] == 0, (bad, kept_kinds)
    # A duplicate and the document it copies are never both kept (which one stays depends on global order).
    kept_set = set(ids)
    dups = [r for r in records.values() if r["kind"] == "exact_dup" and r["of"]]
    assert dups and not [r["id"] for r in dups if r["id"] in kept_set and r["of"] in kept_set]
    assert kept_kinds["prose"] > 0.9 * Counter(kinds.values())["prose"]
    assert total["dropped"]["decontam_quiz"] == Counter(kinds.values())["contaminated"]
    assert stats["decontamination"] == {"quiz": total["dropped"]["decontam_quiz"]}
    assert total["dropped"]["dedup_minhash"] >= Counter(kinds.values())["exact_dup"]
    assert total["modified"]["pii_redacted"] >= Counter(kinds.values())["pii_email"] * 0.95

    # Kept emails are redacted in the kept JSONL; the originals' fields travel along.
    kept = [json.loads(x) for p in sorted((out / "kept").glob("*.jsonl")) for x in p.read_text().splitlines()]
    emails = [r for r in kept if kinds[r["id"]] == "pii_email"]
    assert emails and all("<EMAIL>" in r["text"] and "@example.org" not in r["text"] for r in emails)
    assert all(r["title"].startswith("Book ") for r in kept if r["corpus"] == "books")

    # Token shards: one document per kept text document, readable by training's reader.
    tokens = Shards.open(out / "tokens", verify=True)
    assert tokens.n_docs == total["kept"] and tokens.n_tokens == total["tokens"]

    # Staged mixture: phase 1 raises the books' share.
    mix = stats["mixture"]["phases"]
    share = [p["sources"]["books"]["tokens"] / p["tokens"] for p in mix]
    assert share[0] < 0.35 < 0.65 < share[1], share
    for p in mix:
        assert Shards.open(out / p["dir"], verify=True).n_tokens == p["tokens"]

    clusters = [json.loads(x) for x in (out / "dedup" / "clusters-0.jsonl").read_text().splitlines()]
    assert clusters and all(c["kept"] == c["members"][0]["id"] and c["size"] >= 2 for c in clusters)
    assert not set(ids) & {m["id"] for c in clusters for m in c["members"][1:]}

    report = (out / "report.md").read_text()
    assert "pii_card" in report and "<CARD>" in report and "decontam_quiz" in report
    assert (out / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    cards = [e["text"] for e in stats["examples"]["pii_card"]]
    assert cards and all("<CARD>" in t for t in cards)


def test_rerun_reads_nothing_and_changes_nothing(corpus, reference, monkeypatch) -> None:
    root, _ = corpus
    out, _ = reference
    before = tree_digest(out)
    reads = []
    real = shard_step.read_source
    monkeypatch.setattr(shard_step, "read_source", lambda *a, **k: reads.append(a) or real(*a, **k))
    run(load_recipe(write_recipe(root)), out)
    assert reads == [] and tree_digest(out) == before


def test_two_workers_and_a_second_run_are_byte_identical(corpus, reference, tmp_path) -> None:
    root, _ = corpus
    ref, _ = reference
    out = tmp_path / "w2"
    run(load_recipe(write_recipe(root, workers=2)), out)
    # The recipe's `workers` is not part of its fingerprint, so plan.json matches too.
    assert tree_digest(out) == tree_digest(ref)


def test_ray_executor_matches_local(corpus, reference, tmp_path) -> None:
    ray = pytest.importorskip("ray")
    root, _ = corpus
    ref, _ = reference
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        run(load_recipe(write_recipe(root)), tmp_path / "ray", executor="ray")
    finally:
        ray.shutdown()
    assert tree_digest(tmp_path / "ray") == tree_digest(ref)


def test_kill9_at_random_points_then_rerun(corpus, reference, tmp_path) -> None:
    root, _ = corpus
    ref, _ = reference
    want = tree_digest(ref)
    recipe, out = write_recipe(root, workers=2), tmp_path / "killed"
    cmd = [sys.executable, "-m", "gemmakit.cli", "data", "run", "--recipe", str(recipe), "--output", str(out)]
    rng = random.Random(5)
    start = time.perf_counter()
    subprocess.run(cmd, check=True, capture_output=True, cwd=root)  # time one full run for the kill points
    full = time.perf_counter() - start
    assert tree_digest(out) == want
    for _ in range(2):  # 2 x 5 = 10 kills, each sequence from an empty directory
        subprocess.run(["rm", "-rf", str(out)], check=True)
        for _ in range(5):
            proc = subprocess.Popen(cmd, cwd=root, start_new_session=True, stdout=subprocess.DEVNULL,
                                    stderr=subprocess.DEVNULL)  # fmt: skip
            time.sleep(rng.uniform(0.05, 0.6) * full)
            os.killpg(proc.pid, signal.SIGKILL)  # the run and its worker processes
            proc.wait()
            # Nothing partial is ever visible under a final name: each file there is already the final one.
            seen = {
                k: v for k, v in tree_digest(out).items() if not any(c.startswith(".") for c in k.split("/"))
            }
            assert {k: v for k, v in seen.items() if want.get(k) != v} == {}
        subprocess.run(cmd, check=True, capture_output=True, cwd=root)
        assert tree_digest(out) == want
        ids = kept_ids(out)
        assert len(ids) == len(set(ids)) == len(kept_ids(ref))


def test_corrupt_shard_fails_alone_and_rerun_redoes_only_it(tmp_path) -> None:
    root = tmp_path
    write_corpus(root, n_web=200, n_books=60)
    good = (root / "corpus" / "books.jsonl.gz").read_bytes()
    (root / "corpus" / "books.jsonl.gz").write_bytes(good[: len(good) // 2])  # truncated gzip stream
    recipe = write_recipe(root, shards=3, text=RECIPE.split('[[stage]]\nkind = "dedup"')[0] + "[output]\n")
    out = root / "out"
    proc = subprocess.run([sys.executable, "-m", "gemmakit.cli", "data", "run", "--recipe", str(recipe),
                           "--output", str(out)], capture_output=True, text=True, cwd=root)  # fmt: skip
    assert proc.returncode != 0
    err = proc.stderr.strip().splitlines()
    assert len(err) == 1 and "books.jsonl.gz" in err[0] and "corrupt gzip" in err[0] and "shard" in err[0]
    done = sorted(p.name for p in (out / "done" / "seg0").iterdir())
    assert len(done) == 2  # the shard holding the gzip file has no marker; the others finished
    assert not (out / "stats.json").exists()
    (root / "corpus" / "books.jsonl.gz").write_bytes(good)
    with pytest.raises(PipelineError, match="input files changed"):
        run(load_recipe(recipe), out)  # the input changed size: refused rather than mixed


def test_changed_shard_count_or_recipe_is_refused(corpus, reference) -> None:
    root, _ = corpus
    out, _ = reference
    with pytest.raises(PipelineError, match=r"shards=3, the recipe now says shards=4"):
        run(load_recipe(write_recipe(root, shards=4)), out)
    changed = RECIPE.replace('kind = "quality"', 'kind = "quality"\nmin_words = 40')
    with pytest.raises(PipelineError, match="recipe changed"):
        run(load_recipe(write_recipe(root, text=changed)), out)
    write_recipe(root)


def test_malformed_lines_are_quarantined_and_every_good_line_kept(tmp_path) -> None:
    good = [json.dumps({"id": f"g{i}", "text": f"good line number {i} with some words"}) for i in range(40)]
    bad = [b"{not json", b'{"id": "b1", "text": "caf\xe9"}', b"[1, 2]", b'{"id": "b3"}', b'{"text": 7}']
    lines: list[bytes] = [b"\xef\xbb\xbf" + good[0].encode()]
    for i, g in enumerate(good[1:]):
        lines.append(g.encode() + (b"\r" if i % 5 == 0 else b""))
        if i % 8 == 0:
            lines.append(bad[(i // 8) % len(bad)])
        if i % 13 == 0:
            lines.append(b"   ")
    data = b"\n".join(lines) + b"\n" + b'{"id": "torn", "te'
    (tmp_path / "c.jsonl").write_bytes(data)
    (tmp_path / "r.toml").write_text('[pipeline]\nshards = 4\nworkers = 1\n[[source]]\nname = "c"\npaths = ["c.jsonl"]\n'
                                     '[[stage]]\nkind = "pii"\n[output]\ntokenizer = ""\n')  # fmt: skip
    stats = run(load_recipe(tmp_path / "r.toml"), tmp_path / "out")
    assert sorted(kept_ids(tmp_path / "out")) == sorted(f"g{i}" for i in range(40))
    n_bad = sum(1 for x in lines if x in bad) + 1  # + the torn last line
    q = [json.loads(x) for p in sorted((tmp_path / "out" / "quarantine").glob("*.jsonl"))
         for x in p.read_text().splitlines()]  # fmt: skip
    assert len(q) == n_bad and all(e["file"].endswith("c.jsonl") and e["line"] > 0 for e in q)
    assert sum(stats["total"]["malformed"].values()) == n_bad + sum(1 for x in lines if x == b"   ")
    assert stats["total"]["repaired"] == {"bom": 1, "crlf": 8}


@pytest.mark.parametrize("n", [1, 2, 3, 7])
def test_byte_ranges_read_every_line_once_with_its_number(tmp_path, n) -> None:
    rng = random.Random(n)
    lines = [json.dumps({"text": "x" * rng.randrange(0, 300)}) for _ in range(101)]
    path = tmp_path / "f.jsonl"
    path.write_text("\n".join(lines) + "\n")
    size = path.stat().st_size
    got = []
    for k in range(n):
        got += [d.meta["line"] for d in read_jsonl(path, byte_range=(size * k // n, size * (k + 1) // n))]
    assert got == list(range(1, 102))


def test_cli_run_summary_report_and_bad_recipe(corpus, reference, tmp_path) -> None:
    root, _ = corpus
    out, _ = reference
    proc = subprocess.run([sys.executable, "-m", "gemmakit.cli", "data", "report", str(out)],
                          capture_output=True, text=True, check=True)  # fmt: skip
    assert proc.stdout.strip().endswith("report.md")
    bad = tmp_path / "bad.toml"
    bad.write_text(
        RECIPE.format(shards=2, workers=1).replace('kind = "quality"', 'kind = "quality"\nmin_wrds = 3')
    )
    proc = subprocess.run([sys.executable, "-m", "gemmakit.cli", "data", "run", "--recipe", str(bad)],
                          capture_output=True, text=True, cwd=tmp_path)  # fmt: skip
    assert proc.returncode == 2
    assert (
        proc.stderr.count("\n") == 1 and "stage[1].min_wrds" in proc.stderr and "Traceback" not in proc.stderr
    )
    with pytest.raises(DataRecipeError, match=r"mixture.phase\[0\].weights: unknown source"):
        load_recipe(write_recipe(tmp_path, text=RECIPE.replace("web = 0.8", "webb = 0.8")))


def test_sft_chat_data_filters(tmp_path) -> None:
    rows = [
        [
            {"role": "user", "content": "Who are you?"},
            {"role": "model", "content": "I am ChatGPT, made by OpenAI."},
        ],
        [{"role": "user", "content": "Are you ChatGPT?"}, {"role": "model", "content": "No, I am Gemma."}],
        [
            {"role": "user", "content": "Mail me at ann@example.com"},
            {"role": "model", "content": "Sure thing."},
        ],
        [{"role": "user", "content": "Hi"}, {"role": "model", "content": "Hello there!"}],
        [{"role": "user", "content": "hi"}, {"role": "model", "content": "Hello  there!"}],
    ]
    with open(tmp_path / "sft.jsonl", "w") as f:
        for i, r in enumerate(rows):
            f.write(json.dumps({"id": f"c{i}", "messages": r}) + "\n")
    (tmp_path / "r.toml").write_text(
        '[pipeline]\nshards = 2\nworkers = 1\n[[source]]\nname = "sft"\nformat = "chat"\npaths = ["sft.jsonl"]\n'
        '[[stage]]\nkind = "self_identification"\n[[stage]]\nkind = "pii"\n'
        '[[stage]]\nkind = "dedup"\nmethod = "exact"\n[output]\ntokenizer = ""\n'
    )
    stats = run(load_recipe(tmp_path / "r.toml"), tmp_path / "out")
    kept = [
        json.loads(x)
        for p in sorted((tmp_path / "out" / "kept").glob("*.jsonl"))
        for x in p.read_text().splitlines()
    ]
    assert [r["id"] for r in kept] == ["c1", "c2", "c3"]
    assert kept[1]["messages"][0]["content"] == "Mail me at <EMAIL>"
    assert stats["total"]["dropped"] == {"dedup_exact": 1, "self_identification": 1}
    from gemmakit.train.sft import read_chat_jsonl  # the kept JSONL is what SFT training reads

    parts = [p for p in sorted((tmp_path / "out" / "kept").glob("*.jsonl")) if p.stat().st_size]
    convs = [c for p in parts for c in read_chat_jsonl(p)]
    assert len(convs) == 3 and all(c[-1]["role"] == "model" for c in convs)


def test_shipped_web_recipe_runs_on_a_synth_corpus(tmp_path) -> None:
    """README's two commands: `data synth`, then the shipped recipe (copied next to the corpus it expects)."""
    (tmp_path / "recipes").mkdir()
    for name in ("data_web.toml", "data_sft.toml"):
        (tmp_path / "recipes" / name).write_text((ROOT / "recipes" / name).read_text())
        load_recipe(tmp_path / "recipes" / name)
    cli = [sys.executable, "-m", "gemmakit.cli", "data"]
    subprocess.run(
        [*cli, "synth", "--out", str(tmp_path / "corpus"), "--docs", "600"], check=True, cwd=tmp_path
    )
    proc = subprocess.run([*cli, "run", "--recipe", "recipes/data_web.toml", "--workers", "1"], check=True,
                          capture_output=True, text=True, cwd=tmp_path)  # fmt: skip
    out = tmp_path / "data-runs" / "data_web"
    stats = json.loads((out / "stats.json").read_text())
    assert stats["total"]["docs_in"] == 600 and f"kept {stats['total']['kept']:,}" in proc.stdout
    assert stats["decontamination"].get("quiz", 0) >= 1 and Shards.open(out / "tokens").n_docs > 300


def test_parquet_and_text_directory_sources(tmp_path) -> None:
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    texts = [f"Parquet row {i} mails row{i}@example.com about the plan." for i in range(30)]
    pq.write_table(pa.table({"id": [f"p{i}" for i in range(30)], "body": texts}), tmp_path / "rows.parquet",
                   row_group_size=7)  # fmt: skip
    (tmp_path / "notes" / "sub").mkdir(parents=True)
    for i in range(5):
        (tmp_path / "notes" / "sub" / f"n{i}.txt").write_text(
            f"Note {i}: card 4111 1111 1111 1111." * (i % 2)
        )
    (tmp_path / "r.toml").write_text(
        "[pipeline]\nshards = 2\nworkers = 1\n"
        '[[source]]\nname = "rows"\npaths = ["rows.parquet"]\ntext_field = "body"\n'
        '[[source]]\nname = "notes"\npaths = ["notes"]\n'
        '[[stage]]\nkind = "pii"\n[output]\ntokenizer = "nano"\n'
    )
    stats = run(load_recipe(tmp_path / "r.toml"), tmp_path / "out")
    assert stats["by_source"]["rows"] == {"docs_in": 30, "kept": 30, "malformed": 0, "dropped": {}}
    # empty files are blank records; the others hold a card and are dropped
    assert stats["by_source"]["notes"] == {
        "docs_in": 5,
        "kept": 0,
        "malformed": 3,
        "dropped": {"pii_card": 2},
    }
    kept = [
        json.loads(x)
        for p in sorted((tmp_path / "out" / "kept").glob("*.jsonl"))
        for x in p.read_text().splitlines()
    ]
    assert sorted(r["id"] for r in kept) == sorted(f"p{i}" for i in range(30))
    assert all("<EMAIL>" in r["text"] for r in kept) and Shards.open(tmp_path / "out" / "tokens").n_docs == 30
