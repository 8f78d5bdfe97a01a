"""Decode benchmark: gemmakit vs HF transformers vs llama.cpp, side by side in one invocation.

For each model shape (random weights, the real shapes of Gemma 1 2B / Gemma 3 1B / Gemma 3 270M) it
builds one bf16 HF checkpoint with gemmakit, exports GGUF files from it with gemmakit's exporter,
then runs every system in its own fresh subprocess (so peak RSS is that system's alone):

  gemmakit  fp32 / bf16 / int8 / int4      (Engine: prefill + static-cache greedy decode)
  HF        fp32 / bf16                    (transformers `generate`, greedy, min=max new tokens)
  llama.cpp f16 / q8_0 / q4_0              (llama-cpp-python on gemmakit-exported GGUF, argmax loop)

Reported per system: prefill tok/s, time to first token, decode tok/s, peak RSS, the ratio to each
anchor at equal bits per weight, and decode as a fraction of the memory-bandwidth ceiling
(read bandwidth measured here, in this run, divided by the bytes of weights read per token).
Results: JSON in benchmarks/results/decode.json and a Markdown table in benchmarks/RESULTS.md.

    python benchmarks/decode.py --shapes gemma-3-270m --new-tokens 32 --reps 2      # quick
    python benchmarks/decode.py --shapes gemma-2b,gemma-3-1b                        # the full run

Method (as shared/reference/perf-anchors.md): batch 1, prompt of random ids (BOS first), greedy,
2 threads everywhere, one warm-up generation then `--reps` timed runs, medians reported. Decode
tok/s = (new - 1) / (time from first to last token). A batched throughput run (`--batch N`) adds
gemmakit rows with N prompts at once. Bandwidth-bound rows drift ~10-15% on this shared host: only
compare rows of the same run.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import re
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
SYSTEMS = {
    # name: (engine, dtype or scheme, bits per weight as stored for the ceiling)
    "gemmakit fp32": ("gemmakit", "fp32", 32),
    "gemmakit bf16": ("gemmakit", "bf16", 16),  # what `gemmakit chat` runs: bf16 weights, native bf16 GEMV
    "gemmakit int8": ("gemmakit", "int8", 8),
    "gemmakit int4": ("gemmakit", "int4", 4.5),  # 4-bit values + a bf16 scale and minimum per 64
    "transformers fp32": ("hf", "fp32", 32),
    "transformers bf16": ("hf", "bf16", 16),
    "llama.cpp f16": ("llama", "f16", 16),
    "llama.cpp q8_0": ("llama", "q8_0", 8.5),
    "llama.cpp q4_0": ("llama", "q4_0", 4.5),
}
# gemmakit mode -> the anchor it must beat at equal bits, and the target ratio (issue 3)
ANCHORS = {
    "gemmakit bf16": [("llama.cpp f16", 0.95), ("transformers bf16", 1.5)],
    "gemmakit fp32": [("transformers fp32", 1.5)],
    "gemmakit int8": [("llama.cpp q8_0", 1.0), ("transformers bf16", 1.5)],
    "gemmakit int4": [("llama.cpp q4_0", 1.0), ("transformers bf16", 1.5)],
}


# ---- model preparation (runs in the parent) ------------------------------------------------------------


def synthetic_tokenizer(vocab_size: int, generation: str, out: Path) -> Path:
    """A SentencePiece model with Gemma's special layout padded with plain pieces to `vocab_size`.

    No real Gemma tokenizer can be downloaded; llama.cpp needs a vocab the size of the embedding.
    """
    sys.path.insert(0, str(HERE.parent / "tests"))
    from sentencepiece import sentencepiece_model_pb2 as pb
    from spm_helpers import gemma_spm_bytes

    proto = pb.ModelProto()
    proto.ParseFromString(gemma_spm_bytes("gemma3" if generation == "gemma3" else "gemma1/2"))
    have = {p.piece for p in proto.pieces}
    i = 0
    while len(proto.pieces) < vocab_size:
        piece = f"\u2581t{i}"
        i += 1
        if piece not in have:
            proto.pieces.add(piece=piece, score=-1e4 - i, type=pb.ModelProto.SentencePiece.NORMAL)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_bytes(proto.SerializeToString())
    return out


def prepare(shape: str, root: Path) -> dict:
    """Random-weight bf16 checkpoint of a preset shape + tokenizer + GGUF exports; cached in `root`."""
    import torch

    from gemmakit.checkpoint import load_model, save_hf
    from gemmakit.config import get_preset
    from gemmakit.model import Gemma
    from gemmakit.tokenizer import Tokenizer

    cfg = get_preset(shape)
    if cfg.generation == "gemma3":
        cfg = cfg.replace(max_seq_len=min(cfg.max_seq_len, 8192))
    model_dir = root / shape / "hf-bf16"
    if not (model_dir / "manifest.json").exists():
        default = torch.get_default_dtype()
        torch.set_default_dtype(torch.bfloat16)  # build straight in bf16: a 2B model never exists in fp32
        try:
            with torch.device("meta"):
                model = Gemma(cfg)
        finally:
            torch.set_default_dtype(default)
        model.to_empty(device="cpu")
        gen = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for p in model.parameters():  # normal(0, 0.02) everywhere, norms included (perf-anchors)
                p.copy_(torch.randn(p.shape, generator=gen) * 0.02)
        save_hf(model, model_dir, overwrite=True)
        del model
        synthetic_tokenizer(cfg.vocab_size, cfg.generation, model_dir / "tokenizer.model")
    files = {"hf": str(model_dir)}
    from gemmakit.quantize import quantize_model, save_quantized

    for scheme in ("int8", "int4"):  # quantize once, as `gemmakit quantize` would, then load that
        qdir = root / shape / f"gemmakit-{scheme}"
        if not (qdir / "manifest.json").exists():
            t0 = time.perf_counter()
            save_quantized(
                quantize_model(load_model(model_dir, dtype=torch.float32), scheme), qdir, overwrite=True
            )
            print(f"  quantized {scheme} in {time.perf_counter() - t0:.0f} s", flush=True)
        files[scheme] = str(qdir)
    try:
        from gemmakit.export_gguf import export_gguf
    except ImportError:
        return files
    tokenizer = Tokenizer.load(model_dir)
    model = None
    for qtype in ("f16", "q8_0", "q4_0"):
        path = root / shape / f"model-{qtype}.gguf"
        if not path.exists():
            model = model or load_model(model_dir, dtype=torch.float32)
            t0 = time.perf_counter()
            export_gguf(model, tokenizer, path, qtype)
            print(f"  exported {path.name} in {time.perf_counter() - t0:.0f} s", flush=True)
        files[qtype] = str(path)
    return files


def measure_bandwidth(reps: int = 7) -> dict[str, float]:
    """Read bandwidth in GB/s over 2 GiB of fp32 (median of `reps`): by torch.sum and by an fp32 GEMV.

    The ceiling uses the larger: on some CPUs MKL's GEMV streams faster than torch.sum's reduction.
    """
    import torch
    import torch.nn.functional as F

    w = torch.ones(16384, 32768)  # 2 GiB
    x = torch.ones(1, 32768)
    out = {}
    for name, fn in (("sum", lambda: w.sum()), ("gemv", lambda: F.linear(x, w))):
        fn()
        times = []
        for _ in range(reps):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        out[name] = w.numel() * 4 / statistics.median(times) / 1e9
    return out


# ---- workers (each in its own process) --------------------------------------------------------------


def _reset_peak_rss() -> None:
    """Linux keeps ru_maxrss across fork+exec, so a worker would inherit the parent's peak: reset it."""
    with contextlib.suppress(OSError), open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def _status_bytes(key: str) -> int | None:
    """A byte count from /proc/self/status ("VmHWM", "VmRSS"); None where /proc is missing."""
    with contextlib.suppress(OSError), open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    return None


