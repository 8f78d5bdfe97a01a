"""Whole-model speed: gemmakit's quantized Gemma next to llama.cpp GGUFs, same prompt, same process.

Batch 1, a prompt of --prompt-len random ids, --new-tokens greedy tokens (EOS ignored), the
perf-anchors method: prefill tok/s = prompt / time of the prompt pass; decode tok/s = (new - 1) /
time from the first to the last token, argmax included. Systems run in interleaved rounds after one
warm-up each, medians reported, load average recorded. llama.cpp runs through llama-cpp-python
with n_threads = n_threads_batch = torch's thread count.

    # once: random-weight Gemma 1 2B as gemmakit int8 / int4 checkpoints and llama.cpp GGUFs
    python benchmarks/bench_quant_decode.py --prepare /tmp/gemma2b          # ~10 min, ~15 GB disk
    python benchmarks/bench_quant_decode.py --dir /tmp/gemma2b

--prepare needs the optional `gguf` and `llama-cpp-python` packages for the GGUF side (f16 export by
gemmakit's exporter, then llama.cpp's own quantizer, which keeps the q4_0 output matrix at q6_K as
in the anchors). The synthetic tokenizer is a tiny trained Gemma-layout SentencePiece model padded
with dummy pieces to 256000, so the embedding and output projection have the real shape.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

from gemmakit.config import PRESETS
from gemmakit.infer import Engine
from gemmakit.model import Gemma
from gemmakit.quantize import backend, load_quantized, quantize_state_dict, save_quantized, swap_modules

ROOT = Path(__file__).resolve().parents[1]
GK = {"gemmakit int8": ("int8", None), "gemmakit int4 g64": ("int4", 64), "gemmakit int4 g32": ("int4", 32)}
GGUF = {"llama.cpp q8_0": (7, "q8_0"), "llama.cpp q4_0": (2, "q4_0")}  # llama_ftype values


def _dirname(name: str) -> str:
    return name.replace(" ", "-")


def prepare(out: Path, preset: str) -> None:
    """Write the synthetic tokenizer, gemmakit quantized checkpoints, and f16/q8_0/q4_0 GGUFs into `out`."""
    sys.path.insert(0, str(ROOT / "tests"))
    from sentencepiece import sentencepiece_model_pb2
    from spm_helpers import gemma_spm_bytes

    cfg = PRESETS[preset]
    out.mkdir(parents=True, exist_ok=True)
    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(gemma_spm_bytes(cfg.generation, 640))
    for i in range(cfg.vocab_size - len(proto.pieces)):
        piece = proto.pieces.add()
        piece.piece, piece.score, piece.type = f"\u2581t{i}", -1000.0 - i * 1e-3, 1
    (out / "tokenizer.model").write_bytes(proto.SerializeToString())
    with torch.device("meta"):
        model = Gemma(cfg)
    model = model.to_empty(device="cpu").to(torch.bfloat16).eval()
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():  # N(0, 0.02) like the anchors; norms 0 ((1 + w) = 1)
            for i in range(0, p.shape[0], 8192):
                p[i : i + 8192] = 0 if name.endswith("norm.weight") else torch.randn(p[i : i + 8192].shape, generator=gen) * 0.02  # fmt: skip
    for name, (scheme, group) in GK.items():
        if not (out / _dirname(name)).exists():
            qsd, meta = quantize_state_dict(model, cfg, scheme, group)
            with torch.device("meta"):
                qm = swap_modules(Gemma(cfg), meta)
            qm.load_state_dict(qsd, assign=True)
            save_quantized(qm, out / _dirname(name), tokenizer=out / "tokenizer.model")
            del qsd, qm
            gc.collect()
    try:
        import llama_cpp

        from gemmakit.export_gguf import export_gguf
        from gemmakit.tokenizer import Tokenizer
    except ImportError as e:
        print(f"skipping GGUFs: {e}")
        return
    if not (out / "f16.gguf").exists():
        export_gguf(model, Tokenizer.load(out / "tokenizer.model"), out / "f16.gguf", "f16")
    del model
    gc.collect()
    for ftype, suffix in GGUF.values():
        if not (out / f"{suffix}.gguf").exists():
            params = llama_cpp.llama_model_quantize_default_params()
            params.ftype, params.nthread = ftype, torch.get_num_threads()
            llama_cpp.llama_model_quantize(str(out / "f16.gguf").encode(), str(out / f"{suffix}.gguf").encode(), ctypes.byref(params))  # fmt: skip


def _no_amx_repack() -> None:
    """ggml's AMX repacking of Q4_0/Q8_0 segfaults on Sapphire-Rapids-class CPUs (llama.cpp#20824, seen
    here with llama-cpp-python 0.3.36): load models without the extra buffer types, i.e. with ggml's
    plain CPU kernels (AVX-512/VNNI dot products), as tests/test_export_gguf.py does."""
    import llama_cpp.llama_cpp as low

    default = low.llama_model_default_params
    if getattr(default, "_gemmakit_patched", False):
        return

    def params():  # noqa: ANN202
        p = default()
        p.use_extra_bufts = False
        return p

    params._gemmakit_patched = True
    low.llama_model_default_params = params


def run_gemmakit(engine: Engine, prompt: list[int], new: int) -> tuple[float, float]:
    cache = engine.new_cache(1, len(prompt) + new)
    t0 = time.perf_counter()
    logits = engine.prefill(torch.tensor([prompt]), None, cache)
    t1 = time.perf_counter()
    for i in range(new):
        nxt = logits.argmax(-1)
        if i + 1 < new:
            logits = engine.decode_one(nxt, torch.tensor([len(prompt) + i]), cache)
    t2 = time.perf_counter()
    return len(prompt) / (t1 - t0), (new - 1) / (t2 - t1)


def run_llama(llm, prompt: list[int], new: int) -> tuple[float, float]:
    import numpy as np

    llm.reset()
    t0 = time.perf_counter()
    llm.eval(prompt)
    t1 = time.perf_counter()
    for i in range(new):
        nxt = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        if i + 1 < new:
            llm.eval([nxt])
    t2 = time.perf_counter()
    return len(prompt) / (t1 - t0), (new - 1) / (t2 - t1)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--prepare", type=Path, help="build the models into this directory, then exit")
    ap.add_argument("--preset", default="gemma-2b", choices=sorted(PRESETS))
    ap.add_argument("--dir", type=Path, help="a --prepare'd directory to benchmark")
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--only", nargs="+", default=None, help="subset of system names")
    ap.add_argument("--out", default="benchmarks/results/bench_quant_decode.json")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.prepare:
        prepare(args.prepare, args.preset)
        return 0
    threads = torch.get_num_threads()
    systems = {}
    for name in GK:
        if (args.dir / _dirname(name)).exists() and (args.only is None or name in args.only):
            model = load_quantized(args.dir / _dirname(name), attn_impl="sdpa")
            systems[name] = (run_gemmakit, Engine(model))
    for name, (_, suffix) in GGUF.items():
        if (args.dir / f"{suffix}.gguf").exists() and (args.only is None or name in args.only):
            from llama_cpp import Llama

            _no_amx_repack()

            llm = Llama(str(args.dir / f"{suffix}.gguf"), n_ctx=args.prompt_len + args.new_tokens + 8, n_batch=512,
                        n_threads=threads, n_threads_batch=threads, verbose=False)  # fmt: skip
            systems[name] = (run_llama, llm)
    vocab = next(iter(systems.values()))[1].config.vocab_size if GK.keys() & systems.keys() else 256000
    g = torch.Generator().manual_seed(1)
    prompt = [2, *torch.randint(3, vocab, (args.prompt_len - 1,), generator=g).tolist()]
    load_before = os.getloadavg()
    for fn, obj in systems.values():
        fn(obj, prompt, 4)  # warm-up: page-in of mmapped weights, thread pools
    runs: dict[str, list[tuple[float, float]]] = {k: [] for k in systems}
    for _ in range(args.rounds):
        for name, (fn, obj) in systems.items():
            runs[name].append(fn(obj, prompt, args.new_tokens))
    print(f"{args.preset}, prompt {args.prompt_len}, {args.new_tokens} new tokens, batch 1, {threads} threads, "
          f"median [min-max] of {args.rounds}; kernels {backend()}; load {load_before} -> {os.getloadavg()}")  # fmt: skip
    print(f"{'system':22s} {'prefill tok/s':>22s} {'decode tok/s':>22s}")
    rows = {}
    for name, r in runs.items():
        pf, dc = [x[0] for x in r], [x[1] for x in r]
        rows[name] = {"prefill_tok_s": statistics.median(pf), "decode_tok_s": statistics.median(dc),
                      "prefill_all": pf, "decode_all": dc}  # fmt: skip
        print(f"{name:22s} {statistics.median(pf):8.1f} [{min(pf):5.1f}-{max(pf):5.1f}] "
              f"{statistics.median(dc):8.2f} [{min(dc):5.2f}-{max(dc):5.2f}]")  # fmt: skip
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from machine_info import machine

    result = {"machine": {**machine(), "loadavg_before": load_before, "loadavg_after": os.getloadavg()},
              "args": {k: str(v) for k, v in vars(args).items()}, "results": rows}  # fmt: skip
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
