"""Alignment methods through `gemmakit train` and `gemmakit reward score` on the tiny preset: a reward
model, DPO (full and LoRA) and RL (RLOO, LoRA) learn, change the right parameters, resume after SIGKILL
step for step, and bad preference data, a reward model with another vocabulary and a reference of
another architecture are one-line errors."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from eval_helpers import intra_op_threads
from test_cli import assert_user_error
from test_train import _KILL_SCRIPT
from train_helpers import chat_setup, sft_recipe, write_pair_data, write_prompt_data

import gemmakit
from gemmakit.train import checkpoints as ckpt
from gemmakit.train import recipe_from_dict, run
from gemmakit.train.reward import load_reward_model

TESTS = Path(__file__).resolve().parent


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One intra-op thread: the kill/resume tests compare processes bit for bit (eval_helpers says why)."""
    with intra_op_threads(1):
        yield


@pytest.fixture(scope="module")
def sft(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A tiny SFT model on the reverse task (the policy / reward-model start), its data and tokenizer."""
    tmp = tmp_path_factory.mktemp("align")
    chat, tok = chat_setup(tmp)
    run(recipe_from_dict(sft_recipe(chat, tok, loop={"steps": 40})), tmp / "sft")
    return {"dir": tmp, "tok": tok, "model": tmp / "sft" / "final", "pairs": write_pair_data(tmp / "pairs.jsonl"),
            "prompts": write_prompt_data(tmp / "prompts.jsonl")}  # fmt: skip


def _recipe(sft: dict[str, Path], method: str, **sections: dict) -> dict:
    raw = sft_recipe(sft["pairs"], sft["tok"], loop={"steps": 12}, optim={"lr": 1e-3})
    raw.update(method=method, model={"init_from": str(sft["model"])})
    if method == "rl":
        raw["data"]["path"] = str(sft["prompts"])
        raw["rl"] = {"reward_fn": "align_rewards:reverse_words", "k": 4, "max_new_tokens": 8, "beta": 0.02}
    for name, values in sections.items():
        raw[name] = {**raw.get(name, {}), **values}
    return raw


def _toml(raw: dict, path: Path) -> Path:
    def value(v: object) -> str:
        return json.dumps(v) if not isinstance(v, bool) else str(v).lower()

    lines = [f"method = {value(raw['method'])}"]
    for section, table in raw.items():
        if section == "method":
            continue
        lines.append(f"[{section}]")
        for k, v in table.items():
            if isinstance(v, dict):
                lines.append(f"{k} = {{ {', '.join(f'{a} = {value(b)}' for a, b in v.items())} }}")
            else:
                lines.append(f"{k} = {value(v)}")
    path.write_text("\n".join(lines) + "\n")
    return path


def _cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run([sys.executable, "-m", "gemmakit.cli", *args], capture_output=True, text=True,
                          timeout=600, env=env)  # fmt: skip


def _records(run_dir: Path) -> list[dict]:
    return [json.loads(ln) for ln in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _mean(xs: list[float]) -> float:
    return sum(xs) / len(xs)


def test_reward_model_learns_saves_for_transformers_and_scores_pairs(
    sft: dict[str, Path], tmp_path: Path
) -> None:
    recipe = _toml(_recipe(sft, "reward", loop={"steps": 16}), tmp_path / "reward.toml")
    proc = _cli("train", "--recipe", str(recipe), "--out", str(tmp_path / "rm"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    recs = _records(tmp_path / "rm")
    assert {"accuracy", "margin", "reward_chosen", "reward_rejected", "pairs"} <= set(recs[0])
    losses = [r["loss"] for r in recs]
    assert _mean(losses[-4:]) < 0.7 * _mean(losses[:4]), losses  # measured: 0.69 -> 0.2
    rm = load_reward_model(tmp_path / "rm" / "final")
    start = gemmakit.load(sft["model"], dtype=torch.float32).state_dict()
    unchanged = [k for k, v in rm.model.state_dict().items() if torch.equal(v, start[k])]
    assert not unchanged  # the whole body trains, not only the head

    proc = _cli("reward", "score", "--model", str(tmp_path / "rm" / "final"), "--data", str(sft["pairs"]),
                "--out", str(tmp_path / "scores.jsonl"))  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    rows = [json.loads(ln) for ln in (tmp_path / "scores.jsonl").read_text().splitlines()]
    acc = _mean([float(r["chosen"] > r["rejected"]) for r in rows])
    assert f"accuracy {acc:.4f}" in proc.stdout and acc > 0.8, proc.stdout  # training pairs

    # transformers builds Gemma3TextForSequenceClassification from the directory, with the same scores
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path / "rm" / "final",
                                                                         torch_dtype=torch.float32)  # fmt: skip
    assert type(hf).__name__ == "Gemma3TextForSequenceClassification"
    tokens = torch.tensor([[2, 105, 40, 50, 60, 106, 0, 0], [2, 105, 41, 51, 61, 71, 81, 106]])
    with torch.no_grad():
        ours, theirs = rm(tokens), hf(input_ids=tokens, attention_mask=(tokens != 0).long()).logits[:, 0]
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-5)  # same op sequence up to sdpa vs eager


def test_dpo_starts_at_ln2_learns_and_lora_trains_only_adapters(sft: dict[str, Path], tmp_path: Path) -> None:
    raw = _recipe(sft, "dpo", lora={"enabled": True, "r": 4, "alpha": 8.0}, optim={"lr": 5e-3})
    proc = _cli("train", "--recipe", str(_toml(raw, tmp_path / "dpo.toml")), "--out", str(tmp_path / "dpo"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    recs = _records(tmp_path / "dpo")
    # policy = reference at step 1: ln 2 up to float32 rounding, since the cached reference log-probs were
    # computed in other batches (a row's log-probs shift by ~1e-6 with its batch's padded width on CPU)
    assert recs[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert abs(recs[0]["rewards/chosen"]) < 1e-5 and abs(recs[0]["rewards/margin"]) < 1e-5
    losses = [r["loss"] for r in recs]
    assert _mean(losses[-4:]) < _mean(losses[:4]), losses
    assert recs[-1]["rewards/margin"] > 0
    trained = ckpt.read_tensors(tmp_path / "dpo" / "checkpoints" / "step-000012" / "trainable.safetensors")
    assert trained and all(".lora_A" in k or ".lora_B" in k for k in trained)
    assert all(v.abs().sum() > 0 for k, v in trained.items() if ".lora_B" in k)
    assert (tmp_path / "dpo" / "reference" / "train_logps.safetensors").is_file()
    assert {"adapter_config.json", "adapter_model.safetensors"} <= {
        p.name for p in (tmp_path / "dpo" / "final").iterdir()
    }


def test_full_dpo_changes_every_parameter(sft: dict[str, Path], tmp_path: Path) -> None:
    result = run(recipe_from_dict(_recipe(sft, "dpo", loop={"steps": 6})), tmp_path / "dpo")
    assert result.losses[0] == pytest.approx(math.log(2), abs=1e-6)
    final = gemmakit.load(tmp_path / "dpo" / "final", dtype=torch.float32).state_dict()
    start = gemmakit.load(sft["model"], dtype=torch.float32).state_dict()
    assert not [k for k, v in final.items() if torch.equal(v, start[k])]


def test_rl_with_lora_raises_the_reward(sft: dict[str, Path], tmp_path: Path) -> None:
    """RLOO's loss is -mean(A) = 0 at one iteration by construction, so what must rise is the reward."""
    raw = _recipe(sft, "rl", loop={"steps": 16}, optim={"lr": 2e-2}, lora={"enabled": True, "r": 4, "alpha": 8.0},
                  rl={"reward_fn": "align_rewards:short"})  # fmt: skip
    proc = _cli("train", "--recipe", str(_toml(raw, tmp_path / "rl.toml")), "--out", str(tmp_path / "rl"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert " reward " in proc.stdout and " kl " in proc.stdout  # the progress line shows them
    recs = _records(tmp_path / "rl")
    losses = [r["loss"] for r in recs]
    assert {"reward", "kl", "entropy", "completion_length", "clip_fraction", "sequences"} <= set(recs[0])
    rewards, lengths = [r["reward"] for r in recs], [r["completion_length"] for r in recs]
    # measured (seeded): reward 0.72 over the first 3 steps -> 0.81 over the last 8, length 5.3 -> 4.1
    assert _mean(rewards[-8:]) > _mean(rewards[:3]) + 0.04, rewards
    assert _mean(lengths[-8:]) < _mean(lengths[:3]), lengths
    assert all(abs(x) < 1e-5 for x in losses)
    trained = ckpt.read_tensors(tmp_path / "rl" / "checkpoints" / "step-000016" / "trainable.safetensors")
    assert trained and all(".lora_A" in k or ".lora_B" in k for k in trained)
    assert all(v.abs().sum() > 0 for k, v in trained.items() if ".lora_B" in k)


@pytest.mark.parametrize("method", ["reward", "dpo", "rl"])
def test_resume_after_sigkill_equals_the_uninterrupted_run(sft: dict[str, Path], tmp_path: Path,
                                                           method: str) -> None:  # fmt: skip
    raw = _recipe(sft, method, loop={"steps": 6, "save_every": 2})
    if method == "rl":
        raw["rl"]["iterations"] = 2  # replayed rollouts: the checkpoint falls on a period boundary
    sys.path.insert(0, str(TESTS))
    reference = _records_of(run(recipe_from_dict(raw), tmp_path / "a"), tmp_path / "a")
    env = {**os.environ, "PYTHONPATH": str(TESTS)}
    proc = subprocess.run([sys.executable, "-c", _KILL_SCRIPT, json.dumps(raw), str(tmp_path / "b"), "4"],
                          capture_output=True, text=True, timeout=600, env=env)  # fmt: skip
    assert proc.returncode == -9, proc.stderr[-2000:]
    found = ckpt.latest(tmp_path / "b")
    assert found is not None and found.step == 4
    run(recipe_from_dict(raw), tmp_path / "b", resume=True)
    resumed = _records(tmp_path / "b")
    skip = {"tokens_per_s", "step_s"}
    assert [{k: v for k, v in r.items() if k not in skip} for r in resumed] == reference


def _records_of(result: object, run_dir: Path) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in ("tokens_per_s", "step_s")} for r in _records(run_dir)]


def test_bad_alignment_inputs_are_one_line_errors(sft: dict[str, Path], tmp_path: Path) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text(
        '{"prompt": "hi", "chosen": "yes", "rejected": "no"}\n{"prompt": "hi", "chosen": 3, "rejected": "no"}\n'
    )
    raw = _recipe(sft, "dpo")
    raw["data"]["path"] = str(bad)
    proc = _cli("train", "--recipe", str(_toml(raw, tmp_path / "a.toml")), "--out", str(tmp_path / "a"))
    assert_user_error(proc, f"{bad}:2", "chosen")
    assert not (tmp_path / "a" / "checkpoints").exists()

    # a reward model over another vocabulary cannot score the policy's ids
    chat, other_tok = chat_setup(tmp_path / "other")
    other = sft_recipe(sft["pairs"], sft["tok"], loop={"steps": 1}, model={"overrides": {"vocab_size": 700}})
    other["method"] = "reward"
    run(recipe_from_dict(other), tmp_path / "rm700")
    raw = _recipe(sft, "rl")
    raw["rl"]["reward_model"] = str(tmp_path / "rm700" / "final")
    proc = _cli("train", "--recipe", str(_toml(raw, tmp_path / "b.toml")), "--out", str(tmp_path / "b"))
    assert_user_error(proc, "rl.reward_model", "vocabulary of 700", "640")

    # a reference with another architecture
    wide = sft_recipe(
        chat, sft["tok"], loop={"steps": 1}, model={"overrides": {"vocab_size": 640, "n_layers": 1}}
    )
    run(recipe_from_dict(wide), tmp_path / "ref1")
    raw = _recipe(sft, "dpo", reference={"path": str(tmp_path / "ref1" / "final")})
    proc = _cli("train", "--recipe", str(_toml(raw, tmp_path / "c.toml")), "--out", str(tmp_path / "c"))
    assert_user_error(proc, "reference.path", "architecture differs", "n_layers")

    # a causal LM where a reward model is expected
    proc = _cli("reward", "score", "--model", str(sft["model"]), "--data", str(sft["pairs"]), "--out",
                str(tmp_path / "s.jsonl"))  # fmt: skip
    assert_user_error(proc, "score.weight")


def test_judge_compares_answer_files_with_a_reward_model_and_a_chat_model(
    sft: dict[str, Path], tmp_path: Path
) -> None:
    """`gemmakit eval --judge`: a reward model trained to prefer reversed words prefers them over
    shuffled ones on training prompts; a generative judge runs both orders and reports agreement."""
    raw = _recipe(sft, "reward", loop={"steps": 16})
    run(recipe_from_dict(raw), tmp_path / "rm")
    rows = [json.loads(ln) for ln in sft["pairs"].read_text().splitlines()]
    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    text = lambda x: x if isinstance(x, str) else x[0]["content"]  # noqa: E731
    a.write_text(
        "".join(json.dumps({"prompt": r["prompt"], "answer": text(r["chosen"])}) + "\n" for r in rows)
    )
    b.write_text(
        "".join(json.dumps({"prompt": r["prompt"], "answer": text(r["rejected"])}) + "\n" for r in rows)
    )
    proc = _cli("eval", "--judge", str(tmp_path / "rm" / "final"), "--compare", str(a), str(b), "--out",
                str(tmp_path / "j"))  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    result = json.loads((tmp_path / "j" / "judge.json").read_text())
    assert result["n"] == len(rows) and result["win_rate"] > 0.8 and result["position_consistency"] == 1.0
    assert result["wins"] + result["ties"] + result["losses"] == len(rows)
    assert f"win rate {100 * result['win_rate']:.1f}%" in proc.stdout
    # the same answers swapped: the complement, exactly (a reward model scores each answer alone)
    swapped = _cli("eval", "--judge", str(tmp_path / "rm" / "final"), "--compare", str(b), str(a), "--out",
                   str(tmp_path / "j2"))  # fmt: skip
    assert swapped.returncode == 0, swapped.stderr
    other = json.loads((tmp_path / "j2" / "judge.json").read_text())
    assert [round(p + q, 9) for p, q in zip(result["p"], other["p"], strict=True)] == [1.0] * len(rows)

    from gemmakit.eval.judge import compare, load_judge

    judge = load_judge(sft["model"])  # a chat model: asked "A or B" in both orders
    prompts = [[{"role": "user", "content": "reverse: a b"}]] * 3
    res = compare(judge, prompts, ["b a", "a b", "b a"], ["a b", "b a", "b a"])
    assert res.n == 3 and 0.0 <= res.position_consistency <= 1.0 and all(0 < p < 1 for p in res.p)
    assert abs(res.p[2] - 0.5) < 1e-6  # identical answers: the two orders cancel exactly

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "x", "answer": "y"}\n{"prompt": "x"}\n')
    assert_user_error(_cli("eval", "--judge", str(sft["model"]), "--compare", str(a), str(bad)), f"{bad}:2")