def _peak_rss() -> int:
    """This process's peak resident set since `_reset_peak_rss` (VmHWM), else ru_maxrss."""
    peak = _status_bytes("VmHWM")
    return peak if peak is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _current_rss() -> int:
    """This process's resident set now (VmRSS); 0 where /proc is missing."""
    return _status_bytes("VmRSS") or 0


def _prompt(vocab: int, n: int, seed: int) -> list[int]:
    import torch

    ids = torch.randint(200, vocab, (n,), generator=torch.Generator().manual_seed(seed)).tolist()
    return [2, *ids[1:]]


def worker_gemmakit(mode: str, files: dict, args: argparse.Namespace) -> dict:
    import torch

    from gemmakit.checkpoint import load_model
    from gemmakit.infer import Engine

    t0 = time.perf_counter()
    # bf16: the stored bf16 weights, rewired onto the native bf16 GEMV as the CLI does
    if mode in ("fp32", "bf16"):
        from gemmakit.quantize import with_bf16_kernels

        model = load_model(files["hf"], dtype=torch.float32 if mode == "fp32" else None, attn_impl="sdpa")
        model = with_bf16_kernels(model)
    else:  # a checkpoint saved by `gemmakit quantize`: memory-mapped, never re-quantized
        from gemmakit.quantize import load_any

        model = load_any(files[mode], attn_impl="sdpa")
    load_s = time.perf_counter() - t0
    engine = Engine(model, compile=args.compile)
    vocab = model.config.vocab_size
    batch = args.batch
    prompts = [_prompt(vocab, args.prompt_len, seed) for seed in range(batch)]
    runs, warmup_s = [], 0.0
    for rep in range(args.reps + 1):  # the first is the warm-up (it includes compiling, if enabled)
        stamps = []
        t_start = time.perf_counter()
        for _ in engine.stream(prompts, args.new_tokens):
            stamps.append(time.perf_counter())
        if rep:
            runs.append(_timing(t_start, stamps, args.prompt_len, batch))
        else:
            warmup_s = stamps[-1] - t_start
    return {"load_s": load_s, "warmup_s": warmup_s, **_summarise(runs)}


