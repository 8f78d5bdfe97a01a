"""Issue 17's bad-input rows for the model commands, and fuzzing of config.json and CLI numbers.

Every case runs the real console script (or, for the fuzz loops, `cli.main` in-process, which is the
same code behind it) and must end in a clean result or exit status 2 with one stderr line naming the
value; never a traceback, never another exception, never an allocation larger than the machine.
"""

from __future__ import annotations

import contextlib
import io
import json
import pickle
import random
import shutil
from pathlib import Path

import pytest
from test_cli import assert_user_error, run

from gemmakit import cli
from gemmakit.checkpoint import load_model
from gemmakit.errors import UserError
from gemmakit.infer import Engine
from gemmakit.memory import available_bytes


def _config_copy(model_dir: Path, dest: Path, **changes: object) -> Path:
    """A copy of the tiny model, as a plain HF directory (no gemmakit manifest.json, so config.json is
    the config), with `changes` applied to config.json (None writes JSON null)."""
    shutil.copytree(model_dir, dest)
    (dest / "manifest.json").unlink()
    cfg = json.loads((dest / "config.json").read_text())
    cfg.update(changes)
    (dest / "config.json").write_text(json.dumps(cfg))
    return dest


@pytest.mark.parametrize(
    "args, needle",
    [
        (["--device", "banana"], "--device"),  # row 1
        (["--device", "cuda"], "--device"),  # row 1: this is the CPU build of torch
        (["--temperature", "1", "--seed", "999999999999999999999999"], "--seed"),  # row 2
        (["--seed", "-1"], "--seed"),
        (["--max-new-tokens", "0"], "--max-new-tokens"),  # row 3
        (["--max-new-tokens", "-1"], "--max-new-tokens"),
        (["--temperature", "nan"], "--temperature"),
        (["--top-k", "0"], "--top-k"),
        (["--threads", "0"], "--threads"),
        (["--prefill-chunk", "-4"], "--prefill-chunk"),
    ],
)
def test_generate_numbers_and_devices(model_dir, args, needle):
    assert_user_error(run("generate", "--model", str(model_dir), "--prompt", "hi", *args), needle, args[-1])


def test_chat_max_new_tokens_is_named(model_dir):  # row 3, chat
    for bad in ("0", "-1"):
        proc = run("chat", "--model", str(model_dir), "--max-new-tokens", bad, stdin="hello\n/exit\n")
        assert_user_error(proc, "--max-new-tokens", bad)


@pytest.mark.parametrize("context", ["-10", "0", "1.5"])
def test_info_context_must_be_positive(context):  # row 4
    assert_user_error(run("info", "--preset", "gemma-2b", "--context", context), "--context", context)


@pytest.mark.parametrize("mb", ["nan", "-1", "0", "inf"])
def test_convert_max_shard_mb(model_dir, tmp_path, mb):  # row 5
    out = tmp_path / "out"
    proc = run("convert", "--model", str(model_dir), "--to", "hf", "--out", str(out), "--max-shard-mb", mb)
    assert_user_error(proc, "--max-shard-mb", mb)
    assert not out.exists()


@pytest.mark.parametrize(
    "field, value",
    [
        ("rms_norm_eps", "tiny"),  # row 6
        ("vocab_size", None),
        ("num_hidden_layers", 2.5),  # row 7: used to load as 2
        ("hidden_size", "32"),
        ("num_hidden_layers", True),  # used to load as 1
        ("rope_parameters", "x"),
        ("max_position_embeddings", 1e15),  # row 8: a float, and past any context
        ("max_position_embeddings", -5),
        ("query_pre_attn_scalar", float("inf")),  # json.dumps writes Infinity; Python reads it back
        ("sliding_window", 0),
    ],
)
def test_config_field_types(model_dir, tmp_path, field, value):
    bad = _config_copy(model_dir, tmp_path / "m", **{field: value})
    assert_user_error(run("generate", "--model", str(bad), "--prompt", "hi", "--max-new-tokens", "2"), field)


def test_config_json_edited_beside_manifest(model_dir, tmp_path):
    edited = tmp_path / "m"
    shutil.copytree(model_dir, edited)
    cfg = json.loads((edited / "config.json").read_text())
    (edited / "config.json").write_text(json.dumps(dict(cfg, rms_norm_eps=1e-5)))
    assert_user_error(
        run("generate", "--model", str(edited), "--prompt", "hi"), "config.json", "norm_eps", "manifest.json"
    )


def test_kv_cache_is_bounded_by_memory(model_dir, tmp_path):  # row 8: a valid but huge context
    bad = _config_copy(model_dir, tmp_path / "m", max_position_embeddings=2**31 - 1)
    proc = run("generate", "--model", str(bad), "--prompt", "hi", "--max-new-tokens", "100000000")
    assert_user_error(proc, "KV cache", "needs", "available")


class _Evil:
    def __reduce__(self):
        return (print, ("pwned",))


def test_malicious_pickle_is_one_line(tmp_path):  # row 9: torch's protocol warning used to add lines
    (tmp_path / "evil.ckpt").write_bytes(pickle.dumps(_Evil(), protocol=4))
    proc = run("generate", "--model", str(tmp_path / "evil.ckpt"), "--preset", "tiny", "--prompt", "x")
    assert_user_error(proc, "evil.ckpt", "weights-only")
    assert "pwned" not in proc.stdout


