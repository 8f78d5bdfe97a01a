"""The `gemmakit` command: generate, chat, convert, export-gguf, quantize, info; a thin layer.

Where it sits: last in the data flow; the only module (with the future server) that prints.
User errors (bad paths, corrupt checkpoints, invalid arguments) become one line on stderr and exit
status 2, never a traceback; set GEMMAKIT_DEBUG=1 to see the traceback anyway.

Key trade-off: `chat` re-renders and re-prefills the whole conversation every turn. That keeps
the chat format in one place (`chat.render`) at the cost of re-reading earlier turns, which on a
1B model costs well under a second per turn of history on a laptop CPU. Model turns keep the ids
the model generated (`Conversation.add_model(..., token_ids=...)`), so the re-rendered history is
exactly what the model produced, not a re-encoding of its decoded text.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from gemmakit import cli_args as ca
from gemmakit.errors import UserError

# The project's own small model, shipped inside the package (built by `gemmakit nano`, see README).
NANO_DIR = Path(__file__).resolve().parent / "assets" / "nano"
DTYPES = {"float32": "float32", "fp32": "float32", "bfloat16": "bfloat16", "bf16": "bfloat16",
          "float16": "float16", "fp16": "float16"}  # fmt: skip


class UsageError(UserError):
    """A command-line argument is invalid."""


def _dtype(name: str | None) -> Any:
    import torch

    if name is None:
        return None
    if name not in DTYPES:
        raise UsageError(f"--dtype: expected one of {sorted(set(DTYPES.values()))}, got {name!r}")
    return getattr(torch, DTYPES[name])


def _threads(n: int | None) -> None:
    if n is not None:
        import torch

        if n < 1:
            raise UsageError(f"--threads: expected an integer >= 1, got {n}")
        torch.set_num_threads(n)


def _load_model_and_tokenizer(args: argparse.Namespace, quantized_ok: bool = True) -> tuple[Any, Any]:
    from gemmakit.checkpoint import load_model
    from gemmakit.config import get_preset
    from gemmakit.quantize import load_any
    from gemmakit.tokenizer import Tokenizer

    if args.model is None:
        if not (NANO_DIR / "config.json").is_file():
            raise UsageError(
                f"--model: no model given and the bundled nano model is missing from {NANO_DIR}; pass a "
                "directory with Gemma weights and tokenizer.model (see README.md, 'Getting weights')"
            )
        args.model = str(NANO_DIR)
    config = get_preset(args.preset) if getattr(args, "preset", None) else None
    load = load_any if quantized_ok else load_model  # load_any also reads `gemmakit quantize` output
    model = load(args.model, dtype=_dtype(args.dtype), device=args.device, attn_impl=args.attn, config=config)
    if quantized_ok:  # a bf16 model on CPU decodes through the native bf16 GEMV (1.6x PyTorch's), no copy
        from gemmakit.quantize import with_bf16_kernels

        model = with_bf16_kernels(model)
    tok_path = args.tokenizer or (Path(args.model) if Path(args.model).is_dir() else Path(args.model).parent)
    tokenizer = Tokenizer.load(tok_path)
    if tokenizer.vocab_size > model.config.vocab_size:
        raise UsageError(
            f"{tokenizer.source}: tokenizer has {tokenizer.vocab_size} pieces but the model only "
            f"{model.config.vocab_size} embedding rows"
        )
    return model, tokenizer


def _stream_text(engine: Any, tokenizer: Any, prompt: list[int], args: argparse.Namespace,
                 stop_tokens: list[int]) -> Iterator[tuple[str, int]]:  # fmt: skip
    """Yield (text piece, token) as tokens are generated, holding back split UTF-8 characters."""
    from gemmakit.tokenizer import StreamDecoder

    decoder = StreamDecoder(tokenizer)
    limit = engine.config.max_seq_len - len(prompt)
    max_new = min(args.max_new_tokens, limit)
    if max_new <= 0:
        raise UsageError(
            f"prompt of {len(prompt)} tokens fills the model's context of {engine.config.max_seq_len}"
        )
    processor = None
    if getattr(args, "watermark", None):  # SynthID Text: a fresh processor (fresh state) per request
        from gemmakit.safety.watermark import watermark_processor

        processor = watermark_processor(args.watermark)
    steps = engine.stream([prompt], max_new, temperature=args.temperature, top_k=args.top_k,
                          top_p=args.top_p, seed=args.seed, stop_tokens=stop_tokens,
                          processor=processor)  # fmt: skip
    for step in steps:
        yield decoder.push(step[0]), step[0]
    yield decoder.flush(), -1


def cmd_generate(args: argparse.Namespace) -> int:
    from gemmakit.infer import Engine

    _threads(args.threads)
    model, tokenizer = _load_model_and_tokenizer(args)
    prompt = tokenizer.encode(args.prompt, bos=True)
    engine = Engine(model, prefill_chunk=args.prefill_chunk)
    stops = [tokenizer.eos_id] if not args.ignore_eos else []
    for text, _ in _stream_text(engine, tokenizer, prompt, args, stops):
        sys.stdout.write(text)
        sys.stdout.flush()
    sys.stdout.write("\n")
    return 0


def cmd_chat(args: argparse.Namespace) -> int:
    from gemmakit.chat import Conversation, stop_tokens
    from gemmakit.infer import Engine

    _threads(args.threads)
    guard = None
    if args.guard:  # before the chat model: a bad guard file fails fast
        from gemmakit.safety.guard import load_guard

        guard = load_guard(args.guard)
    model, tokenizer = _load_model_and_tokenizer(args)
    engine = Engine(model, prefill_chunk=args.prefill_chunk)
    conv = Conversation(tokenizer, system_prompt=args.system)
    stops = stop_tokens(tokenizer)
    interactive = sys.stdin.isatty()
    if interactive:
        print(f"gemmakit chat: {args.model} ({model.config.generation}). /reset clears, /exit quits.")
        if guard:
            print(f"(guarded by {args.guard}: fail_mode {guard.config.fail_mode})", file=sys.stderr)
    while True:
        try:
            line = input("> " if interactive else "")
        except EOFError:
            break
        text = line.strip()
        if not text:
            continue
        if text in ("/exit", "/quit"):
            break
        if text == "/reset":
            conv.reset()
            print("(conversation cleared)", file=sys.stderr)
            continue
        if guard:
            verdict = guard.check_input(text)
            if verdict.action != "allow" or verdict.error:
                print(f"(guard, input: {verdict.describe()})", file=sys.stderr)
            if verdict.blocked:
                print(guard.config.refusal, flush=True)
                continue  # the prompt never reaches the model or the history
            text = verdict.text if verdict.action == "redact" else text
        conv.add_user(text)
        prompt = _fit_context(conv, engine, args.max_new_tokens)
        if prompt is None:
            continue
        if guard:
            _guarded_reply(guard, conv, engine, tokenizer, prompt, args, stops, text)
            continue
        reply_ids: list[int] = []
        for piece, token in _stream_text(engine, tokenizer, prompt, args, stops):
            sys.stdout.write(piece)
            sys.stdout.flush()
            if token >= 0:
                reply_ids.append(token)
        sys.stdout.write("\n")
        sys.stdout.flush()
        conv.add_model(tokenizer.decode(reply_ids), token_ids=reply_ids)  # the next turn sees these ids
    return 0


def _guarded_reply(guard: Any, conv: Any, engine: Any, tokenizer: Any, prompt: list[int],
                   args: argparse.Namespace, stops: list[int], user_text: str) -> None:  # fmt: skip
    """Stream one reply through the guard's output monitor: only checked text is printed, a blocked
    reply stops generating at once and its exchange leaves the history."""
    monitor = guard.monitor(user_text)
    steps = _stream_text(engine, tokenizer, prompt, args, stops)
    for piece, _ in steps:
        sys.stdout.write(monitor.push(piece))
        sys.stdout.flush()
        if monitor.stopped:
            steps.close()  # no further tokens are generated
            break
    sys.stdout.write(monitor.finish())
    if monitor.stopped:
        sys.stdout.write(("\n" if monitor.released else "") + guard.config.refusal)
        print(f"\n(guard, output: {monitor.verdict.describe()}; finish_reason content_filter)",
              file=sys.stderr, end="")  # fmt: skip
        conv.pop_user()
    else:
        conv.add_model(monitor.released)
    for w in monitor.warnings:
        print(f"\n(guard, output: {w.describe()})", file=sys.stderr, end="")
    sys.stdout.write("\n")
    sys.stdout.flush()


def _fit_context(conv: Any, engine: Any, max_new_tokens: int) -> list[int] | None:
    """The prompt for the next reply, dropping the oldest exchanges while it would overflow the context
    (one notice per dropped exchange). A user turn too long even on its own is removed and None returned,
    with the history left as it was."""
    from gemmakit.chat import render

    size = engine.config.max_seq_len
    limit = size - min(max_new_tokens, size // 2)  # room for a reply of up to half the context
    messages = conv.messages
    alone = render(conv.tokenizer, [m for m in messages[:1] if m["role"] == "system"] + messages[-1:])
    if len(alone.tokens) > limit:
        conv.pop_user()
        print(f"(message too long: {len(alone.tokens)} tokens of prompt, the {size}-token context leaves "
              f"{limit} for it; not sent)", file=sys.stderr)  # fmt: skip
        return None
    prompt = conv.prompt_tokens()
    while len(prompt) > limit and conv.drop_oldest_exchange():
        print("(context full: dropped the oldest exchange)", file=sys.stderr)
        prompt = conv.prompt_tokens()
    return prompt


def cmd_convert(args: argparse.Namespace) -> int:
    from gemmakit.checkpoint import convert_checkpoint
    from gemmakit.config import get_preset

    config = get_preset(args.preset) if args.preset else None
    shard = int(args.max_shard_mb * 2**20) if args.max_shard_mb else None
    out = convert_checkpoint(args.model, args.out, args.to, dtype=_dtype(args.dtype), config=config,
                             max_shard_bytes=shard, overwrite=args.overwrite)  # fmt: skip
    print(f"wrote {args.to} checkpoint to {out}")
    return 0


def cmd_export_gguf(args: argparse.Namespace) -> int:
    from gemmakit.export_gguf import export_gguf

    _threads(args.threads)
    model, tokenizer = _load_model_and_tokenizer(args, quantized_ok=False)
    info = export_gguf(model, tokenizer, args.out, args.type, overwrite=args.overwrite)
    size = Path(info.path).stat().st_size
    print(f"wrote {args.type} GGUF ({len(info.tensors)} tensors, {_bytes(size)}) to {info.path}")
    return 0


def cmd_quantize(args: argparse.Namespace) -> int:
    from gemmakit.checkpoint import load_model
    from gemmakit.config import get_preset
    from gemmakit.quantize import quantize_model, save_quantized

    _threads(args.threads)
    config = get_preset(args.preset) if args.preset else None
    model = load_model(args.model, config=config)  # stored dtype, memory-mapped; quantized row chunk by chunk
    quantize_model(model, args.scheme, args.group_size, embed_scheme=args.embed_scheme)
    src = Path(args.model) if Path(args.model).is_dir() else Path(args.model).parent
    tok = src / "tokenizer.model"
    out = save_quantized(model, args.out, tokenizer=tok if tok.is_file() else None, overwrite=args.overwrite)
    group = f", group size {model.blocks[0].wq.group_size}" if args.scheme == "int4" else ""
    size = sum(f.stat().st_size for f in Path(out).iterdir())
    print(f"wrote {args.scheme}{group} checkpoint ({_bytes(size)}) to {out}")
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    import torch

    from gemmakit.checkpoint import describe, estimate_memory
    from gemmakit.config import get_preset, human_count

    if args.preset:
        cfg, dtype, where = (
            get_preset(args.preset),
            _dtype(args.dtype) or torch.bfloat16,
            f"preset {args.preset}",
        )
    elif args.model:
        from gemmakit.quantize import read_quantization

        desc, quant = describe(args.model), read_quantization(args.model)
        cfg, dtype, where = (
            desc["config"],
            _dtype(args.dtype) or desc["dtype"],
            f"{desc['format']} at {args.model}",
        )
        if quant is not None:  # packed weights: the files' size is the weight memory
            q = quant["quantization"]
            group = f", groups of {q['group_size']}" if q.get("group_size") else ""
            where = f"quantized {q['scheme']}{group} at {args.model}"
            dtype = _dtype(args.dtype) or getattr(torch, quant.get("dtype", "float32"))
    else:
        raise UsageError("info: pass --model DIR or --preset NAME")
    from gemmakit.infer.kv_cache import kv_cache_bytes

    mem = estimate_memory(cfg, dtype)
    if args.model and quant is not None:
        mem["weight_bytes"] = sum(Path(f).stat().st_size for f in desc["files"])
    ctx = args.context or min(cfg.max_seq_len, 8192)
    kv = kv_cache_bytes(cfg, 1, ctx, dtype)
    print(f"model:       {where}")
    for key, value in cfg.to_dict().items():
        if key == "layer_types":
            n_local = sum(t == "local" for t in value)
            value = f"{len(value) - n_local} global, {n_local} local"
        print(f"  {key + ':':24s}{value}")
    print(f"parameters:  {mem['params']:,} ({human_count(mem['params'])})")
    print(f"dtype:       {str(dtype).removeprefix('torch.')}")
    print(f"weights:     {_bytes(mem['weight_bytes'])}")
    print(
        f"KV cache:    {_bytes(kv)} for a {ctx}-token context at batch 1 (sliding layers keep only their window)"
    )
    print(f"estimate:    {_bytes(mem['weight_bytes'] + kv)} to run (weights + KV cache)")
    return 0


def _bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--model",
        help="checkpoint directory or weights file (HF or gemma_pytorch layout; "
        "default: the bundled nano model)",
    )
    p.add_argument("--tokenizer", help="tokenizer.model or its directory (default: beside the weights)")
    p.add_argument("--preset", help="config preset for a checkpoint without config.json (e.g. gemma-2b)")
    p.add_argument("--dtype", help="compute dtype: float32, bfloat16 (default: as stored)")
    p.add_argument("--device", default="cpu", type=ca.device, help="torch device (default: cpu)")
    p.add_argument("--attn", default="sdpa", choices=["eager", "sdpa"],
                   help="attention: exact reference 'eager' or faster 'sdpa' (default; Gemma 2 always eager)")  # fmt: skip
    p.add_argument("--threads", type=ca.threads, help="CPU threads (default: torch's choice)")
    p.add_argument(
        "--max-new-tokens",
        type=ca.positive_int,
        default=512,
        help="tokens to generate per reply (default: 512)",
    )
    p.add_argument("--top-k", type=ca.positive_int, default=None, help="sample from the k most likely tokens")
    p.add_argument(
        "--top-p",
        type=ca.float_range(0.0, 1.0, lo_open=True),
        default=None,
        help="nucleus sampling threshold in (0, 1]",
    )
    p.add_argument("--seed", type=ca.seed, default=None, help="random seed for sampling")
    p.add_argument(
        "--prefill-chunk",
        type=ca.positive_int,
        default=None,
        help="prefill long prompts in chunks of N tokens",
    )


def _watermark_keys(path: str) -> Any:
    """--watermark: the keys file, read while parsing so a bad file fails before the model loads."""
    from gemmakit.safety.watermark import WatermarkError, load_keys

    try:
        return load_keys(path)
    except WatermarkError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def build_parser() -> argparse.ArgumentParser:
    parser = ca.Parser(prog="gemmakit", description="Gemma models on your own machine.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress to stderr")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("generate", help="stream a continuation of a raw prompt",
                       description="Stream a continuation of a raw text prompt (no chat template).")  # fmt: skip
    _add_model_args(p)
    p.add_argument("--prompt", required=True, help="the prompt text (BOS is added)")
    p.add_argument("--temperature", type=ca.float_range(0.0), default=0.0, help="0 = greedy (default)")
    p.add_argument("--ignore-eos", action="store_true", help="do not stop at <eos>")
    p.add_argument("--watermark", metavar="KEYS.toml", type=_watermark_keys,
                   help="SynthID Text watermark with these keys (see `gemmakit watermark`)")  # fmt: skip
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("chat", help="interactive multi-turn chat",
                       description="Chat with an instruction-tuned Gemma. /reset clears, /exit quits.")  # fmt: skip
    _add_model_args(p)
    p.add_argument("--system", default=None, help="system prompt (folded into the first user turn)")
    p.add_argument(
        "--temperature", type=ca.float_range(0.0), default=1.0, help="sampling temperature (default 1.0)"
    )
    p.add_argument("--guard", default=None,
                   help="safety checks on prompts and replies from a guard TOML file (e.g. recipes/guard.toml)")  # fmt: skip
    p.set_defaults(func=cmd_chat, top_k=64, top_p=0.95)  # Gemma's published sampling defaults

    p = sub.add_parser("convert", help="convert between checkpoint layouts",
                       description="Convert a checkpoint to HF safetensors or the gemma_pytorch layout.")  # fmt: skip
    p.add_argument("--model", required=True, help="source checkpoint (directory or file)")
    p.add_argument("--to", required=True, choices=["hf", "gemma_pytorch"], help="target layout")
    p.add_argument("--out", required=True, help="output directory (written atomically)")
    p.add_argument("--preset", help="config preset for a source without config.json")
    p.add_argument("--dtype", help="output dtype (default: as stored)")
    p.add_argument(
        "--max-shard-mb",
        type=ca.float_range(0.0, 2.0**40, lo_open=True),
        default=None,
        help="shard HF output files at this size",
    )
    p.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    p.set_defaults(func=cmd_convert)

    p = sub.add_parser("export-gguf", help="export to a llama.cpp GGUF file",
                       description="Export a checkpoint and its tokenizer to one GGUF file for llama.cpp "
                                   "(needs the 'gguf' extra).")  # fmt: skip
    p.add_argument("--model", required=True, help="source checkpoint (directory or file)")
    p.add_argument("--type", required=True, choices=["f32", "f16", "bf16", "q8_0", "q4_0"],
                   help="tensor type (norms stay f32; q4_0 keeps the tied embedding at q8_0)")  # fmt: skip
    p.add_argument("--out", required=True, help="output .gguf file (written atomically)")
    p.add_argument("--tokenizer", help="tokenizer.model or its directory (default: beside the weights)")
    p.add_argument("--preset", help="config preset for a checkpoint without config.json")
    p.add_argument("--threads", type=ca.threads, help="CPU threads (default: torch's choice)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    p.set_defaults(func=cmd_export_gguf, dtype=None, device="cpu", attn="eager")

    p = sub.add_parser("quantize", help="weight-only int8 / int4 quantization (or bf16 weights)",
                       description="Quantize every linear layer and the embedding (weight-only) and save "
                                   "a checkpoint that generate/chat load directly.")  # fmt: skip
    p.add_argument("--model", required=True, help="source checkpoint (directory or file)")
    p.add_argument("--scheme", required=True, choices=["int8", "int4", "bf16"],
                   help="int8: per-output-row scales; int4: groups of --group-size columns; "
                        "bf16: weights kept as bf16, native bf16 x fp32 decode kernel")  # fmt: skip
    p.add_argument(
        "--group-size", type=ca.positive_int, default=None, help="int4: a multiple of 32 (default 64)"
    )
    p.add_argument("--embed-scheme", choices=["int8", "int4", "bf16"], default=None,
                   help="quantize the embedding / output projection differently (default: --scheme)")  # fmt: skip
    p.add_argument("--out", required=True, help="output directory (written atomically)")
    p.add_argument("--preset", help="config preset for a source without config.json")
    p.add_argument("--threads", type=ca.threads, help="CPU threads (default: torch's choice)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    p.set_defaults(func=cmd_quantize)

    p = sub.add_parser("info", help="config, parameter count and memory estimate",
                       description="Show a model's config, parameter count and memory needs without loading weights.")  # fmt: skip
    p.add_argument("--model", help="checkpoint directory or weights file")
    p.add_argument("--preset", help="a named preset instead of a checkpoint")
    p.add_argument("--dtype", help="dtype for the estimate (default: as stored, bfloat16 for presets)")
    p.add_argument(
        "--context",
        type=ca.positive_int,
        help="context length for the KV-cache estimate (default: min(max, 8192))",
    )
    p.set_defaults(func=cmd_info)

    from gemmakit import cli_data, cli_eval, cli_guard, cli_safety, cli_serve, cli_train

    cli_train.add_parsers(sub)
    cli_data.add_parsers(sub)
    cli_eval.add_parsers(sub, _add_model_args, _load_model_and_tokenizer)
    cli_safety.add_parsers(sub, _add_model_args, _load_model_and_tokenizer)
    cli_guard.add_parsers(sub, _add_model_args, _load_model_and_tokenizer)
    cli_serve.add_parsers(sub, _add_model_args, _load_model_and_tokenizer)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(message)s"
    )
    try:
        return args.func(args)
    except KeyboardInterrupt:
        print("", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 0
    except Exception as e:
        if os.environ.get("GEMMAKIT_DEBUG") or not isinstance(e, UserError):
            raise
        message = " ".join(str(e).split())  # one line, whatever the library put in it
        print(f"gemmakit: error: {message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