def worker_hf(mode: str, files: dict, args: argparse.Namespace) -> dict:
    import torch
    import transformers

    dtype = torch.float32 if mode == "fp32" else torch.bfloat16
    t0 = time.perf_counter()
    model = transformers.AutoModelForCausalLM.from_pretrained(files["hf"], dtype=dtype).eval()
    load_s = time.perf_counter() - t0
    ids = torch.tensor([_prompt(model.config.vocab_size, args.prompt_len, 0)])

    class Stamp(transformers.LogitsProcessor):
        def __init__(self) -> None:
            self.stamps: list[float] = []

        def __call__(self, input_ids, scores):  # called once per new token, after its forward
            self.stamps.append(time.perf_counter())
            return scores

    runs = []
    for rep in range(args.reps + 1):
        stamp = Stamp()
        t_start = time.perf_counter()
        with torch.inference_mode():
            model.generate(ids, max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, do_sample=False,
                           logits_processor=[stamp], pad_token_id=0)  # fmt: skip
        if rep:
            runs.append(_timing(t_start, stamp.stamps, args.prompt_len, 1))
    return {"load_s": load_s, **_summarise(runs)}


def worker_llama(qtype: str, files: dict, args: argparse.Namespace) -> dict:
    import llama_cpp
    import llama_cpp.llama_cpp as low
    import numpy as np

    if args.llama_no_repack:
        # ggml's AMX/extra-buffer repacking of q8_0/q4_0 segfaults on some CPUs (llama.cpp#20824):
        # fall back to its plain CPU kernels, and say so in the results.
        default = low.llama_model_default_params

        def params():
            p = default()
            p.use_extra_bufts = False
            return p

        low.llama_model_default_params = params
    t0 = time.perf_counter()
    llm = llama_cpp.Llama(model_path=files[qtype], n_ctx=args.prompt_len + args.new_tokens + 8, n_threads=args.threads,
                          n_threads_batch=args.threads, n_batch=512, logits_all=False, verbose=False)  # fmt: skip
    load_s = time.perf_counter() - t0
    prompt = _prompt(llm.n_vocab(), args.prompt_len, 0)
    runs = []
    for rep in range(args.reps + 1):
        llm.reset()
        t_start = time.perf_counter()
        llm.eval(prompt)
        stamps = []
        for i in range(args.new_tokens):
            token = int(np.argmax(llm.scores[llm.n_tokens - 1]))
            stamps.append(time.perf_counter())
            if i + 1 < args.new_tokens:
                llm.eval([token])
        if rep:
            runs.append(_timing(t_start, stamps, args.prompt_len, 1))
    return {"load_s": load_s, "repack": not args.llama_no_repack, **_summarise(runs)}


def _timing(t_start: float, stamps: list[float], prompt_len: int, batch: int) -> dict:
    ttft = stamps[0] - t_start
    decode = (len(stamps) - 1) / (stamps[-1] - stamps[0]) if len(stamps) > 1 else float("nan")
    return {"ttft_s": ttft, "prefill_tok_s": batch * prompt_len / ttft, "decode_tok_s": batch * decode}


def _summarise(runs: list[dict]) -> dict:
    out = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
    out["decode_range"] = [min(r["decode_tok_s"] for r in runs), max(r["decode_tok_s"] for r in runs)]
    out["peak_rss_bytes"] = _peak_rss()
    return out