def test_eval_report_of_missing_dir(tmp_path):  # row 22
    assert_user_error(run("eval", "--report", "/nonexistent"), "/nonexistent")
    (tmp_path / "results.json").write_text('{"tasks": 3}')
    assert_user_error(run("eval", "--report", str(tmp_path)), "results.json")


# -- fuzzing -------------------------------------------------------------------------------------

_NASTY = [None, True, False, "x", "32", 2.5, -1, 0, 10**15, 1e300, -1e300, [], {}, [1], {"a": 1}]
# keys the reader looks at beyond those the tiny model's config.json holds
_OPTIONAL_KEYS = ["head_dim", "num_key_value_heads", "sliding_window", "sliding_window_pattern",
                  "layer_types", "rope_parameters", "rope_scaling", "rope_theta", "rope_local_base_freq",
                  "query_pre_attn_scalar", "attn_logit_softcapping", "final_logit_softcapping",
                  "hidden_activation", "hidden_act", "tie_word_embeddings", "max_position_embeddings",
                  "text_config", "model_type"]  # fmt: skip


def test_config_json_fuzz(model_dir, tmp_path):
    """Type swaps, nulls, huge and negative numbers on every field: a clean load or a UserError."""
    work = _config_copy(model_dir, tmp_path / "m")
    good = json.loads((work / "config.json").read_text())
    rng = random.Random(17)
    # per key: null, a string, a bool, a negative and a huge number, or one of the others at random
    cases = [(k, v) for k in sorted(set(good) | set(_OPTIONAL_KEYS))
             for v in [None, "x", True, -1, rng.choice([10**15, *_NASTY[5:]])]]  # fmt: skip
    cases += [(k, rng.choice(_NASTY)) for k in rng.choices(sorted(good), k=20)]  # and pairs of them
    loaded = refused = 0
    for i, (key, value) in enumerate(cases):
        cfg = dict(good, **{key: value})
        if i >= len(cases) - 20:
            other = rng.choice(sorted(good))
            cfg[other] = rng.choice(_NASTY)
        (work / "config.json").write_text(json.dumps(cfg))
        try:
            model = load_model(work)
        except UserError:
            refused += 1
            continue
        loaded += 1
        # a config that loads must also generate within bounds (or refuse the request cleanly)
        with contextlib.suppress(UserError):
            Engine(model).generate([[2, 5, 7]], max_new_tokens=2)
    assert loaded > 0 and refused > len(cases) // 2, (loaded, refused)


# option -> a subcommand that takes it; each value is thrown at each option
_NUMERIC = {
    "--max-new-tokens": "generate", "--top-k": "generate", "--top-p": "generate", "--seed": "generate",
    "--prefill-chunk": "generate", "--temperature": "generate", "--threads": "generate",
    "--context": "info", "--max-shard-mb": "convert", "--group-size": "quantize",
}  # fmt: skip
_NUMBERS = [
    "nan",
    "inf",
    "-inf",
    "-1",
    "0",
    "1",
    "0.5",
    "1e999",
    "999999999999999999999999",
    "abc",
    "",
    "0x10",
]


def test_cli_numbers_fuzz(model_dir, tmp_path, monkeypatch):
    """Every numeric option x awkward values: exit 0 or exit 2 with one line, never an exception."""
    monkeypatch.chdir(tmp_path)
    have = available_bytes()
    for opt, cmd in _NUMERIC.items():
        for value in _NUMBERS:
            base = {
                "generate": ["--model", str(model_dir), "--prompt", "hi", "--max-new-tokens", "2"],
                "info": ["--preset", "gemma-2b"],
                "convert": ["--model", str(model_dir), "--to", "hf", "--out", "c", "--overwrite"],
                "quantize": ["--model", str(model_dir), "--scheme", "int4", "--out", "q", "--overwrite"],
            }[cmd]
            err = io.StringIO()
            with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
                try:
                    rc = cli.main([cmd, *base, f"{opt}={value}"])
                except SystemExit as e:  # argparse refusals
                    rc = e.code
            assert rc in (0, 2), (opt, value, rc, err.getvalue())
            if rc == 2:
                lines = err.getvalue().strip().splitlines()
                assert len(lines) == 1 and lines[0].startswith("gemmakit: error:"), (opt, value, lines)
    assert have is not None and have > 0


@pytest.mark.parametrize(
    "args, needle",
    [  # rows 15 and 20: numbers the data, train and eval commands used to accept or crash on
        (["data", "run", "--recipe", "r.toml", "--workers", "-3"], "--workers"),
        (["data", "run", "--recipe", "r.toml", "--workers", "0"], "--workers"),
        (["data", "synth", "--out", "o", "--docs", "-5"], "--docs"),
        (["data", "synth", "--out", "o", "--seed", "-1"], "--seed"),
        (["train", "--recipe", "r.toml", "--out", "o", "--threads", "0"], "--threads"),
        (["eval", "--tasks", "arc_easy", "--limit", "0"], "--limit"),
        (["eval", "--tasks", "arc_easy", "--batch-size", "-2"], "--batch-size"),
    ],
)
def test_other_commands_numbers(tmp_path, monkeypatch, args, needle):
    monkeypatch.chdir(tmp_path)
    assert_user_error(run(*args), needle, args[-1])
    assert list(tmp_path.iterdir()) == []  # refused while parsing: nothing read, nothing written
