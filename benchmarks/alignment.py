"""Alignment on the nano model, measured: reward model, DPO and RL (RLOO) against the shipped SFT model.

One command rebuilds every number of `benchmarks/alignment.md` (about 35 minutes on 2 cores):

    python benchmarks/alignment.py [--out runs/alignment] [--smoke]

Data: `synth.preference_pairs` and `synth.prompt_set`, train split from seed 0 and held-out split from
seed 1 (other names, numbers, words, templates and assistants; see synth.py). Stages, each from the
shipped nano SFT model (`gemmakit/assets/nano`) through `gemmakit.train.run` and the recipes in
`recipes/` (with the step counts below):
1. reward model: pairwise accuracy on held-out pairs, before (the freshly initialised head) and after;
2. DPO: greedy answers to held-out prompts, task accuracy (`rewards.task_accuracy`: exact checks per
   kind), over-refusal on benign prompts, and its win rate against the SFT model's answers under the
   trained reward model (`eval.judge`) and under the exact checks;
3. RL (RLOO, LoRA, the verifiable `rewards.synth_reward` plus the reward model): the same, plus the
   mean reward on held-out prompts and the KL to the SFT model per token on its own samples. Two KL
   coefficients are trained and the judge (the reward model) picks the one shipped in the table.
Every number comes with its standard error over prompts (or pairs); `alignment.md` says for each
whether it moved in the right direction by more than that.

Key trade-off: a 14M model on generated tasks: the skills are narrow and exact checks can score
them, which is what makes a before/after claim checkable; they say nothing about open-ended quality.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
NANO = ROOT / "gemmakit" / "assets" / "nano"
sys.path.insert(0, str(HERE))

# Steps per stage (full run / --smoke), chosen so the whole run stays under an hour on 2 cores.
STEPS = {"reward": (300, 3), "dpo": (300, 3), "rl": (150, 2)}
SIZES = {"pairs": (4000, 64), "held_pairs": (400, 32), "prompts": (2000, 32), "held_prompts": (400, 16)}


def _write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def _se(values: list[float]) -> float:
    n = len(values)
    if n < 2:
        return 0.0
    m = sum(values) / n
    return math.sqrt(sum((v - m) ** 2 for v in values) / (n - 1) / n)


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else float("nan")


def _train(recipe: str, out: Path, sets: list[str]) -> Path:
    from gemmakit.train import load_recipe, run

    if not (out / "final").is_dir():
        run(load_recipe(ROOT / "recipes" / recipe, sets), out, resume=(out / "checkpoints").is_dir())
    return out / "final"


def _answers(model_dir: Path, rows: list[dict], lora: bool = False) -> list[str]:
    """Greedy answers (<= 64 tokens) of a model directory (or a PEFT adapter on the nano base)."""
    from gemmakit.chat import render
    from gemmakit.checkpoint import load_model
    from gemmakit.infer import Engine
    from gemmakit.tokenizer import Tokenizer

    tok = Tokenizer.load(NANO)
    if lora:
        from gemmakit.lora import load_adapter, merge_lora

        model = merge_lora(load_adapter(load_model(NANO, dtype=torch.float32), model_dir))
    else:
        model = load_model(model_dir, dtype=torch.float32)
    engine = Engine(model.set_attn_impl("sdpa"))
    ids = [render(tok, r["messages"]).tokens for r in rows]
    out: list[str] = []
    for s in range(0, len(ids), 64):
        out += [tok.decode(o) for o in engine.generate(ids[s : s + 64], 64, stop_tokens=tok.stop_ids)]
    return out


def _per_row(rows: list[dict], answers: list[str]) -> list[float | None]:
    from gemmakit.data.rewards import synth_reward

    columns = {k: [r.get(k) for r in rows] for k in sorted({k for r in rows for k in r if k != "messages"})}
    return synth_reward([r["messages"] for r in rows], answers, **columns)


def _task_numbers(rows: list[dict], answers: list[str]) -> dict:
    from gemmakit.data.synth import is_refusal

    scores = _per_row(rows, answers)
    judged = [s for s in scores if s is not None]
    benign = [
        float(is_refusal(a))
        for r, a in zip(rows, answers, strict=True)
        if r["kind"] == "refusal" and not r.get("harmful")
    ]
    harmful = [float(is_refusal(a)) for r, a in zip(rows, answers, strict=True) if r.get("harmful")]
    per_kind = {}
    for kind in sorted({r["kind"] for r in rows}):
        v = [s for r, s in zip(rows, scores, strict=True) if r["kind"] == kind and s is not None]
        per_kind[kind] = {"value": _mean(v), "se": _se(v), "n": len(v)}
    return {"task_accuracy": {"value": _mean(judged), "se": _se(judged), "n": len(judged)},
            "over_refusal": {"value": _mean(benign), "se": _se(benign), "n": len(benign)},
            "harmful_refusal": {"value": _mean(harmful), "se": _se(harmful), "n": len(harmful)},
            "per_kind": per_kind}  # fmt: skip


def _exact_win_rate(rows: list[dict], a: list[str], b: list[str]) -> dict:
    sa, sb = _per_row(rows, a), _per_row(rows, b)
    score = [
        1.0 if x > y else 0.0 if x < y else 0.5
        for x, y in zip(sa, sb, strict=True)
        if x is not None and y is not None
    ]
    return {"value": _mean(score), "se": _se(score), "n": len(score)}


def _judge_win_rate(judge: object, rows: list[dict], a: list[str], b: list[str]) -> dict:
    from gemmakit.eval.judge import compare

    c = compare(judge, [r["messages"] for r in rows], a, b)
    return {"value": c.win_rate, "se": c.stderr, "n": c.n, "wins": c.wins, "ties": c.ties, "losses": c.losses}


def _rm_accuracy(rm: object, pairs_path: Path) -> dict:
    from gemmakit.data.preference import read_preference_jsonl
    from gemmakit.tokenizer import Tokenizer
    from gemmakit.train.pairs import encode_pairs
    from gemmakit.train.reward import score_sequences

    pairs = encode_pairs(read_preference_jsonl(pairs_path), Tokenizer.load(NANO))
    s = score_sequences(rm, [p.prompt + p.chosen for p in pairs] + [p.prompt + p.rejected for p in pairs], 32)
    hits = [float(s[i] > s[len(pairs) + i]) for i in range(len(pairs))]
    return {"value": _mean(hits), "se": _se(hits), "n": len(hits)}


@torch.no_grad()
def _kl_per_token(policy_dir: Path, rows: list[dict], answers: list[str], lora: bool) -> dict:
    """Mean over held-out prompts of sum_t (log pi - log pi_sft) / tokens on the policy's own greedy answers."""
    from gemmakit.chat import render
    from gemmakit.checkpoint import load_model
    from gemmakit.lora import load_adapter, merge_lora
    from gemmakit.tokenizer import Tokenizer
    from gemmakit.train.objectives import token_logps

    tok = Tokenizer.load(NANO)
    ref = load_model(NANO, dtype=torch.float32).set_attn_impl("sdpa")
    pol = (
        merge_lora(load_adapter(load_model(NANO, dtype=torch.float32), policy_dir))
        if lora
        else load_model(policy_dir, dtype=torch.float32)
    )
    pol.set_attn_impl("sdpa")
    values = []
    for r, a in zip(rows, answers, strict=True):
        p = render(tok, r["messages"]).tokens
        c = tok.encode(a, bos=False) + [tok.end_of_turn_id]
        t = torch.tensor([p + c])
        lp, lr = token_logps(pol, t)[0][0, len(p) - 1 :], token_logps(ref, t)[0][0, len(p) - 1 :]
        values.append(float((lp - lr).mean()))
    return {"value": _mean(values), "se": _se(values), "n": len(values)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="runs/alignment", help="work directory (data, runs; reruns resume)")
    ap.add_argument("--smoke", action="store_true", help="a few steps per stage on small data (CI)")
    ap.add_argument(
        "--md",
        default=None,
        help="write the Markdown table here (default: benchmarks/alignment.md, not with --smoke)",
    )
    ap.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's choice)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    from gemmakit.data import synth
    from gemmakit.eval.judge import RewardModelJudge
    from gemmakit.tokenizer import Tokenizer
    from gemmakit.train.reward import RewardModel, load_reward_model

    i = 1 if args.smoke else 0
    out = Path(args.out)
    t0 = time.perf_counter()
    data = out / "data"
    pairs = _write_jsonl(data / "pairs-train.jsonl", synth.preference_pairs(SIZES["pairs"][i], 0))
    held_pairs = _write_jsonl(data / "pairs-heldout.jsonl", synth.preference_pairs(SIZES["held_pairs"][i], 1))
    prompts = _write_jsonl(data / "prompts-train.jsonl", synth.prompt_set(SIZES["prompts"][i], 0))
    held = synth.prompt_set(SIZES["held_prompts"][i], 1)
    steps = {k: v[i] for k, v in STEPS.items()}
    base = [f"model.init_from={NANO}"]
    timings: dict[str, float] = {}
    results: dict = {"stages": {}}

    t = time.perf_counter()
    sft_answers = _answers(NANO, held)
    results["sft"] = _task_numbers(held, sft_answers)
    timings["sft_eval"] = time.perf_counter() - t

    t = time.perf_counter()
    tok = Tokenizer.load(NANO)
    from gemmakit.checkpoint import load_model

    fresh = RewardModel(load_model(NANO, dtype=torch.float32), pad_id=tok.pad_id, seed=0)
    rm_before = _rm_accuracy(fresh, held_pairs)
    rm_dir = _train(
        "reward-nano.toml", out / "reward", [*base, f"data.path={pairs}", f"loop.steps={steps['reward']}"]
    )
    rm = load_reward_model(rm_dir, pad_id=tok.pad_id)
    rm.model.set_attn_impl("sdpa")
    results["stages"]["reward"] = {
        "accuracy_before": rm_before,
        "accuracy_after": _rm_accuracy(rm, held_pairs),
    }
    judge = RewardModelJudge(rm, tok, name="the trained nano reward model")
    timings["reward"] = time.perf_counter() - t

    t = time.perf_counter()
    dpo_dir = _train(
        "dpo-nano.toml", out / "dpo", [*base, f"data.path={pairs}", f"loop.steps={steps['dpo']}"]
    )
    dpo_answers = _answers(dpo_dir, held)
    results["stages"]["dpo"] = {**_task_numbers(held, dpo_answers),
                                "win_rate_judge": _judge_win_rate(judge, held, dpo_answers, sft_answers),
                                "win_rate_exact": _exact_win_rate(held, dpo_answers, sft_answers)}  # fmt: skip
    timings["dpo"] = time.perf_counter() - t

    t = time.perf_counter()
    sft_reward = [s for s in _per_row(held, sft_answers) if s is not None]

    def rl_stage(name: str, extra: list[str]) -> dict:
        d = _train(
            "rl-nano.toml", out / name, [*base, f"data.path={prompts}", f"loop.steps={steps['rl']}", *extra]
        )
        answers = _answers(d, held, lora=True)
        reward = [s for s in _per_row(held, answers) if s is not None]
        return {**_task_numbers(held, answers), "settings": extra,
                "reward_before": {"value": _mean(sft_reward), "se": _se(sft_reward), "n": len(sft_reward)},
                "reward_after": {"value": _mean(reward), "se": _se(reward), "n": len(reward)},
                "kl_per_token": _kl_per_token(d, held, answers, lora=True),
                "win_rate_judge": _judge_win_rate(judge, held, answers, sft_answers),
                "win_rate_exact": _exact_win_rate(held, answers, sft_answers)}  # fmt: skip

    # The KL coefficient is tuned by the judge over runs on the verifiable reward alone; a run that also
    # sums the reward model shows what optimising a learned reward does (reported, not chosen from).
    runs = {beta: rl_stage(f"rl-beta{beta}", [f"rl.beta={beta}"]) for beta in (0.02, 0.1)}
    best = max(runs, key=lambda b: runs[b]["win_rate_judge"]["value"])
    results["stages"]["rl"] = {**runs[best], "beta": best,
                               "judge_by_beta": {str(b): v["win_rate_judge"] for b, v in runs.items()}}  # fmt: skip
    rm_run = rl_stage(
        "rl-rm-beta0.02", ["rl.beta=0.02", f"rl.reward_model={rm_dir}", "rl.reward_model_weight=0.5"]
    )
    results["stages"]["rl_with_rm"] = {**rm_run, "beta": 0.02}
    timings["rl"] = time.perf_counter() - t
    timings["total"] = time.perf_counter() - t0

    from machine_info import machine

    results.update(timings_s=timings, machine=machine(), steps=steps, sizes={k: v[i] for k, v in SIZES.items()},
                   python=platform.python_version(), torch=torch.__version__)  # fmt: skip
    (out / "results.json").write_text(json.dumps(results, indent=2))
    md = to_markdown(results)
    print(md)
    target = Path(args.md) if args.md else (None if args.smoke else HERE / "alignment.md")
    if target is not None:
        target.write_text(md)
    return 0


