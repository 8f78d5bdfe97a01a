"""The chat page at / in a real browser: Debian's Chromium driven by Playwright (S15 and the page's
acceptance: type a message, see the streamed answer, stop a long answer, reset).

Screenshots are kept in test-artifacts/ (ignored by git) for a person to look at.
"""

from __future__ import annotations

import os
import shutil
import sys
import time
from pathlib import Path

import httpx
import pytest
from server_helpers import launch

from gemmakit.chat import render, stop_tokens
from gemmakit.cli import _load_model_and_tokenizer, build_parser
from gemmakit.infer.engine import Engine

HERE = Path(__file__).resolve().parent
ARTIFACTS = HERE.parent / "test-artifacts"
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
# Skipped on a machine without Chromium, but not in CI, where .ci/run installs it: there it must run.
pytestmark = pytest.mark.skipif(
    CHROMIUM is None and not os.environ.get("CI"), reason="no Chromium (apt install chromium)"
)
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync"]  # fmt: skip


@pytest.fixture(scope="module")
def page(tmp_path_factory):
    from playwright.sync_api import sync_playwright

    # 15 ms per forward pass: a 400-token answer takes seconds, so the test can stop it mid-way
    argv = [sys.executable, str(HERE / "serve_faulty.py"), "{port}", "--delay-ms", "15"]
    with launch(argv, log_dir=tmp_path_factory.mktemp("serve")) as served, sync_playwright() as pw:
        assert CHROMIUM, "Chromium is missing: .ci/run installs Debian's chromium package"
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
        p = browser.new_page()
        errors: list[str] = []
        p.on("pageerror", lambda e: errors.append(str(e)))
        p.goto(served.url + "/")
        p.served, p.errors = served, errors
        yield p
        browser.close()


def _shot(page, name: str) -> None:
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / f"{name}.png"), full_page=True)


def _answer(page, index: int) -> str:
    """The text of the index-th finished answer (answers finish in order)."""
    bubble = page.locator(".assistant[data-done='1']").nth(index)
    bubble.wait_for(timeout=60_000)
    return bubble.evaluate("e => e.firstChild.textContent")


def test_type_a_message_and_see_the_streamed_answer(page) -> None:
    model, tok = _load_model_and_tokenizer(build_parser().parse_args(["serve"]))
    prompt = render(tok, [{"role": "user", "content": "Hello!"}]).tokens
    want = tok.decode(Engine(model).generate([prompt], 256, stop_tokens=stop_tokens(tok))[0])
    page.wait_for_function("() => document.getElementById('model').textContent === 'nano'")
    page.fill("#temperature", "0")
    page.fill("#input", "Hello!")
    page.press("#input", "Enter")
    assert _answer(page, 0) == want and want
    assert page.locator(".user").first.text_content() == "Hello!"
    _shot(page, "chat-answer")
    assert page.errors == []


def test_stop_a_long_answer_then_reset(page) -> None:
    page.fill("#temperature", "1")
    page.fill("#max_tokens", "400")
    page.fill("#input", "Tell me a very long story about a dragon.")
    page.click("#send")
    bubble = page.locator(".assistant").last
    page.wait_for_function("() => { const b = [...document.querySelectorAll('.assistant')].pop();"
                           " return b && b.firstChild && b.firstChild.textContent.length > 20; }")  # fmt: skip
    page.click("#stop")
    page.locator(".assistant[data-done='1']").last.wait_for()
    assert "(stopped)" in bubble.text_content()
    url = page.served.url
    deadline = time.monotonic() + 2.0  # the server frees the row within 2 s of the page's abort (S5)
    while "gemmakit_requests_running 0" not in httpx.get(url + "/metrics").text:
        assert time.monotonic() < deadline, "the aborted request still runs"
        time.sleep(0.05)
    _shot(page, "chat-stopped")
    page.click("#reset")
    assert page.locator(".msg").count() == 0
    page.fill("#temperature", "0")
    page.fill("#max_tokens", "8")
    page.fill("#input", "Hi")
    page.press("#input", "Enter")
    _answer(page, 0)
    assert page.locator(".msg").count() == 2  # a fresh conversation: one question, one answer
    assert page.errors == []


def test_text_is_never_rendered_as_html(page) -> None:
    page.click("#reset")
    payload = '<img src=x onerror="window.pwned = 1"><b id="bold">x</b>'
    page.fill("#max_tokens", "4")
    page.fill("#input", payload)
    page.press("#input", "Enter")
    _answer(page, 0)
    assert page.locator(".user").first.text_content() == payload
    assert page.evaluate("() => window.pwned === undefined && !document.querySelector('#bold, .msg img')")
    js = (HERE.parent / "gemmakit" / "server" / "static" / "chat.js").read_text()
    assert "innerHTML" not in js.replace("never innerHTML", "") and "insertAdjacentHTML" not in js
