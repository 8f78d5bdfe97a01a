"""The `gemmakit` console script, run as a real subprocess on a tiny model saved to disk.

Outputs are checked against the library computing the same thing (Engine + chat.render), and every
user error must be one line on stderr with exit status 2 and no traceback.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import torch

from gemmakit.chat import render, stop_tokens
from gemmakit.config import PRESETS
from gemmakit.infer import Engine
from gemmakit.model import Gemma
from gemmakit.tokenizer import Tokenizer

EXE = str(Path(sys.executable).with_name("gemmakit"))


def run(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([EXE, *args], input=stdin, capture_output=True, text=True, timeout=300)


def assert_user_error(proc: subprocess.CompletedProcess, *needles: str) -> None:
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]


def test_help_for_every_command() -> None:
    for cmd in ([], ["generate"], ["chat"], ["convert"], ["info"]):
        proc = run(*cmd, "--help")
        assert proc.returncode == 0 and "usage: gemmakit" in proc.stdout


def test_generate_streams_what_the_engine_generates(model_dir: Path) -> None:
    proc = run("generate", "--model", str(model_dir), "--prompt", "hello world", "--max-new-tokens", "12",
               "--attn", "eager", "--ignore-eos")  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    tok = Tokenizer.load(model_dir)
    from gemmakit.checkpoint import load_model

    engine = Engine(load_model(model_dir))
    [new] = engine.generate([tok.encode("hello world")], max_new_tokens=12)
    assert proc.stdout == tok.decode(new) + "\n"


def test_chat_turns_reset_and_exit(model_dir: Path) -> None:
    proc = run("chat", "--model", str(model_dir), "--max-new-tokens", "6", "--seed", "3", "--attn", "eager",
               stdin="hello there\n/reset\nhello there\n/exit\nnever read\n")  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    tok = Tokenizer.load(model_dir)
    from gemmakit.checkpoint import load_model

    prompt = render(tok, [{"role": "user", "content": "hello there"}]).tokens
    [new] = Engine(load_model(model_dir)).generate(
        [prompt], 6, temperature=1.0, top_k=64, top_p=0.95, seed=3, stop_tokens=stop_tokens(tok)
    )
    reply = tok.decode(new)
    # /reset: the second turn starts from an empty conversation again, so it repeats the first reply
    assert proc.stdout == reply + "\n" + reply + "\n"
    assert "(conversation cleared)" in proc.stderr


def test_fit_context_drops_one_exchange_per_notice(model_dir: Path, capsys) -> None:
    from gemmakit.chat import Conversation
    from gemmakit.checkpoint import load_model
    from gemmakit.cli import _fit_context

    tok, engine = Tokenizer.load(model_dir), Engine(load_model(model_dir))  # a 256-token context
    conv = Conversation(tok, system_prompt="sys")
    for i in range(12):
        conv.add_user(f"question {i} " * 4)
        conv.add_model(f"answer {i} " * 4)
    conv.add_user("last question")
    full = conv.messages
    # the fewest oldest exchanges whose removal makes the prompt fit under 256 - 64 tokens
    fits = [d for d in range(13) if len(render(tok, full[:1] + full[1 + 2 * d :]).tokens) <= 256 - 64]
    prompt = _fit_context(conv, engine, max_new_tokens=64)
    assert 0 < fits[0] < 12 and conv.messages == full[:1] + full[1 + 2 * fits[0] :]
    assert capsys.readouterr().err.count("dropped the oldest exchange") == fits[0]
    assert prompt == render(tok, conv.messages).tokens
    conv.add_model("an answer")
    history = conv.messages
    conv.add_user("word " * 400)  # alone longer than the context: refused, history kept, chat goes on
    assert _fit_context(conv, engine, max_new_tokens=64) is None
    assert conv.messages == history and "message too long" in capsys.readouterr().err


def test_chat_outgrowing_the_context_finishes() -> None:
    """40 long turns into the bundled nano model (1024-token context): the oldest exchanges are dropped,
    each with one notice, and the chat ends at /exit (it used to loop forever printing the notice)."""
    line = "Tell me about " + ", ".join(f"the castle number {i} and its twelve knights" for i in range(12))
    stdin = "\n".join([line] * 40) + "\n" + "word " * 2000 + "\n/exit\n"
    proc = run("chat", "--max-new-tokens", "16", "--temperature", "0", stdin=stdin)
    assert proc.returncode == 0, proc.stderr[-2000:]
    notices = proc.stderr.count("(context full: dropped the oldest exchange)")
    assert 1 <= notices < 40, proc.stderr[-2000:]  # at most one exchange dropped per turn here
    assert proc.stderr.count("message too long") == 1 and "Traceback" not in proc.stderr


def test_info_without_loading(model_dir: Path) -> None:
    proc = run("info", "--model", str(model_dir))
    assert proc.returncode == 0, proc.stderr
    n = sum(p.numel() for p in Gemma(PRESETS["tiny"].replace(vocab_size=640)).parameters())
    assert f"{n:,}" in proc.stdout and "float32" in proc.stdout
    proc = run("info", "--preset", "gemma-2b")
    assert proc.returncode == 0 and "2,506,172,416" in proc.stdout


def test_convert_round_trip(model_dir: Path, tmp_path: Path) -> None:
    gp, hf = tmp_path / "gp", tmp_path / "hf"
    assert (
        run("convert", "--model", str(model_dir), "--to", "gemma_pytorch", "--out", str(gp)).returncode == 0
    )
    proc = run("convert", "--model", str(gp), "--to", "hf", "--out", str(hf))
    assert proc.returncode == 0, proc.stderr
    from gemmakit.checkpoint import load_model

    tokens = torch.randint(1, 640, (1, 9))
    with torch.no_grad():
        assert torch.equal(load_model(hf)(tokens), load_model(model_dir)(tokens))
    assert_user_error(run("convert", "--model", str(model_dir), "--to", "hf", "--out", str(hf)), str(hf))


def test_user_errors_are_one_line(model_dir: Path, tmp_path: Path) -> None:
    assert_user_error(run("generate", "--model", str(tmp_path / "nope"), "--prompt", "x"), "nope")
    bad = tmp_path / "bad"
    shutil.copytree(model_dir, bad)
    weights = bad / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    assert_user_error(run("generate", "--model", str(bad), "--prompt", "x"), "model.safetensors", "truncated")
    assert_user_error(run("info", "--preset", "gemma-5b"), "gemma-5b")
    assert_user_error(
        run("generate", "--model", str(model_dir), "--prompt", "x", "--dtype", "int3"), "--dtype"
    )
    assert_user_error(run("generate", "--model", str(model_dir), "--prompt", "x", "--top-p", "2"), "--top-p")
    notok = tmp_path / "notok"
    shutil.copytree(model_dir, notok)
    (notok / "tokenizer.model").write_bytes(b"garbage")
    assert_user_error(run("generate", "--model", str(notok), "--prompt", "x"), "tokenizer.model")


def test_chat_and_generate_default_to_the_bundled_nano_model() -> None:
    """No --model: the nano model shipped in the package answers (README's main command)."""
    proc = run("chat", "--temperature", "0", stdin="What is the capital of France?\n/exit\n")
    assert proc.returncode == 0, proc.stderr
    assert "Paris" in proc.stdout
    proc = run("generate", "--prompt", "KING.", "--max-new-tokens", "8")
    assert proc.returncode == 0 and proc.stdout.strip(), proc.stderr
