"""gemmakit: the Gemma model family (1, 1.1, CodeGemma, 2, 3) in PyTorch, exact to the reference.

The stable Python API:

    model = gemmakit.load("path/to/gemma-2b")          # tokens (B, T) -> logits (B, T, V)
    tok = gemmakit.Tokenizer.load("path/to/gemma-2b")  # encode(text, bos=True) / decode(ids)
    engine = gemmakit.Engine(model)                    # generate(prompts, max_new_tokens, ...)

Names resolve lazily so `import gemmakit` (and `gemmakit --help`) stays cheap.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_LAZY = {
    "load": ("gemmakit.quantize", "load_any"),  # float or quantized, told apart by manifest.json
    "Tokenizer": ("gemmakit.tokenizer", "Tokenizer"),
    "Engine": ("gemmakit.infer.engine", "Engine"),
    "Gemma": ("gemmakit.model", "Gemma"),
    "ModelConfig": ("gemmakit.config", "ModelConfig"),
    "PRESETS": ("gemmakit.config", "PRESETS"),
}

__all__ = ["__version__", "load", "Tokenizer", "Engine", "Gemma", "ModelConfig", "PRESETS"]

if TYPE_CHECKING:
    from gemmakit.config import PRESETS, ModelConfig
    from gemmakit.infer.engine import Engine
    from gemmakit.model import Gemma
    from gemmakit.quantize import load_any as load
    from gemmakit.tokenizer import Tokenizer


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module 'gemmakit' has no attribute {name!r}")
    import importlib

    module, attr = _LAZY[name]
    value = getattr(importlib.import_module(module), attr)
    globals()[name] = value
    return value