def run_worker(args: argparse.Namespace) -> int:
    _reset_peak_rss()
    import torch

    torch.set_num_threads(args.threads)
    files = json.loads(args.files)
    engine, mode, _ = SYSTEMS[args.worker]
    # The runtime's own resident set (interpreter, torch, the engine's libraries) before any weights:
    # reported so the RSS ratio can also be read net of this fixed cost (~0.35 GB for torch).
    importlib.import_module(
        {"gemmakit": "gemmakit.quantize", "hf": "transformers", "llama": "llama_cpp"}[engine]
    )
    if engine == "gemmakit":
        importlib.import_module("gemmakit.quantize").kernels.native()  # the kernel library is runtime too
    runtime_rss = _current_rss()
    fn = {"gemmakit": worker_gemmakit, "hf": worker_hf, "llama": worker_llama}[engine]
    result = {**fn(mode, files, args), "runtime_rss_bytes": runtime_rss}
    print("RESULT " + json.dumps(result), flush=True)
    return 0


# ---- the orchestrator -------------------------------------------------------------------------------


def spawn(system: str, files: dict, args: argparse.Namespace, batch: int = 1) -> dict | None:
    cmd = [sys.executable, __file__, "--worker", system, "--files", json.dumps(files), "--threads",
           str(args.threads), "--prompt-len", str(args.prompt_len), "--new-tokens", str(args.new_tokens),
           "--reps", str(args.reps), "--batch", str(batch)] + (["--compile"] if args.compile else [])  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout)
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[7:])
    if SYSTEMS[system][0] == "llama" and proc.returncode < 0:  # killed by a signal: retry without repacking
        print(
            f"  {system}: crashed with signal {-proc.returncode}; retrying without weight repacking",
            flush=True,
        )
        proc = subprocess.run(
            cmd + ["--llama-no-repack"], capture_output=True, text=True, timeout=args.timeout
        )
        for line in proc.stdout.splitlines():
            if line.startswith("RESULT "):
                return json.loads(line[7:])
    tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
    print(f"  {system}: failed ({' | '.join(tail)})", flush=True)
    return None


def _write_md(path: Path, body: str) -> None:
    """This benchmark's section of RESULTS.md; the other benchmarks' sections are kept."""
    sys.path.insert(0, str(HERE))
    from results_md import update_section

    update_section(path, "decode", body)


def weight_bytes(shape: str, bits: float) -> float:
    from gemmakit.config import get_preset
    from gemmakit.model import param_count

    return param_count(get_preset(shape)) * bits / 8


def derive(
    r: dict, shape: str, bits: float, bandwidth: float, args: argparse.Namespace, batch: int = 1
) -> None:
    """Decode steps as a fraction of the bandwidth ceiling (a step reads the weights once for the
    whole batch); peak RSS over (weights + KV cache of `batch` sequences)."""
    r["bw_fraction"] = r["decode_tok_s"] / batch * weight_bytes(shape, bits) / (bandwidth * 1e9)
    need = weight_bytes(shape, bits) + batch * kv_bytes(shape, args)
    r["rss_ratio"] = r["peak_rss_bytes"] / need
    if r.get("runtime_rss_bytes"):
        r["rss_ratio_net"] = (r["peak_rss_bytes"] - r["runtime_rss_bytes"]) / need


def _batch_of(name: str) -> int:
    """The batch size in a row name like "gemmakit int8 (batch 4)"; 1 otherwise."""
    m = re.search(r"\(batch (\d+)\)", name)
    return int(m.group(1)) if m else 1


def report_only(path: Path, args: argparse.Namespace) -> int:
    """Recompute derived columns of a saved run (same measurements) and rewrite the Markdown."""
    results = json.loads(path.read_text())
    saved = argparse.Namespace(**{**results["args"], "markdown": args.markdown})
    for shape, rows in results["shapes"].items():
        for name, r in rows.items():
            if r is not None:
                derive(
                    r,
                    shape,
                    SYSTEMS[name.split(" (")[0]][2],
                    results["bandwidth_gb_s"],
                    saved,
                    _batch_of(name),
                )
    path.write_text(json.dumps(results, indent=2))
    _write_md(Path(args.markdown), report(results, results["bandwidth_gb_s"], saved))
    return 0


def kv_bytes(shape: str, args: argparse.Namespace) -> int:
    """The gemmakit KV cache for one prompt + its new tokens, in float32."""
    import torch

    from gemmakit.config import get_preset
    from gemmakit.infer import kv_cache_bytes

    return kv_cache_bytes(get_preset(shape), 1, args.prompt_len + args.new_tokens, torch.float32)


