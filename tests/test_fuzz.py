"""The fuzz targets of fuzz/targets.py in CI (reliability F2): every checked-in seed and crasher, then
inputs made by Hypothesis. A target raises only the errors its surface documents; anything else, or
a broken invariant, fails here. The 10^5-run coverage-guided campaigns are fuzz/run.py's (atheris)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "fuzz"))
import targets  # noqa: E402

from gemmakit.server.protocol import CHAT_FIELDS, COMPLETION_FIELDS  # noqa: E402

SETTINGS = settings(
    max_examples=1000, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck)
)


@pytest.mark.parametrize("target", sorted(targets.TARGETS))
def test_every_seed_and_past_crasher_passes(target: str) -> None:
    seeds = targets.seeds(target)
    assert seeds, f"fuzz/seeds/{target} is empty"
    for seed in seeds:
        targets.TARGETS[target](seed.read_bytes())


# JSON values near what the checker expects: the API's field names, numbers at the edges
_scalars = st.one_of(st.none(), st.booleans(), st.integers(-(2**64), 2**64), st.sampled_from([0, 1, -1, 0.5, 1e-324, 1e308]),
                     st.floats(allow_nan=False, allow_infinity=False), st.text(max_size=20))  # fmt: skip
_values = st.recursive(_scalars, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(
    st.sampled_from(["role", "content", "type", "text", "schema", "json_schema", "include_usage", "0", "5"]) | st.text(max_size=5),
    inner, max_size=4), max_leaves=12)  # fmt: skip
_message = st.fixed_dictionaries({"role": st.sampled_from(["user", "assistant", "system", "tool", 3]),
                                  "content": st.text(max_size=30) | _values})  # fmt: skip


@st.composite
def _bodies(draw) -> bytes:
    chat = draw(st.booleans())
    fields = sorted(CHAT_FIELDS if chat else COMPLETION_FIELDS) + ["bogus"]
    body = draw(st.dictionaries(st.sampled_from(fields), _values, max_size=6))
    if chat and draw(st.booleans()):
        body["messages"] = draw(st.lists(_message, min_size=1, max_size=3))
    if not chat and draw(st.booleans()):
        body["prompt"] = draw(
            st.text(max_size=40) | st.lists(st.integers(-5, 10_000), min_size=1, max_size=8)
        )
    return bytes([0 if chat else 1]) + json.dumps(body).encode()


@given(_bodies())
@SETTINGS
def test_request_bodies_get_a_job_or_an_api_error(data: bytes) -> None:
    targets.request(data)


@given(st.binary(max_size=300))
@SETTINGS
def test_raw_bytes_as_a_request_body(data: bytes) -> None:
    targets.request(data)


@given(st.integers(0, 3), st.lists(st.text(min_size=1, max_size=4), max_size=3), st.binary(max_size=200))
@SETTINGS
def test_stop_strings_never_reach_the_client(n: int, stops: list[str], ids: bytes) -> None:
    targets.text_stream(bytes([n]) + b"\xff".join(s.encode() for s in stops[:n]) + b"\xff" + ids)


_line = st.one_of(st.binary(max_size=40), st.builds(lambda v: json.dumps(v).encode(), _values),
                  st.just(b'{"text": "ok"}'), st.just(b'{"messages": [{"role": "user", "content": "x"}]}'))  # fmt: skip


@given(st.integers(0, 2), st.lists(_line, max_size=8), st.sampled_from([b"\n", b"\r\n"]))
@SETTINGS
def test_every_jsonl_line_is_counted_once(mode: int, lines: list[bytes], sep: bytes) -> None:
    targets.jsonl(bytes([mode]) + sep.join(lines))
