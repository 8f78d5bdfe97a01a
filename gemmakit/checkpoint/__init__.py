"""Checkpoints: read and write model weights in the HF safetensors and gemma_pytorch layouts.

Where it sits: after `config` and `model`, before `quantize`/`infer`/`cli`. `load_model` turns a
directory or a single file into a ready `Gemma`; `save_hf` / `save_gemma_pytorch` write one back,
each with a `manifest.json`, so a saved directory describes itself. The package is one layering
unit; its modules, bottom to top:

- `names`: HF / gemma_pytorch <-> gemmakit tensor name and shape tables.
- `formats`: content-based format detection, safetensors header validation, weights-only unpickling,
  `open_store` (lazily read tensors), the one-line `checkpoint_error`.
- `load`: resolving directories, choosing the config, collecting every problem, `load_model`,
  `describe`, `estimate_memory`.
- `save`: `checkpoint_dir` (a model directory written through `gemmakit.artifact`, with its
  manifest), `write_safetensors`, `save_hf`, `save_gemma_pytorch`, `convert_checkpoint`.

Key trade-off: loading memory-maps the weights into a model built on the `meta` device (~1.1x the
weight bytes of peak RSS instead of ~3x), so the files must not change under a live model; the
writers therefore never overwrite in place, they rename a finished temp directory into place.
"""

from gemmakit.artifact import MANIFEST
from gemmakit.checkpoint.formats import (
    CheckpointError,
    checkpoint_error,
    detect_format,
    open_store,
    read_safetensors_header,
)
from gemmakit.checkpoint.load import describe, estimate_memory, load_model, load_model_with_heads
from gemmakit.checkpoint.names import (
    FORMATS,
    file_names,
    file_shapes,
    hf_layer_table,
    hf_name_to_internal,
    hf_state_dict_to_internal,
    internal_name_to_hf,
)
from gemmakit.checkpoint.save import (
    checkpoint_dir,
    convert_checkpoint,
    save_gemma_pytorch,
    save_hf,
    write_safetensors,
    write_torch,
)

__all__ = [
    "FORMATS",
    "MANIFEST",
    "CheckpointError",
    "checkpoint_dir",
    "checkpoint_error",
    "convert_checkpoint",
    "describe",
    "detect_format",
    "estimate_memory",
    "file_names",
    "file_shapes",
    "hf_layer_table",
    "hf_name_to_internal",
    "hf_state_dict_to_internal",
    "internal_name_to_hf",
    "load_model",
    "load_model_with_heads",
    "open_store",
    "read_safetensors_header",
    "save_gemma_pytorch",
    "save_hf",
    "write_safetensors",
    "write_torch",
]