@pytest.mark.parametrize(("generation", "turn_end"), [("gemma3", 106), ("gemma1", 107)])
def test_rollouts_stop_at_the_turn_end_id_of_the_layout(
    tmp_path: Path, generation: str, turn_end: int
) -> None:
    """Rollouts end at <end_of_turn> (Gemma 3: 106, Gemma 1/2: 107) or <eos>, never at <eos> alone, and
    the stop token is part of the completion the loss trains on."""

    import dataclasses

    from spm_helpers import train_gemma_spm

    from gemmakit.config import get_preset
    from gemmakit.data.preference import PromptRow
    from gemmakit.model import Gemma
    from gemmakit.tokenizer import Tokenizer
    from gemmakit.train.rl import Rollouts

    tok = Tokenizer.load(train_gemma_spm(tmp_path, generation))
    model = Gemma(dataclasses.replace(get_preset("tiny"), vocab_size=640)).init_weights(0.02, seed=0)
    rows = [
        PromptRow(({"role": "user", "content": "hi"},), {}),
        PromptRow(({"role": "user", "content": "yo"},), {}),
    ]
    zero = lambda prompts, completions, **columns: [0.0] * len(completions)  # noqa: E731
    r = Rollouts(model, tok, rows, k=2, batch_size=2, max_new_tokens=4, reward_fn=zero)
    assert r.stops == sorted({turn_end, tok.eos_id}) and turn_end == tok.end_of_turn_id
    # every position's hidden state is the same direction e0 (blocks add nothing), and the turn-end row is
    # 5 x e0 against 1 x e0 for the others: its logit leads by 4 x sqrt(dim), p ~ 1 - 1e-12
    with torch.no_grad():
        for block in model.blocks:
            block.wo.weight.zero_()
            block.w_down.weight.zero_()
        model.embed.weight.zero_()
        model.embed.weight[:, 0] = 1.0
        model.embed.weight[turn_end, 0] = 5.0
        model.final_norm.weight.zero_()
    batch, metrics = r.rollout([0, 1], seed=0)
    assert metrics["completion_length"] == 1.0 and metrics["terminated"] == 1.0
    assert batch["completion_mask"].sum(1).tolist() == [1] * 4
    last = batch["completion_mask"].float().argmax(1)
    assert all(batch["tokens"][i, last[i]] == turn_end for i in range(4))


