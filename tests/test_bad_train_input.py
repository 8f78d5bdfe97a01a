"""Bad input to `gemmakit train` (issue 17): tampered checkpoints on --resume, a non-finite halt, and
recipe values that cannot run. Each is driven through the real CLI in a subprocess and must end as
one `gemmakit: error:` line with exit status 2, naming the file / key / value, with no traceback and
the run directory left as it was.

The checkpoint cases rehash the manifest after tampering: that is what a hostile or careless edit
does, and it is the case the sha256 check alone cannot catch, so the restore layer must validate
every piece it loads."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from test_bad_output_paths import cli_on_tmpfs, needs_unshare
from test_errors import _one_line, _toml
from test_train_cli import _cli
from train_helpers import WORDS, chat_setup, sft_recipe

from gemmakit.artifact import sha256_file
from gemmakit.data.shards import tokenize_to_shards
from gemmakit.tokenizer import Tokenizer
from gemmakit.train import recipe_from_dict
from gemmakit.train.recipe import RecipeError

STEPS = 4  # the base run saves at steps 2 and 4; resumes use the same recipe, so recipe.json is unchanged


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """One finished tiny SFT run (checkpoints step-2 and step-4) that each test copies and tampers with,
    plus its recipe, data and tokenizer; trained once per module to keep the file fast."""
    root = tmp_path_factory.mktemp("bad_train")
    data, tok = chat_setup(root)
    recipe = root / "sft.toml"
    recipe.write_text(_toml(sft_recipe(data, tok, loop={"steps": STEPS, "save_every": 2})))
    proc = _cli("train", "--recipe", str(recipe), "--out", str(root / "run"), "--threads", "2")
    assert proc.returncode == 0, proc.stderr
    return {"root": root, "recipe": recipe, "run": root / "run", "tok": tok}


def _copy_run(base: dict[str, Path], tmp_path: Path, *, keep_older: bool = False) -> Path:
    """A private copy of the base run; without `keep_older` only step-4 remains, so nothing to fall back to."""
    run = tmp_path / "run"
    shutil.copytree(base["run"], run)
    if not keep_older:
        shutil.rmtree(run / "checkpoints" / "step-000002")
    return run


def _rehash(step_dir: Path) -> None:
    """Recompute every file's sha256 and size in the checkpoint manifest, as a tamperer would."""
    manifest = step_dir / "manifest.json"
    data = json.loads(manifest.read_text())
    for name in data["files"]:
        f = step_dir / name
        data["files"][name] = {"sha256": sha256_file(f), "size": f.stat().st_size}
    manifest.write_text(json.dumps(data, indent=1))


