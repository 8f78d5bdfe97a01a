"""One error hierarchy: every exception gemmakit defines derives from GemmakitError, the user's ones from
UserError, and the CLI turns any UserError into one line on stderr with exit status 2."""

from __future__ import annotations

import importlib
import inspect
import pkgutil
import subprocess
import sys
import tomllib
from pathlib import Path

from train_helpers import chat_setup, sft_recipe

import gemmakit
from gemmakit.errors import GemmakitError, UserError

INTERNAL = {
    "SandboxError",  # the sandbox itself failed: a bug or a broken host, the traceback helps
    "Busy",  # the batcher is full or closing: the server answers 429 / 503, nothing for the user to fix
}


def _defined_exceptions() -> dict[str, type[BaseException]]:
    found = {}
    for info in pkgutil.walk_packages(gemmakit.__path__, "gemmakit."):
        module = importlib.import_module(info.name)
        for name, obj in vars(module).items():
            public = not name.startswith("_")  # private ones are control flow inside one module
            if (
                public
                and inspect.isclass(obj)
                and issubclass(obj, BaseException)
                and obj.__module__ == info.name
            ):
                found[f"{info.name}.{name}"] = obj
    return found


def test_every_exception_derives_from_the_base() -> None:
    found = _defined_exceptions()
    assert {"gemmakit.lora.LoraError", "gemmakit.eval.metrics.MetricError"} <= set(found)
    for name, cls in found.items():
        assert issubclass(cls, GemmakitError), name
        assert issubclass(cls, UserError) == (cls.__name__ not in INTERNAL and cls is not GemmakitError), name


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "gemmakit.cli", *args], capture_output=True, text=True,
                          timeout=600)  # fmt: skip


def _one_line(proc: subprocess.CompletedProcess, *needles: str) -> None:
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    line = proc.stderr.strip()
    assert "\n" not in line and line.startswith("gemmakit: error: "), line
    assert all(n in line for n in needles), line


def _toml(raw: dict) -> str:
    out = [f"method = {raw['method']!r}"]
    for section, values in raw.items():
        if isinstance(values, dict) and section != "model":
            out.append(f"[{section}]")
            out += [f"{k} = {v!r}" if not isinstance(v, str) else f'{k} = "{v}"' for k, v in values.items()]
    out += ["[model]", 'preset = "tiny"', "[model.overrides]", "vocab_size = 640"]
    return "\n".join(out).replace("True", "true").replace("False", "false") + "\n"


def test_lora_errors_are_one_line(tmp_path: Path) -> None:
    """A LoraError used to escape the CLI as a traceback."""
    data, tok = chat_setup(tmp_path)
    raw = sft_recipe(data, tok, loop={"steps": 2}, lora={"enabled": True, "r": 4, "targets": ["q", "nope"]})
    recipe = tmp_path / "lora.toml"
    recipe.write_text(_toml(raw))
    assert tomllib.loads(recipe.read_text())["lora"]["targets"] == ["q", "nope"]
    _one_line(_cli("train", "--recipe", str(recipe), "--out", str(tmp_path / "run")), "targets", "nope")
    assert not (tmp_path / "run" / "final").exists()
