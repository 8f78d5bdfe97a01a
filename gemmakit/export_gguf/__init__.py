"""GGUF: export a gemmakit model to llama.cpp's file format, and validate GGUF files.

Where it sits: after `checkpoint` in the data flow (layering rank 4): a loaded `Gemma` and its
`Tokenizer` go in, one `.gguf` file comes out (`gemmakit export-gguf`). The package is one layering
unit; its modules, bottom to top:

- `reader`: `read_gguf`, a validating pure-Python parser (no `gguf` package needed), and `GGUFError`.
- `writer`: `export_gguf` (f32/f16/bf16/q8_0/q4_0 via gguf-py), `check_exportable`, `CHAT_TEMPLATE`.

Key trade-off: the exporter refuses configs that llama.cpp would silently compute differently
(attention scale, layer pattern, local RoPE base, soft-caps) instead of writing a file that loads
but gives different logits; see `writer`'s docstring for the exact rules.
"""

from gemmakit.export_gguf.reader import GGML_TYPES, GGUFError, GGUFFile, GGUFTensor, read_gguf
from gemmakit.export_gguf.writer import (
    CHAT_TEMPLATE,
    QTYPES,
    check_exportable,
    export_gguf,
    llama_cpp_attention_scalar,
)

__all__ = [
    "CHAT_TEMPLATE",
    "GGML_TYPES",
    "QTYPES",
    "GGUFError",
    "GGUFFile",
    "GGUFTensor",
    "check_exportable",
    "export_gguf",
    "llama_cpp_attention_scalar",
    "read_gguf",
]