def report(results: dict, bandwidth: float, args: argparse.Namespace) -> str:
    m = results["machine"]
    lines = ["# Decode benchmark results\n",
             f"Machine: {m['cpu']}, {m['cores']} cores, torch {m['torch']} ({m['cpu_capability']}); "
             f"ISA level {m.get('isa_level', 'unknown')}, kernels {m.get('kernel_backend', 'unknown')}; "
             f"{args.threads} threads; measured read bandwidth {bandwidth:.1f} GB/s.",
             f"Prompt {args.prompt_len} random ids, {args.new_tokens} new tokens greedy, batch 1 unless noted, "
             f"medians of {args.reps} after one warm-up. Command: `python benchmarks/decode.py "
             f"{results.get('command', '')}`.\n"]  # fmt: skip
    for shape, rows in results["shapes"].items():
        lines += [f"## {shape}\n",
                  "| system | prefill tok/s | TTFT s | decode tok/s [min-max] | % of BW ceiling | peak RSS GB (x weights+KV; x net of runtime) | vs anchors (decode / prefill) |",
                  "|---|---|---|---|---|---|---|"]  # fmt: skip
        for name, r in rows.items():
            if r is None:
                lines.append(f"| {name} | failed | | | | | |")
                continue
            ratios = []
            anchors = (
                [] if "(batch" in name else ANCHORS.get(name.split(" (")[0], [])
            )  # anchors ran at batch 1
            for anchor, target in anchors:
                a = rows.get(anchor)
                if a:
                    d, p = r["decode_tok_s"] / a["decode_tok_s"], r["prefill_tok_s"] / a["prefill_tok_s"]
                    ratios.append(f"{anchor}: {d:.2f}x / {p:.2f}x (target {target}x)")
            lo, hi = r["decode_range"]
            lines.append(f"| {name} | {r['prefill_tok_s']:.1f} | {r['ttft_s']:.2f} | {r['decode_tok_s']:.2f} "
                         f"[{lo:.2f}-{hi:.2f}] | {100 * r.get('bw_fraction', float('nan')):.0f}% | "
                         f"{r['peak_rss_bytes'] / 1e9:.2f} ({r.get('rss_ratio', float('nan')):.2f}x; "
                         f"{r.get('rss_ratio_net', float('nan')):.2f}x) | {'; '.join(ratios)} |")  # fmt: skip
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="gemmakit vs transformers vs llama.cpp decode speed")
    ap.add_argument("--shapes", default="gemma-2b,gemma-3-1b", help="comma-separated presets")
    ap.add_argument("--systems", default=",".join(SYSTEMS), help="comma-separated subset of systems")
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch", type=int, default=1, help="also run gemmakit with this many prompts at once")
    ap.add_argument("--compile", action="store_true", help="gemmakit rows decode through torch.compile")
    ap.add_argument(
        "--models", default=str(Path.home() / ".cache" / "gemmakit-bench"), help="model cache dir"
    )
    ap.add_argument("--out", default=str(HERE / "results" / "decode.json"))
    ap.add_argument("--markdown", default=str(HERE / "RESULTS.md"))
    ap.add_argument("--timeout", type=int, default=3600)
    ap.add_argument("--report-only", metavar="JSON", help="rewrite the Markdown from a saved results file")
    ap.add_argument("--llama-no-repack", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--files", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        return run_worker(args)
    if args.report_only:
        return report_only(Path(args.report_only), args)
    import torch

    torch.set_num_threads(args.threads)
    sys.path.insert(0, str(HERE))
    from machine_info import machine

    results = {"machine": machine(), "args": vars(args), "command": " ".join(sys.argv[1:]), "shapes": {}}
    measured = measure_bandwidth()
    bandwidth = max(measured.values())
    results["bandwidth_gb_s"], results["bandwidth_by_method"] = bandwidth, measured
    print(f"read bandwidth: {bandwidth:.1f} GB/s ({args.threads} threads; {measured})", flush=True)
    for shape in args.shapes.split(","):
        print(f"{shape}: preparing models", flush=True)
        files = prepare(shape, Path(args.models))
        rows: dict[str, dict | None] = {}
        for system in args.systems.split(","):
            engine, mode, bits = SYSTEMS[system]
            if engine == "llama" and mode not in files:
                continue
            r = spawn(system, files, args)
            if r is not None:
                derive(r, shape, bits, bandwidth, args)
                print(f"  {system:20s} prefill {r['prefill_tok_s']:7.1f} tok/s  decode {r['decode_tok_s']:6.2f} tok/s"
                      f"  RSS {r['peak_rss_bytes'] / 1e9:5.2f} GB", flush=True)  # fmt: skip
            rows[system] = r
            if engine == "gemmakit" and args.batch > 1:
                rb = spawn(system, files, args, batch=args.batch)
                if rb is not None:
                    derive(rb, shape, bits, bandwidth, args, args.batch)
                rows[f"{system} (batch {args.batch})"] = rb
        results["shapes"][shape] = rows
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2))
    md = report(results, bandwidth, args)
    _write_md(Path(args.markdown), md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
