"""Weight-only quantized GEMV candidates side by side: which kernel each scheme uses, and why.

For a Gemma-1-2B MLP matrix (16384 x 2048) and the tied embedding used as the output projection
(256000 x 2048), batch 1 (M = 1): time per GEMV and GB/s of weight bytes streamed for fp32 / bf16
`F.linear`, aten `_weight_int8pack_mm` (fp32 and bf16 activations), `_weight_int4pack_mm_for_cpu`
(+ its packing op), a `torch.compile`d dequantize-GEMV (int8 and int4, inductor's C++ checked for
`at::vec::Vectorized`), the PyTorch fallback, and gemmakit's native kernels (the `-march=native`
build and, on AVX-512 machines, the AVX2 build that AVX2-only CPUs get). Then the prefill
crossover per scheme: native GEMV vs each prefill path (fp32 tiles + fp32 GEMM; bf16 tiles + bf16
GEMM where the level has fast bf16) over M rows, and the `kernels.CROSSOVERS` row it implies.
`--isa all` repeats the crossover in child processes capped to every ISA level below this CPU's
(ONEDNN_MAX_CPU_ISA, MKL_ENABLE_INSTRUCTIONS, ATEN_CPU_CAPABILITY, GEMMAKIT_KERNEL_ISA; see
LEVEL_ENVS), one JSON per level, and prints the measured rows beside the table in the code.
Whole-model decode next to llama.cpp: bench_quant_decode.py.

Candidates are timed in interleaved rounds inside one process (medians of medians), so drift and
other load hit all of them alike; the load average before and after is recorded. Before every
timed call a 2x-L3-sized buffer is streamed, so weights come from DRAM as in a real decode step
(--hot skips that). Writes JSON.

    python benchmarks/bench_kernels.py                      # GEMV + crossover tables (~3 min)
    python benchmarks/bench_kernels.py --isa all --rounds 3 # crossovers per ISA level (~3 min a level)
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

from gemmakit.quantize import kernels
from gemmakit.quantize.schemes import dequantize_matrix, quantize_matrix, unpack_nibbles, unpack_scale_min

sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchmarks/ is not a package
from machine_info import machine  # noqa: E402
from results_md import update_section  # noqa: E402

HERE = Path(__file__).resolve().parent

SHAPES = {"mlp 16384x2048": (16384, 2048), "embed-as-output 256000x2048": (256000, 2048)}


def l3_bytes() -> int:
    try:
        text = Path("/sys/devices/system/cpu/cpu0/cache/index3/size").read_text().strip()
        return int(text[:-1]) * {"K": 1 << 10, "M": 1 << 20}[text[-1]]
    except (OSError, ValueError, KeyError):
        return 64 << 20


class Flusher:
    """Streams a buffer of 2x the L3 size (capped at 2 GiB) so the next call reads its weights from DRAM.

    Without it a 32 MB matrix timed in a loop stays in this machine's 480 MB L3 and the numbers are
    2-3x better than what a model, whose 1.5-2.5 GB of weights cannot stay cached, sees.
    """

    def __init__(self, enabled: bool) -> None:
        self.buf = torch.ones(min(2 * l3_bytes(), 2 << 30) // 4) if enabled else None

    def __call__(self) -> None:
        if self.buf is not None:
            self.buf.sum()


def rounds(
    cands: dict[str, Callable[[], object]], n_rounds: int, calls: int, flush: Flusher
) -> dict[str, float]:
    """Median over rounds of the median call time; candidates interleaved within each round."""
    times: dict[str, list[float]] = {k: [] for k in cands}
    for _ in range(n_rounds):
        for name, fn in cands.items():
            fn()  # warm: page-in, thread pool
            ts = []
            for _ in range(calls):
                flush()
                t0 = time.perf_counter()
                fn()
                ts.append(time.perf_counter() - t0)
            times[name].append(statistics.median(ts))
    return {k: statistics.median(v) for k, v in times.items()}


def compiled_gemvs(scheme: str, group: int | None) -> tuple[Callable, bool]:
    """A torch.compile'd dequantize-GEMV for (K,) fp32 x and its vectorization check."""
    from torch._inductor.utils import run_and_get_code

    if scheme == "int8":

        def fn(x, q, scales):
            return (q.float() * x).sum(-1) * scales

    else:

        def fn(x, q, s, m):  # q: unpacked nibbles (N, K) uint8; the packed layout's gather defeats inductor
            n, k = q.shape
            w = q.view(n, k // group, group).float() * s[..., None] + m[..., None]
            return (w.view(n, k) * x).sum(-1)

    compiled = torch.compile(fn, dynamic=False)
    return compiled, run_and_get_code


def gemv_candidates(n: int, k: int, args: argparse.Namespace, notes: dict) -> tuple[dict, dict, dict]:
    """name -> (fn, weight bytes streamed, error vs fp64 reference)."""
    g = torch.Generator().manual_seed(0)
    w = torch.randn(n, k, generator=g) * 0.02
    x = torch.randn(1, k, generator=g)
    fns: dict[str, Callable[[], object]] = {}
    nbytes: dict[str, int] = {}
    refs: dict[str, torch.Tensor] = {}

    def add(name: str, fn: Callable[[], torch.Tensor], size: int, ref: torch.Tensor) -> None:
        out = fn().float().reshape(-1)
        notes.setdefault("max_rel_err", {})[f"{n}x{k} {name}"] = float(
            (out - ref).abs().max() / ref.abs().max()
        )
        fns[name], nbytes[name] = fn, size

    exact = (x.double() @ w.double().T).reshape(-1)
    add("fp32 F.linear", lambda: F.linear(x, w), w.nbytes, exact)
    wb, xb = w.bfloat16(), x.bfloat16()
    add("bf16 F.linear", lambda: F.linear(xb, wb), wb.nbytes, exact)
    for scheme, group in (("int8", None), ("int4", 32), ("int4", 64)):
        packed = quantize_matrix(w, scheme, group)
        size = sum(t.nbytes for t in packed.values())
        ref = (x.double() @ dequantize_matrix(packed, scheme, group).double().T).reshape(-1)
        refs[f"{scheme} g{group}"] = ref
        label = scheme if group is None else f"{scheme} g{group}"
        if scheme == "int8":
            q, sc = packed["qweight"], packed["scales"]
            add(
                "aten _weight_int8pack_mm fp32",
                lambda q=q, sc=sc: torch._weight_int8pack_mm(x, q, sc),
                size,
                ref,
            )
            scb = sc.bfloat16()
            add(
                "aten _weight_int8pack_mm bf16",
                lambda q=q, s=scb: torch._weight_int8pack_mm(xb, q, s),
                size,
                ref,
            )
        else:
            s, m = unpack_scale_min(packed["scale_min"])
            q32 = unpack_nibbles(packed["qweight"]).to(torch.int32)
            t0 = time.perf_counter()
            q4 = torch._convert_weight_to_int4pack_for_cpu(q32, 1)
            notes.setdefault("int4pack_convert_ms", {})[f"{n}x{k} g{group}"] = 1e3 * (
                time.perf_counter() - t0
            )
            sz = torch.stack([s, m + 8 * s], -1).transpose(0, 1).contiguous()  # w = (q - 8) * s + (m + 8 s)
            for dt in (torch.bfloat16, torch.float32):
                xx, szz = x.to(dt), sz.to(dt)
                add(f"aten _weight_int4pack_mm_for_cpu {label} {str(dt)[6:]}",
                    lambda xx=xx, q4=q4, szz=szz, gr=group: torch._weight_int4pack_mm_for_cpu(xx, q4, gr, szz), size, ref)  # fmt: skip
        kern = kernels.native()
        if kern is not None:
            add(f"gemmakit {label} native-{kern.isa}", lambda p=packed, sc=scheme, gr=group, kn=kern: kn.gemv(x, p, sc, (n, k), gr), size, ref)  # fmt: skip
        if args.avx2 is not None:
            add(f"gemmakit {label} native-avx2", lambda p=packed, sc=scheme, gr=group: args.avx2.gemv(x, p, sc, (n, k), gr), size, ref)  # fmt: skip
        kernels.use_native(False)
        torch_out = kernels.matmul(x, packed, scheme, (n, k), group)
        kernels.use_native(True)
        notes["max_rel_err"][f"{n}x{k} {label} pytorch fallback"] = float((torch_out.reshape(-1) - ref).abs().max() / ref.abs().max())  # fmt: skip
        if args.fallback:

            def fallback(p=packed, sc=scheme, gr=group):  # fmt: skip
                kernels.use_native(False)
                try:
                    return kernels.matmul(x, p, sc, (n, k), gr)
                finally:
                    kernels.use_native(True)

            add(f"pytorch fallback {label}", fallback, size, ref)
        if args.compile:
            _add_compiled(add, x, packed, scheme, group, label, size, ref, notes, n, k)
    return fns, nbytes, refs


def _add_compiled(add, x, packed, scheme, group, label, size, ref, notes, n, k) -> None:  # fmt: skip
    fn, run_and_get_code = compiled_gemvs(scheme, group)
    xv = x.reshape(-1)
    if scheme == "int8":
        inputs = (xv, packed["qweight"], packed["scales"])
    else:
        s, m = unpack_scale_min(packed["scale_min"])
        inputs = (xv, unpack_nibbles(packed["qweight"]), s, m)  # 1 byte per weight: the layout trick is ours
        size = inputs[1].nbytes + packed["scale_min"].nbytes * 2
    t0 = time.perf_counter()
    _, code = run_and_get_code(fn, *inputs)
    notes.setdefault("compile_s", {})[f"{n}x{k} {label}"] = time.perf_counter() - t0
    notes.setdefault("inductor_vectorized", {})[f"{n}x{k} {label}"] = any(
        "at::vec::Vectorized" in c for c in code
    )
    add(f"torch.compile dequant-GEMV {label}", lambda: fn(*inputs), size, ref)


CROSS_SHAPES = ((16384, 2048), (2048, 16384))  # a 2B MLP's up and down projections
# ISA levels an AVX-512 machine can be capped to: the env of a child process that measures that level.
LEVEL_ENVS = {
    "amx": {},
    "avx512_bf16": {"ONEDNN_MAX_CPU_ISA": "AVX512_CORE_BF16"},
    "avx512": {"ONEDNN_MAX_CPU_ISA": "AVX512_CORE"},
    "avx2": {"GEMMAKIT_KERNEL_ISA": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2", "MKL_ENABLE_INSTRUCTIONS": "AVX2",
             "ATEN_CPU_CAPABILITY": "avx2"},
}  # fmt: skip


def crossover(args: argparse.Namespace, flush: Flusher) -> dict:
    """Per scheme and M rows: the native GEMV vs each prefill path this ISA level has (fp32 tiles +
    fp32 GEMM always, bf16 tiles + bf16 GEMM where bf16 GEMMs are available), ms summed over both
    CROSS_SHAPES, plus plain fp32 F.linear on float weights for scale."""
    kern, out = kernels.native(), {}
    if kern is None:
        return out
    gen = torch.Generator().manual_seed(0)
    weights = [torch.randn(n, k, generator=gen) * 0.02 for n, k in CROSS_SHAPES]
    bf16_hw = kernels._BF16_GEMM_HW
    before = kernels.bf16_prefill()

    def prefill(x: torch.Tensor, packs: list, scheme: str, group: int | None, bf16: bool) -> None:
        kernels.bf16_prefill(bf16)
        for (n, k), p in zip(CROSS_SHAPES, packs, strict=True):
            kernels.matmul(x[:, :k], p, scheme, (n, k), group, max_gemv_rows=0)

    try:
        for scheme, group in (("int8", None), ("int4", 64), ("bf16", None)):
            packs = [quantize_matrix(w, scheme, group) for w in weights]
            for m in args.rows:
                x = torch.randn(m, max(k for _, k in CROSS_SHAPES), generator=gen)
                cands = {
                    "native gemv": lambda x=x, ps=packs, s=scheme, g=group: [
                        kern.gemv(x[:, :k].contiguous(), p, s, (n, k), g)
                        for (n, k), p in zip(CROSS_SHAPES, ps, strict=True)
                    ],
                    "fp32 tiles + fp32 GEMM": lambda x=x, ps=packs, s=scheme, g=group: prefill(
                        x, ps, s, g, False
                    ),
                }
                if bf16_hw:
                    cands["bf16 tiles + bf16 GEMM"] = lambda x=x, ps=packs, s=scheme, g=group: prefill(
                        x, ps, s, g, True
                    )
                if scheme == "int8":
                    cands["fp32 F.linear (float weights)"] = lambda x=x: [
                        F.linear(x[:, :k], w) for (_, k), w in zip(CROSS_SHAPES, weights, strict=True)
                    ]
                res = rounds(cands, args.rounds, max(2, args.calls // 2), flush)
                out.setdefault(scheme, {})[str(m)] = {c: t * 1e3 for c, t in res.items()}
    finally:
        kernels.bf16_prefill(before)
    return out


def derive_row(cross: dict) -> dict:
    """The CROSSOVERS row these timings imply: bf16 prefill where it beats fp32 at the largest M for
    every scheme; per scheme, the largest M up to which the GEMV beats that prefill path at every M."""
    largest = [
        rows[max(rows, key=int)] for rows in cross.values()
    ]  # per scheme, the timings at the largest M
    bf16 = all(t.get("bf16 tiles + bf16 GEMM", float("inf")) < t["fp32 tiles + fp32 GEMM"] for t in largest)
    path = "bf16 tiles + bf16 GEMM" if bf16 else "fp32 tiles + fp32 GEMM"
    row: dict = {"bf16_prefill": bf16}
    for scheme, rows in cross.items():
        best = 0
        for m in sorted(rows, key=int):
            if rows[m]["native gemv"] >= rows[m][path]:
                break
            best = int(m)
        row[scheme] = best
    return row


def measure_levels(args: argparse.Namespace) -> int:
    """Run the crossover in a child process per ISA level this CPU can be capped to (the caps must be
    set before torch starts); print each level's derived row beside the one in kernels.CROSSOVERS."""
    top = kernels.LEVELS.index(kernels._hardware_level())
    rows = {}
    for level, env in LEVEL_ENVS.items():
        if kernels.LEVELS.index(level) < top:
            continue
        out = Path(args.out).with_name(f"bench_kernels_{level}.json")
        cmd = [sys.executable, __file__, "--no-gemv", "--rounds", str(args.rounds), "--calls", str(args.calls),
               "--rows", *map(str, args.rows), "--out", str(out)]  # fmt: skip
        if args.threads:
            cmd += ["--threads", str(args.threads)]
        print(f"== {level}: {' '.join(f'{k}={v}' for k, v in env.items()) or '(no caps)'}", flush=True)
        subprocess.run(cmd, env={**os.environ, **env}, check=True)
        result = json.loads(out.read_text())
        assert result["machine"]["isa_level"] == level, (level, result["machine"]["isa_level"])
        rows[level] = result
    print(crossover_report(rows))
    update_section(HERE / "RESULTS.md", "kernel_crossovers", crossover_report(rows))
    return 0


def crossover_report(results: dict[str, dict]) -> str:
    """Markdown: per measured ISA level, the row its timings imply beside the row kernels.CROSSOVERS uses."""
    first = next(iter(results.values()))["machine"]
    lines = [
        "## Quantized kernel crossovers per ISA level (`bench_kernels.py --isa all`)",
        "",
        f"Machine: {first['cpu']}, {first['cores']} cores, ISA {', '.join(first['isa'])}; each level in a child "
        "process capped by env (LEVEL_ENVS). Rows: the largest activation-row count M at which the native "
        "GEMV still beats the prefill GEMM, per scheme (16384x2048 + 2048x16384, weights from DRAM).",
        "",
        "| level | caps | measured: bf16 prefill / int8 / int4 / bf16 | kernels.CROSSOVERS |",
        "|---|---|---|---|",
    ]
    for level, res in results.items():
        row, now = res["derived_row"], kernels.CROSSOVERS[level]
        caps = " ".join(f"{k}={v}" for k, v in res["machine"].get("env", {}).items()) or "none"
        lines.append(f"| {level} | {caps} | {row['bf16_prefill']} / {row['int8']} / {row['int4']} / {row['bf16']} | "
                     f"{now.bf16_prefill} / {now.int8} / {now.int4} / {now.bf16} |")  # fmt: skip
    lines += ["", "Where the two differ, kernels.py says why (e.g. a capped level that no real CPU has)."]
    return "\n".join(lines)


def print_gemv(results: dict, nbytes: dict, shape: str, n: int, k: int, hot: bool) -> None:
    where = "weights hot in cache" if hot else "weights from DRAM (L3 flushed before each call)"
    print(f"\n{shape}: M=1 GEMV, {torch.get_num_threads()} threads, {where}, median of medians")
    print(f"{'candidate':55s} {'ms':>9s} {'GB/s':>7s} {'Gweights/s':>11s}")
    for name, t in sorted(results.items(), key=lambda kv: kv[1]):
        print(f"{name:55s} {t * 1e3:9.3f} {nbytes[name] / t / 1e9:7.1f} {n * k / t / 1e9:11.1f}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--calls", type=int, default=10, help="calls per candidate per round")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument(
        "--rows",
        type=int,
        nargs="+",
        default=[1, 2, 4, 8, 12, 16, 24, 32, 48, 64, 128],
        help="crossover M values",
    )
    ap.add_argument("--no-gemv", dest="gemv", action="store_false", help="skip the M=1 GEMV candidate tables")
    ap.add_argument(
        "--isa",
        choices=["native", "all"],
        default="native",
        help="all: measure the crossovers at every ISA level this CPU can be capped to (child processes)",
    )
    ap.add_argument("--no-compile", dest="compile", action="store_false", help="skip the torch.compile rows")
    ap.add_argument("--fallback", action="store_true", help="also time the (slow) PyTorch fallback")
    ap.add_argument("--no-crossover", dest="crossover", action="store_false")
    ap.add_argument("--hot", action="store_true", help="time with weights left in cache (no L3 flush)")
    ap.add_argument("--out", default="benchmarks/results/bench_kernels.json")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.isa == "all":
        return measure_levels(args)
    mach = machine()
    args.avx2 = kernels.build("avx2") if "avx512f" in mach["isa"] and args.gemv else None
    result: dict = {"machine": mach, "args": {k: v for k, v in vars(args).items() if k != "avx2"}, "gemv": {}}
    notes: dict = {}
    flush = Flusher(not args.hot)
    for shape in args.shapes if args.gemv else []:
        n, k = SHAPES[shape]
        fns, nbytes, _ = gemv_candidates(n, k, args, notes)
        res = rounds(fns, args.rounds, args.calls if n < 100000 else max(2, args.calls // 3), flush)
        print_gemv(res, nbytes, shape, n, k, args.hot)
        result["gemv"][shape] = {c: {"ms": t * 1e3, "GB_s": nbytes[c] / t / 1e9} for c, t in res.items()}
        del fns
    if args.crossover:
        result["crossover_ms"] = cross = crossover(args, flush)
        print(f"\nprefill crossover at ISA level {mach['isa_level']}, 16384x2048 + 2048x16384, ms per call:")
        for scheme, rows in cross.items():
            for m, row in rows.items():
                print(f"  {scheme:5s} M={m:>4s} " + "  ".join(f"{c}: {v:8.2f}" for c, v in row.items()))
        if cross:
            result["derived_row"] = derive_row(cross)
            print(f"derived CROSSOVERS row for {mach['isa_level']}: {result['derived_row']}")
    result["notes"] = notes
    result["machine"]["loadavg_after"] = os.getloadavg()
    print(f"\nnotes: {json.dumps(notes, indent=1)}")
    print(f"machine: {result['machine']}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