def test_clipped_ratio_sequence_and_token_level() -> None:
    """RLLoss against the formulas written out: per-sequence ratio exp(sum mask (logp - old)) clipped to
    [1 - eps, 1 + eps_high] (RLOO), and the per-token variant averaged over each completion (PPO-style);
    the clip statistics count exactly the rows (tokens) whose ratio left the range in the direction that
    the advantage's sign makes binding."""
    import dataclasses

    from gemmakit.config import get_preset
    from gemmakit.model import Gemma
    from gemmakit.train.objectives import token_logps
    from gemmakit.train.rl import RLLoss

    model = Gemma(dataclasses.replace(get_preset("tiny"), vocab_size=64)).init_weights(0.5, seed=1)
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(3, 64, (4, 9), generator=g)
    mask = torch.zeros(4, 9, dtype=torch.long)
    mask[:, 5:] = 1
    mask[3, 7:] = 0  # a shorter completion (right padding)
    adv = torch.tensor([1.0, -1.0, 0.5, -2.0])
    with torch.no_grad():
        logp, _ = token_logps(model, tokens, temperature=0.7)
    m = mask[:, 1:].float()
    shift = torch.tensor([0.3, 0.3, -0.3, -0.3])[:, None]  # per-token ratios e^±0.3, per-sequence e^±0.3n
    old = logp - shift * m
    for level in ("sequence", "token"):
        loss = RLLoss(model, epsilon=0.2, epsilon_high=0.1, level=level, temperature=0.7)
        total, stats = loss(tokens, mask, old, adv)
        if level == "sequence":
            ratio = torch.exp(((logp - old) * m).sum(1))
            want = -torch.min(ratio * adv, ratio.clamp(0.8, 1.1) * adv)
            low, high = ((ratio < 0.8) & (adv < 0)).float(), ((ratio > 1.1) & (adv > 0)).float()
        else:
            ratio = torch.exp(logp - old)
            a = adv[:, None]
            per = -torch.min(ratio * a, ratio.clamp(0.8, 1.1) * a)
            want = (per * m).sum(1) / m.sum(1)
            low = (((ratio < 0.8) & (a < 0)).float() * m).sum(1) / m.sum(1)
            high = (((ratio > 1.1) & (a > 0)).float() * m).sum(1) / m.sum(1)
        # RLLoss subtracts the two sums (as TRL does), the test sums the differences: ~3e-6 apart
        torch.testing.assert_close(total, want.sum(), rtol=2e-5, atol=1e-6)
        torch.testing.assert_close(stats["clip_low"], low.sum())
        torch.testing.assert_close(stats["clip_high"], high.sum())
        assert float(stats["clip_high"]) > 0  # rows 0 (ratio e^0.3 > 1.1, A > 0) clip
        assert float(stats["clip_low"]) > 0  # row 3 (ratio e^-0.3 < 0.8, A < 0) clips
