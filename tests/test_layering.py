"""Imports go one way: config -> tokenizer/model -> chat/checkpoint/quantize -> infer -> cli.

Each module may import gemmakit modules of a strictly lower rank only (a subpackage's own modules may
import each other). Heavy optional libraries (transformers, fastapi, ...) are never imported by the core.
"""

from __future__ import annotations

import ast
from pathlib import Path

PKG = Path(__file__).resolve().parents[1] / "gemmakit"

RANK = {
    "errors": -1,  # below everything: config and artifact (rank 0) raise its errors
    "config": 0,
    "artifact": 0,
    "memory": 0,
    "jsonl": 0,
    "tokenizer": 1,
    "model": 1,
    "chat": 2,
    "checkpoint": 2,
    "quantize": 3,
    "lora": 3,
    "infer": 4,
    "export_gguf": 4,
    "data": 5,
    "train": 6,
    "eval": 7,
    "safety": 7,
    "server": 8,  # over infer, chat and safety; under cli_serve
    "cli": 9,
    "cli_train": 8,
    "cli_data": 8,
    "cli_eval": 8,
    "cli_safety": 8,
    "cli_guard": 8,
    "cli_serve": 8.5,  # imports server
    "cli_args": 7.5,  # the CLI value converters, under every cli_* module
    "__init__": 10,
}
CORE_FORBIDDEN = {"transformers", "fastapi", "ray", "jinja2", "uvicorn", "gguf"}


def _unit(module_path: Path) -> str:
    rel = module_path.relative_to(PKG)
    return rel.parts[0].removesuffix(".py") if len(rel.parts) > 1 or rel.name != "__init__.py" else "__init__"


def _imports(path: Path) -> list[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    names = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.append(node.module)
    return names


def test_every_module_has_a_rank() -> None:
    units = {_unit(p) for p in PKG.rglob("*.py")}
    assert units <= set(RANK), f"give these a rank in the layering test: {sorted(units - set(RANK))}"


def test_imports_go_one_way() -> None:
    bad = []
    for path in PKG.rglob("*.py"):
        src = _unit(path)
        for name in _imports(path):
            top = name.split(".")[0]
            if top in CORE_FORBIDDEN and src not in ("server", "eval", "data", "safety", "export_gguf"):
                bad.append(f"{path.relative_to(PKG)} imports optional dependency {name}")
            if top != "gemmakit" or name == "gemmakit":
                continue
            target = name.split(".")[1]
            if target != src and RANK[target] >= RANK[src]:
                bad.append(f"{path.relative_to(PKG)} ({src}) imports {name} ({target})")
    assert not bad, "\n".join(bad)


def test_no_private_names_imported_from_another_unit() -> None:
    """`from gemmakit.X... import _name` only inside unit X: what other units use is public, documented API."""
    bad = []
    for path in PKG.rglob("*.py"):
        src = _unit(path)
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if not (isinstance(node, ast.ImportFrom) and node.module and node.level == 0):
                continue
            parts = node.module.split(".")
            if parts[0] != "gemmakit" or (len(parts) > 1 and parts[1] == src):
                continue
            private = [a.name for a in node.names if a.name.startswith("_") and not a.name.startswith("__")]
            if private:
                bad.append(
                    f"{path.relative_to(PKG)}:{node.lineno} ({src}) imports {private} from {node.module}"
                )
    assert not bad, "\n".join(bad)


def test_tokenizer_and_model_do_not_import_each_other() -> None:
    assert not any(n.startswith("gemmakit.model") for n in _imports(PKG / "tokenizer.py"))
    assert not any(n.startswith("gemmakit.tokenizer") for n in _imports(PKG / "model.py"))