def _fmt(x: dict, pct: bool = True) -> str:
    s = 100 if pct else 1
    return f"{s * x['value']:.1f} ± {s * x['se']:.1f}" if pct else f"{x['value']:.4f} ± {x['se']:.4f}"


def _verdict(before: dict, after: dict, up: bool) -> str:
    delta = after["value"] - before["value"]
    se = math.sqrt(before["se"] ** 2 + after["se"] ** 2)
    good = delta > se if up else -delta > se
    return "yes" if good else "no"


def _vs_half(x: dict) -> str:
    return "yes" if x["value"] - 0.5 > x["se"] else "no"


def to_markdown(r: dict) -> str:
    sft, st = r["sft"], r["stages"]
    rm, dpo, rl, rlrm = st["reward"], st["dpo"], st["rl"], st["rl_with_rm"]
    m, t = r["machine"], r["timings_s"]
    rl_name, rm_name = (
        f"RL, verifiable reward (β={rl['beta']})",
        f"RL, verifiable + reward model (β={rlrm['beta']})",
    )
    lines = [
        "# Alignment on the nano model: measured",
        "",
        f"`python benchmarks/alignment.py` on {m.get('cpu', 'this machine')} ({m.get('cpus', '?')} cores, "
        f"ISA {m.get('isa_level', '?')}), {t['total'] / 60:.1f} min in all (reward model {t['reward'] / 60:.1f}, "
        f"DPO {t['dpo'] / 60:.1f}, three RL runs {t['rl'] / 60:.1f}). Steps: {r['steps']}. Data: {r['sizes']}.",
        "Training data from seed 0, held-out prompts and pairs from seed 1 (other names, numbers, words, templates,",
        "harmful and benign acts, assistants). Values: percent ± one standard error over held-out prompts (pairs for",
        'the reward model). "Moved?": the change exceeds the combined standard error in the right direction.',
        "",
        "| stage | metric | SFT (shipped nano) | after | moved? |",
        "|---|---|---|---|---|",
        f"| reward model | pairwise accuracy, held-out pairs | {_fmt(rm['accuracy_before'])} (fresh head) | "
        f"{_fmt(rm['accuracy_after'])} | {_verdict(rm['accuracy_before'], rm['accuracy_after'], True)} |",
    ]
    for name, s in (("DPO", dpo), (rl_name, rl), (rm_name, rlrm)):
        lines += [
            f"| {name} | task accuracy (exact checks) | {_fmt(sft['task_accuracy'])} | {_fmt(s['task_accuracy'])} | "
            f"{_verdict(sft['task_accuracy'], s['task_accuracy'], True)} |",
            f"| {name} | refuses harmful requests | {_fmt(sft['harmful_refusal'])} | {_fmt(s['harmful_refusal'])} | "
            f"{_verdict(sft['harmful_refusal'], s['harmful_refusal'], True)} |",
            f"| {name} | over-refusal on benign prompts | {_fmt(sft['over_refusal'])} | {_fmt(s['over_refusal'])} | "
            f"{_verdict(sft['over_refusal'], s['over_refusal'], False)} |",
            f"| {name} | win rate vs SFT, reward-model judge | 50 | {_fmt(s['win_rate_judge'])} | "
            f"{_vs_half(s['win_rate_judge'])} |",
            f"| {name} | win rate vs SFT, exact checks (ties half) | 50 | {_fmt(s['win_rate_exact'])} | "
            f"{_vs_half(s['win_rate_exact'])} |",
        ]
        if "reward_after" in s:
            lines += [
                f"| {name} | mean verifiable reward, held-out prompts | {_fmt(s['reward_before'], False)} | "
                f"{_fmt(s['reward_after'], False)} | {_verdict(s['reward_before'], s['reward_after'], True)} |",
                f"| {name} | KL to SFT per token (its own greedy answers) | 0 | {_fmt(s['kl_per_token'], False)} | — |",
            ]
    lines += [
        "",
        "Per kind (task accuracy %):",
        "",
        "| kind | SFT | DPO | RL, verifiable | RL, verifiable + RM |",
        "|---|---|---|---|---|",
    ]
    for kind, v in sft["per_kind"].items():
        lines.append(f"| {kind} | {_fmt(v)} | {_fmt(dpo['per_kind'][kind])} | {_fmt(rl['per_kind'][kind])} | "
                     f"{_fmt(rlrm['per_kind'][kind])} |")  # fmt: skip
    lines += ["", "RL KL coefficient chosen by the reward-model judge (win rate vs SFT, verifiable-reward runs): "
              + ", ".join(f"β={b}: {_fmt(v)}" for b, v in rl["judge_by_beta"].items()), "",
              "What these numbers say, and what they do not: README.md, section \"Alignment: measured on nano\".", ""]  # fmt: skip
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