def _snapshot(run: Path) -> dict[str, str]:
    """sha256 of every file under `run`: a failed resume must not change one."""
    return {str(p.relative_to(run)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(run.rglob("*")) if p.is_file()}  # fmt: skip


def _resume(base: dict[str, Path], run: Path) -> object:
    return _cli("train", "--recipe", str(base["recipe"]), "--out", str(run), "--resume", "--threads", "2")


class _Evil:
    """Unpickling this runs a shell command; torch.load(weights_only=True) must refuse it."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _plant_evil(path: Path, marker: Path) -> None:
    torch.save({"rng": _Evil(marker), "step": STEPS}, path)


# ---- row 17: a malicious pickle in a rehashed checkpoint ------------------------------------------------


@pytest.mark.parametrize("name", ["rank-0.pt", "optimizer.pt"])
def test_malicious_pickle_with_no_older_checkpoint_is_one_line(base, tmp_path: Path, name: str) -> None:
    run = _copy_run(base, tmp_path)
    step = run / "checkpoints" / "step-000004"
    marker = tmp_path / "PWNED"
    _plant_evil(step / name, marker)
    _rehash(step)
    before = _snapshot(run)
    proc = _resume(base, run)
    _one_line(proc, f"step-000004/{name}", "weights_only", "no usable checkpoint")
    assert not marker.exists()  # the payload never ran
    assert _snapshot(run) == before


def test_malicious_pickle_falls_back_to_the_older_checkpoint(base, tmp_path: Path) -> None:
    """The newest checkpoint is unusable but step-2 is good: resume from it, warning about the skip."""
    run = _copy_run(base, tmp_path, keep_older=True)
    step = run / "checkpoints" / "step-000004"
    marker = tmp_path / "PWNED"
    _plant_evil(step / "rank-0.pt", marker)
    _rehash(step)
    proc = _resume(base, run)
    assert proc.returncode == 0, proc.stderr
    assert "skipping checkpoint" in proc.stderr and "step-000004/rank-0.pt" in proc.stderr
    assert "Traceback" not in proc.stderr and not marker.exists()
    records = [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3, 4]  # steps 3 and 4 were run again from step-2
    assert "step      3/4" in proc.stdout
    torch.load(step / "rank-0.pt", weights_only=True)  # step-4 was rewritten by the resumed run


# ---- rows 18 and 19: rehashed pieces that load but do not fit ---------------------------------------------


def _empty(path: Path) -> None:
    torch.save({}, path)


def _rng_wrong_shape(path: Path) -> None:
    state = torch.load(path, weights_only=True)
    state["rng"]["torch"] = state["rng"]["torch"][:10]
    torch.save(state, path)


def _drop_tensor(path: Path) -> None:
    tensors = load_file(str(path))
    tensors.pop("model.final_norm.weight")
    save_file(tensors, str(path))


def _reshape_tensor(path: Path) -> None:
    tensors = load_file(str(path))
    tensors["model.final_norm.weight"] = tensors["model.final_norm.weight"][:3].clone()
    save_file(tensors, str(path))


def _drop_optimizer_param(path: Path) -> None:
    state = torch.load(path, weights_only=True)
    state["state"].pop("model.final_norm.weight")
    torch.save(state, path)


@pytest.mark.parametrize(
    ("name", "tamper", "needles"),
    [
        ("rank-0.pt", _empty, ["rank-0.pt", "'rng'"]),
        ("rank-0.pt", _rng_wrong_shape, ["rank-0.pt", "'rng'"]),
        (
            "trainable.safetensors",
            _drop_tensor,
            ["trainable.safetensors", "missing key", "final_norm.weight"],
        ),
        ("trainable.safetensors", _reshape_tensor, ["trainable.safetensors", "final_norm.weight", "shape"]),
        ("optimizer.pt", _empty, ["optimizer.pt", "missing key", "param_groups"]),
        ("optimizer.pt", _drop_optimizer_param, ["optimizer.pt", "missing key", "final_norm.weight"]),
    ],
    ids=["rank-empty", "rng-shape", "tensor-missing", "tensor-shape", "optim-empty", "optim-param-missing"],
)
def test_rehashed_checkpoint_that_does_not_fit_is_one_line(
    base, tmp_path: Path, name, tamper, needles
) -> None:
    run = _copy_run(base, tmp_path)
    step = run / "checkpoints" / "step-000004"
    tamper(step / name)
    _rehash(step)
    before = _snapshot(run)
    _one_line(_resume(base, run), *needles)
    assert _snapshot(run) == before


# ---- row 21: the halt names the step the metrics log would --------------------------------------------


def test_non_finite_halt_uses_the_metrics_step_numbering(base, tmp_path: Path) -> None:
    """The halt used to name the 0-based step index, one less than metrics.jsonl and the progress line."""
    run = tmp_path / "run"
    # lr 1e30 overflows the weights after one update, so step 2 is the first non-finite one, fast
    proc = _cli("train", "--recipe", str(base["recipe"]), "--out", str(run), "--threads", "2",
                "--set", "optim.lr=1e30", "--set", "optim.grad_clip=0", "--set", "loop.save_every=1")  # fmt: skip
    _one_line(proc, "not finite", "halted before the optimizer step")
    halted = int(proc.stderr.split("error: step ")[1].split(":")[0])
    records = [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines()]
    # every step before the halt was logged (log_every 1) under the same numbers; the halted one was not
    assert halted >= 2 and [r["step"] for r in records] == list(range(1, halted))
    assert f"step {halted - 1:>6}/{STEPS}" in proc.stdout.splitlines()[-1]
    assert f"step-{halted - 1:06d}" in proc.stderr  # the last good checkpoint, numbered alike


# ---- row 20: recipe values and paths that cannot run ------------------------------------------------------


@pytest.fixture(scope="module")
def shard_recipe(base: dict[str, Path]) -> Path:
    """A pretraining recipe over a token shard directory."""
    root = base["root"]
    corpus = root / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"text": " ".join(WORDS)}) + "\n" for _ in range(8)))
    shards = tokenize_to_shards([corpus], Tokenizer.load(base["tok"]), root / "shards")
    recipe = root / "pre.toml"
    recipe.write_text(
        f'method = "pretrain"\n[model]\npreset = "tiny"\n[model.overrides]\nvocab_size = 640\n[data]\n'
        f'path = "{shards}"\ntokenizer = "{base["tok"]}"\nseq_len = 16\nbatch_size = 2\n'
        '[loop]\nsteps = 2\ndevice = "cpu"\n'
    )
    return recipe


@pytest.mark.parametrize(
    ("override", "needles"),
    [
        ("loop.device=cuda", ["loop.device", "cuda"]),
        ("lora.r=0", ["lora.r", ">= 1"]),
        ("loop.save_every=-1", ["loop.save_every", "-1"]),
        ("data.seq_len=100000", ["data.seq_len", "100000", "max position", "needs at least", "available"]),
        # fits the model's positions, but no machine holds the activations: refused before allocating
        ("data.batch_size=100000000", ["data.batch_size 100000000", "needs", "available"]),
    ],
)
def test_bad_recipe_values_are_one_line(base, tmp_path: Path, override: str, needles: list[str]) -> None:
    if override == "loop.device=cuda" and torch.cuda.is_available():
        pytest.skip("CUDA is available here, so loop.device = cuda is valid")
    run = tmp_path / "run"
    _one_line(_cli("train", "--recipe", str(base["recipe"]), "--out", str(run), "--set", override), *needles)
    assert not run.exists()  # refused before the run directory was created


@pytest.mark.parametrize(
    ("section", "values", "key"),
    [
        ("loop", {"log_every": 0}, "loop.log_every"),  # would divide by zero at the first step
        ("loop", {"eval_every": -1}, "loop.eval_every"),
        ("loop", {"eval_batches": 0}, "loop.eval_batches"),
        ("lora", {"dropout": 1.0}, "lora.dropout"),
    ],
)
def test_more_bad_recipe_values_are_refused_when_read(section: str, values: dict, key: str) -> None:
    """The same checks as above, in-process: each CLI start costs seconds of torch import, and these
    are refused while the recipe is read (the paths are never opened)."""
    raw = sft_recipe(Path("chat.jsonl"), Path("tokenizer.model"), **{section: values})
    with pytest.raises(RecipeError, match=key.replace(".", r"\.")):
        recipe_from_dict(raw)


def test_sft_on_a_shard_directory_is_one_line(shard_recipe: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    proc = _cli("train", "--recipe", str(shard_recipe), "--out", str(run), "--set", "method=sft")
    _one_line(proc, "data.path", "is a directory", "pretrain", "chat JSONL")
    assert not run.exists()


def test_recipe_directory_and_out_file_are_one_line(base, tmp_path: Path) -> None:
    _one_line(_cli("train", "--recipe", str(tmp_path), "--out", str(tmp_path / "run")), str(tmp_path),
              "is a directory")  # fmt: skip
    out = tmp_path / "out.txt"
    out.write_text("not a run directory\n")
    _one_line(_cli("train", "--recipe", str(base["recipe"]), "--out", str(out)), f"--out {out}",
              "not a directory")  # fmt: skip
    assert out.read_text() == "not a run directory\n"


@needs_unshare
@pytest.mark.parametrize("read_only, reason", [(True, "read-only file system"), (False, "no space left")])
def test_train_into_read_only_or_full_filesystem(base, tmp_path, read_only, reason):
    """Rows 11 and 12 for train: the run directory sits on a read-only or a 64 KiB tmpfs."""
    out = tmp_path / "mnt" / "run"
    args = ["train", "--recipe", str(base["recipe"]), "--out", str(out), "--threads", "2"]
    proc, left = cli_on_tmpfs(tmp_path / "mnt", args, read_only=read_only)
    _one_line(proc, str(out))
    assert reason in proc.stderr.lower(), proc.stderr
    if read_only:
        assert left == []
