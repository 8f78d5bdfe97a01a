"""Coverage-guided fuzzing of one target of fuzz/targets.py with atheris (libFuzzer) — reliability F2.

    pip install atheris==3.0.0
    python fuzz/run.py request --runs 100000      # or text_stream, jsonl; --runs 0: until stopped

Starts from fuzz/seeds/TARGET (copied to a scratch corpus, so the checked-in one stays small) and
stops at the first crasher, which libFuzzer writes as fuzz/seeds/TARGET/crash-<sha1>: commit it, and
tests/test_fuzz.py replays it in CI from then on. Only gemmakit's own modules are instrumented (torch
is not: it would cost ~10x speed for coverage of code we do not own). Prints runs and runs/second.
Slow units are reported only past 30 s: the jsonl target finds 88-byte zstd files of RLE blocks that
expand to 1.6 M blank lines (1.5 s to count), which is the reader streaming, not a hang.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

import atheris

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

with atheris.instrument_imports(include=["gemmakit"]):
    import targets


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("target", choices=sorted(targets.TARGETS))
    p.add_argument("--runs", type=int, default=100_000)
    p.add_argument("--max-len", type=int, default=4096)
    args = p.parse_args()
    corpus = Path(tempfile.mkdtemp(prefix=f"fuzz-{args.target}-"))
    for seed in targets.seeds(args.target):
        shutil.copy(seed, corpus / seed.name)
    target = targets.TARGETS[args.target]
    started = time.monotonic()
    argv = [sys.argv[0], str(corpus), f"-max_len={args.max_len}", f"-artifact_prefix={HERE / 'seeds' / args.target}/crash-",
            "-print_final_stats=1", "-report_slow_units=30", *([f"-runs={args.runs}"] if args.runs else [])]  # fmt: skip
    words = HERE / f"{args.target}.dict"  # field names etc.: byte mutations alone rarely spell JSON keys
    if words.exists():
        argv.append(f"-dict={words}")
    atheris.Setup(argv, target)
    try:
        atheris.Fuzz()
    finally:  # libFuzzer exits the process itself; this line shows only when it returns
        print(f"{args.target}: {time.monotonic() - started:.0f} s", file=sys.stderr)


if __name__ == "__main__":
    main()
