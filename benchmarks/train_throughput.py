"""Training throughput: gemmakit's loop step vs a plain PyTorch loop over HF transformers' Gemma, side by side.

Same architecture (the nano Gemma 3 config by default, or `--preset tiny`), same random batches, same
AdamW settings, same precision, same thread count, in one process one after the other, alternating
systems per repeat so drift in the host hits both. gemmakit runs `train.loop._step` (the real loop
step: chunked loss, accumulation arithmetic, clipping, non-finite check); transformers runs
`model(input_ids, labels=...)` + clip + AdamW, the loop its Trainer wraps. Reports tokens/s
(median over timed steps) and the ratio, and writes JSON next to the other results.

    python benchmarks/train_throughput.py [--preset nano|tiny] [--dtype float32|bfloat16] [--steps 20]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent


def nano_config():
    from gemmakit.train.recipe import load_recipe
    from gemmakit.train.run import model_config

    return model_config(
        load_recipe(
            HERE.parent / "gemmakit" / "assets" / "nano-build" / "nano-pretrain.toml",
            ["model.overrides.vocab_size=8192"],
        )
    )


def build(preset: str):
    from gemmakit.config import get_preset
    from gemmakit.model import Gemma

    cfg = nano_config() if preset == "nano" else get_preset(preset)
    cfg = dataclasses.replace(cfg, max_seq_len=max(cfg.max_seq_len, 512))
    ours = Gemma(cfg).init_weights(0.02, seed=0).set_attn_impl("sdpa")
    return cfg, ours


def hf_twin(cfg, ours):
    import transformers

    from gemmakit.checkpoint import internal_name_to_hf
    from gemmakit.config import to_hf_dict

    hf_cfg = transformers.AutoConfig.for_model(**{**to_hf_dict(cfg), "attn_implementation": "sdpa"})
    hf = transformers.AutoModelForCausalLM.from_config(hf_cfg)
    hf.load_state_dict({internal_name_to_hf(k, cfg): v for k, v in ours.state_dict().items()}, strict=False)
    return hf


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument(
        "--preset", default="nano", help="'nano' (the shipped model's shape) or a gemmakit preset"
    )
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--steps", type=int, default=12, help="timed steps per system (after 2 warm-up steps)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=str(HERE / "results" / "train_throughput.json"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from gemmakit.train.loop import Hooks, _step
    from gemmakit.train.objectives import NextTokenLoss
    from gemmakit.train.optim import make_optimizer
    from gemmakit.train.recipe import recipe_from_dict

    cfg, ours = build(args.preset)
    hf = hf_twin(cfg, ours)
    recipe = recipe_from_dict({"optim": {"lr": 1e-3, "weight_decay": 0.0}, "loop": {"dtype": args.dtype}})
    module = NextTokenLoss(ours)
    opt_ours = make_optimizer(module, recipe.optim)
    opt_hf = make_optimizer(hf, recipe.optim)
    g = torch.Generator().manual_seed(0)
    batches = [
        torch.randint(4, cfg.vocab_size, (args.batch, args.seq_len + 1), generator=g) for _ in range(4)
    ]
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.dtype == "bfloat16")

    def step_ours(i: int) -> float:
        loss, _, _ = _step(
            module, opt_ours, [{"tokens": batches[i % 4]}], recipe, i, torch.device("cpu"), Hooks()
        )
        return loss

    def step_hf(i: int) -> float:
        tokens = batches[i % 4]
        with autocast:
            out = hf(input_ids=tokens[:, :-1], labels=tokens[:, :-1].clone())  # HF shifts labels itself
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(hf.parameters(), 1.0)
        opt_hf.step()
        opt_hf.zero_grad(set_to_none=True)
        return out.loss.item()

    systems = {"gemmakit": step_ours, "transformers": step_hf}
    times: dict[str, list[float]] = {k: [] for k in systems}
    losses: dict[str, list[float]] = {k: [] for k in systems}
    for i in range(args.steps + 2):
        for name, fn in systems.items():
            t0 = time.perf_counter()
            losses[name].append(fn(i))
            if i >= 2:
                times[name].append(time.perf_counter() - t0)
    tokens = args.batch * args.seq_len
    tps = {k: tokens / statistics.median(v) for k, v in times.items()}
    n_params = sum(p.numel() for p in ours.parameters())
    sys.path.insert(0, str(HERE))
    from machine_info import machine

    m = machine()
    print(f"machine: {m['cpu']}, ISA level {m['isa_level']}, kernels {m['kernel_backend']}, torch {m['torch']} "
          f"({m['cpu_capability']}), {args.threads} threads")  # fmt: skip
    print(
        f"model: {args.preset} ({n_params / 1e6:.1f}M parameters), batch {args.batch} x {args.seq_len}, {args.dtype}"
    )
    print("| system | tokens/s | first loss | last loss |\n|---|---|---|---|")
    for k in systems:
        print(f"| {k} | {tps[k]:,.0f} | {losses[k][0]:.4f} | {losses[k][-1]:.4f} |")
    ratio = tps["gemmakit"] / tps["transformers"]
    print(f"gemmakit / transformers: {ratio:.2f}x")
    out = {"args": vars(args), "tokens_per_s": tps, "ratio": ratio, "params": n_params, "losses": losses,
           "machine": m}  # fmt: skip
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
