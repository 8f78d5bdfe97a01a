"""Side-by-side generation speed: gemmakit's Engine vs HF transformers' `generate`, same weights, same run.

Random weights of an official shape (default: Gemma 3 270M, float32), batch 1, a fixed prompt,
greedy decoding. Reports prefill and decode tokens/s as medians over repeats, the ratio to
transformers (eager and sdpa), and whether greedy tokens agree. Records the machine. Writes JSON.

    python benchmarks/bench_generate.py --preset gemma-3-270m --prompt-len 128 --new-tokens 32

This is the core's baseline; the fast-inference work (quantization, static cache, compile) is
measured against llama.cpp in its own benchmark.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

from gemmakit.checkpoint import internal_name_to_hf
from gemmakit.config import PRESETS, to_hf_dict
from gemmakit.infer import Engine
from gemmakit.model import Gemma


def hf_twin(model: Gemma, impl: str):
    import transformers

    d = to_hf_dict(model.config)
    cls_cfg = {"gemma": transformers.GemmaConfig, "gemma2": transformers.Gemma2Config,
               "gemma3_text": transformers.Gemma3TextConfig}[d["model_type"]]  # fmt: skip
    cls = {"gemma": transformers.GemmaForCausalLM, "gemma2": transformers.Gemma2ForCausalLM,
           "gemma3_text": transformers.Gemma3ForCausalLM}[d["model_type"]]  # fmt: skip
    cfg = cls_cfg(**{k: v for k, v in d.items() if k not in ("model_type", "architectures")})
    hf = cls._from_config(cfg, attn_implementation=impl)
    sd = {internal_name_to_hf(k, model.config): v for k, v in model.state_dict().items()}
    missing, unexpected = hf.load_state_dict(sd, strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}, (missing, unexpected)
    return hf.eval()


def time_ours(engine: Engine, prompt: list[int], new: int) -> tuple[float, float, list[int]]:
    t0 = time.perf_counter()
    cache = engine.new_cache(1, len(prompt) + new)
    tokens = torch.tensor([prompt])
    logits = engine.prefill(tokens, None, cache)
    t1 = time.perf_counter()
    out = []
    pos = len(prompt)
    for i in range(new):
        nxt = logits.argmax(-1)
        out.append(int(nxt))
        if i + 1 < new:
            logits = engine.decode_one(nxt, torch.tensor([pos + i]), cache)
    t2 = time.perf_counter()
    return len(prompt) / (t1 - t0), (new - 1) / (t2 - t1), out


def time_hf(hf, prompt: list[int], new: int) -> tuple[float, float, list[int]]:
    ids = torch.tensor([prompt])
    with torch.inference_mode():
        t0 = time.perf_counter()
        hf(input_ids=ids, logits_to_keep=1)  # prefill alone; last-position logits, as our prefill
        t1 = time.perf_counter()
        out = hf.generate(ids, max_new_tokens=new, do_sample=False, eos_token_id=None, pad_token_id=0)
        t2 = time.perf_counter()
    prefill_s = t1 - t0
    decode_s = max(t2 - t1 - prefill_s, 1e-9)  # generate = one prefill + (new - 1) decode steps
    return len(prompt) / prefill_s, (new - 1) / decode_s, out[0, len(prompt) :].tolist()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", default="gemma-3-270m", choices=sorted(PRESETS))
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", default="benchmarks/results/bench_generate.json")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = Gemma(PRESETS[args.preset]).init_weights(std=0.02, seed=0).eval()
    prompt = torch.randint(
        3, model.config.vocab_size, (args.prompt_len,), generator=torch.Generator().manual_seed(1)
    )
    prompt = [2, *prompt.tolist()[1:]]
    systems = {
        "gemmakit eager": lambda: time_ours(Engine(model.set_attn_impl("eager")), prompt, args.new_tokens),
        "gemmakit sdpa": lambda: time_ours(Engine(model.set_attn_impl("sdpa")), prompt, args.new_tokens),
    }
    for impl in ("eager", "sdpa"):
        if impl == "sdpa" and model.config.attn_softcap is not None:
            continue  # transformers refuses sdpa for soft-capped Gemma 2
        hf = hf_twin(model, impl)
        systems[f"transformers {impl}"] = lambda hf=hf: time_hf(hf, prompt, args.new_tokens)
    rows, tokens = {}, {}
    for name, fn in systems.items():
        runs = [fn() for _ in range(args.repeats)]
        rows[name] = (statistics.median(r[0] for r in runs), statistics.median(r[1] for r in runs))
        tokens[name] = runs[0][2]
    base = rows.get("transformers eager")
    print(f"{args.preset} fp32, prompt {args.prompt_len}, {args.new_tokens} new tokens, batch 1, "
          f"{torch.get_num_threads()} threads, medians of {args.repeats}")  # fmt: skip
    print(
        f"{'system':22s} {'prefill tok/s':>14s} {'decode tok/s':>13s} {'prefill x':>10s} {'decode x':>9s}  same tokens"
    )
    for name, (pf, dc) in rows.items():
        same = tokens[name] == tokens["transformers eager"]
        print(f"{name:22s} {pf:14.1f} {dc:13.2f} {pf / base[0]:10.2f} {dc / base[1]:9.2f}  {same}")
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from machine_info import machine

    result = {"machine": machine(), "args": vars(args), "results": {
        k: {"prefill_tok_s": v[0], "decode_tok_s": v[1], "same_tokens_as_transformers_eager":
            tokens[k] == tokens["transformers eager"]} for k, v in rows.items()}}  # fmt: skip
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(f"machine: {result['machine']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
