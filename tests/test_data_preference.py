"""TRL preference and prompt-only data: every format read alike, implicit prompts extracted, bad rows named
by file:line; and `gemmakit data run` on a preference source judging both answers of every pair."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from gemmakit.data.preference import (
    PreferenceDataError,
    PreferencePair,
    PromptRow,
    parse_preference,
    parse_prompt,
    read_preference_jsonl,
    read_prompt_jsonl,
)
from gemmakit.errors import UserError

U = {"role": "user", "content": "What is 2+2?"}
A_GOOD = {"role": "assistant", "content": "4"}
A_BAD = {"role": "assistant", "content": "5"}


def _write(path: Path, rows: list, raw: str = "") -> Path:
    path.write_text(raw + "".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def test_standard_conversational_and_implicit_rows_read_to_the_same_pair(tmp_path) -> None:
    rows = [
        {"prompt": "What is 2+2?", "chosen": "4", "rejected": "5"},
        {"prompt": [U], "chosen": [A_GOOD], "rejected": [A_BAD]},
        {"chosen": [U, A_GOOD], "rejected": [U, A_BAD]},
    ]
    pairs = read_preference_jsonl(_write(tmp_path / "p.jsonl", rows))
    want = PreferencePair((U,), (A_GOOD,), (A_BAD,))
    assert pairs == [want, want, want]
    assert isinstance(UserError, type) and issubclass(PreferenceDataError, UserError)


def test_implicit_prompt_is_the_longest_common_message_prefix() -> None:
    sys_msg = {"role": "system", "content": "Be brief."}
    turn2 = [{"role": "model", "content": "Hi."}, {"role": "user", "content": "Add 2 and 2."}]
    row = {
        "chosen": [sys_msg, U, *turn2, {"role": "model", "content": "4"}],
        "rejected": [sys_msg, U, *turn2, {"role": "model", "content": "22"}, {"role": "user", "content": "?"},
                     {"role": "model", "content": "Sorry, 4."}],
    }  # fmt: skip
    pair = parse_preference(row, "x:1")
    assert pair.prompt == (sys_msg, U, *turn2)
    assert pair.chosen == ({"role": "model", "content": "4"},)
    assert [m["content"] for m in pair.rejected] == ["22", "?", "Sorry, 4."]
    assert pair.margin is None


def test_margin_extra_keys_bom_and_blank_lines(tmp_path) -> None:
    rows = [{"prompt": "q", "chosen": "a", "rejected": "b", "margin": 2, "id": "r1", "score": 9.5}]
    path = tmp_path / "p.jsonl"
    path.write_text("\ufeff" + json.dumps(rows[0]) + "\n\n   \n", encoding="utf-8")
    [pair] = read_preference_jsonl(path)
    assert pair.margin == 2.0 and isinstance(pair.margin, float)
    # Messages are normalised to exactly role and content.
    extra = {"role": "user", "content": "q", "name": "ann"}
    pair = parse_preference({"prompt": [extra], "chosen": [A_GOOD], "rejected": [A_BAD]}, "x:1")
    assert pair.prompt == ({"role": "user", "content": "q"},)


def test_prompt_rows_all_forms_keep_extra_fields(tmp_path) -> None:
    rows = [
        {"messages": [U], "answer": 4},
        {"prompt": "What is 2+2?", "answer": 4, "meta": {"src": "gsm"}},
        {"prompt": [{"role": "system", "content": "s"}, U]},
    ]
    got = read_prompt_jsonl(_write(tmp_path / "q.jsonl", rows))
    assert got[0] == PromptRow((U,), {"answer": 4})
    assert got[1] == PromptRow((U,), {"answer": 4, "meta": {"src": "gsm"}})
    assert got[2].messages[-1] == U and got[2].extra == {}


BAD_PAIRS = [
    ('{"prompt": "q", "chosen": "a"', "not valid JSON"),
    ("[1, 2]", "expected a JSON object"),
    ('{"prompt": "q", "rejected": "b"}', "chosen: missing"),
    ('{"prompt": "q", "chosen": "a"}', "rejected: missing"),
    ('{"prompt": "q", "chosen": 3, "rejected": "b"}',
     "chosen: expected a string or a list of messages, got int"),
    ('{"prompt": "q", "chosen": "a", "rejected": [{"role": "assistant", "content": "b"}]}',
     "all strings or all message lists"),
    ('{"chosen": "a", "rejected": "b"}', "prompt: missing; text rows need a prompt"),
    ('{"prompt": [], "chosen": [], "rejected": []}', "prompt: expected at least one message"),
    ('{"prompt": [{"role": "user", "content": "q"}], "chosen": [], "rejected": '
     '[{"role": "assistant", "content": "b"}]}', "chosen: expected at least one message"),
    ('{"prompt": [{"role": "assistant", "content": "q"}], "chosen": [{"role": "assistant", "content": "a"}], '
     '"rejected": [{"role": "assistant", "content": "b"}]}', "prompt: must end with a user turn"),
    ('{"prompt": [{"role": "user", "content": "q"}], "chosen": [{"role": "user", "content": "a"}], '
     '"rejected": [{"role": "assistant", "content": "b"}]}',
     "chosen: must end with an assistant or model turn"),
    ('{"prompt": [{"role": "user", "content": "q"}], "chosen": [{"role": "bot", "content": "a"}], '
     '"rejected": [{"role": "assistant", "content": "b"}]}', "chosen[0].role: expected one of"),
    ('{"prompt": [{"role": "user", "content": 1}], "chosen": [{"role": "model", "content": "a"}], '
     '"rejected": [{"role": "model", "content": "b"}]}', "prompt[0].content: expected a string, got int"),
    ('{"prompt": ["q"], "chosen": [{"role": "model", "content": "a"}], "rejected": [{"role": "model", '
     '"content": "b"}]}', "prompt[0]: expected a {role, content} object"),
    ('{"chosen": [{"role": "user", "content": "q"}, {"role": "model", "content": "a"}], '
     '"rejected": [{"role": "user", "content": "q"}, {"role": "model", "content": "a"}]}',
     "chosen: no messages after the prompt"),
    ('{"chosen": [{"role": "user", "content": "q"}, {"role": "model", "content": "a"}, {"role": "user", '
     '"content": "more"}, {"role": "model", "content": "b"}], '
     '"rejected": [{"role": "user", "content": "q"}, {"role": "model", "content": "a"}]}',
     "rejected: no messages after the prompt"),
    ('{"chosen": [{"role": "user", "content": "q"}, {"role": "model", "content": "a"}], '
     '"rejected": [{"role": "user", "content": "other"}, {"role": "model", "content": "a"}]}',
     "share no first message"),
    ('{"prompt": "q", "chosen": "a", "rejected": "b", "margin": "abc"}', "margin: expected a finite number"),
    ('{"prompt": "q", "chosen": "a", "rejected": "b", "margin": NaN}', "margin: expected a finite number"),
    ('{"prompt": "q", "chosen": "a", "rejected": "b", "margin": true}', "margin: expected a finite number"),
]  # fmt: skip


@pytest.mark.parametrize(("line", "message"), BAD_PAIRS)
def test_bad_preference_rows_name_file_line_and_field(tmp_path, line, message) -> None:
    path = tmp_path / "p.jsonl"
    path.write_text('{"prompt": "q", "chosen": "a", "rejected": "b"}\n\n' + line + "\n", encoding="utf-8")
    with pytest.raises(PreferenceDataError) as e:
        read_preference_jsonl(path)
    msg = str(e.value)
    assert msg.startswith(f"{path}:3: ") and message in msg and "\n" not in msg, msg


BAD_PROMPTS = [
    ('{"answer": 3}', 'expected {"messages": [...]} or {"prompt": ...}'),
    ('{"messages": [{"role": "user", "content": "q"}, {"role": "model", "content": "a"}]}',
     "messages: must end with a user turn"),
    ('{"prompt": 7}', "prompt: expected a string or a list of messages"),
    ('{"prompt": "q", "messages": []}', "got both"),
    ('{"prompt": "q", "answer": NaN}', "answer: expected a JSON value"),
    ('"q"', "expected a JSON object"),
]  # fmt: skip


@pytest.mark.parametrize(("line", "message"), BAD_PROMPTS)
def test_bad_prompt_rows_name_file_line_and_field(tmp_path, line, message) -> None:
    path = tmp_path / "q.jsonl"
    path.write_text(line + "\n", encoding="utf-8")
    with pytest.raises(PreferenceDataError) as e:
        read_prompt_jsonl(path)
    assert str(e.value).startswith(f"{path}:1: ") and message in str(e.value), str(e.value)


@pytest.mark.parametrize("reader", [read_preference_jsonl, read_prompt_jsonl])
def test_unreadable_files_are_one_line_errors(tmp_path, reader) -> None:
    (tmp_path / "latin1.jsonl").write_bytes(b'{"prompt": "caf\xe9"}\n')
    (tmp_path / "empty.jsonl").write_text("\n  \n")
    cases = {
        tmp_path / "missing.jsonl": "no such file",
        tmp_path: "is a directory",
        tmp_path / "latin1.jsonl": "not UTF-8",
        tmp_path / "empty.jsonl": "no rows",
    }
    for path, message in cases.items():
        with pytest.raises(PreferenceDataError) as e:
            reader(path)
        assert str(e.value).startswith(str(path)) and message in str(e.value) and "\n" not in str(e.value)


def test_parse_functions_take_objects_directly() -> None:
    assert parse_prompt({"prompt": "hi"}, "x:1").messages == ({"role": "user", "content": "hi"},)
    with pytest.raises(PreferenceDataError, match=r"^here:9: expected a JSON object"):
        parse_preference(None, "here:9")


# ---- the data pipeline: format = "preference" -------------------------------------------------------

PIPE_RECIPE = """
[pipeline]
shards = {shards}
workers = 1

[[source]]
name = "prefs"
format = "preference"
paths = ["prefs.jsonl"]

[[stage]]
kind = "self_identification"

[[stage]]
kind = "toxicity"
classifier = ""
lexicon = ["idiot"]
turns = "model"

[[stage]]
kind = "pii"

[[stage]]
kind = "dedup"
method = "exact"

[output]
tokenizer = "{tokenizer}"
"""


def _pair(i: int, prompt: str, chosen: str, rejected: str, **kw: object) -> dict:
    return {"id": f"p{i}", "prompt": prompt, "chosen": chosen, "rejected": rejected, **kw}


PIPE_ROWS = [
    _pair(0, "Who are you?", "I am Gemma, an open model.", "I am ChatGPT, made by OpenAI."),  # self-id
    _pair(1, "Say something about Bob.", "Bob is kind.", "Bob is an idiot."),  # toxic rejected
    _pair(2, "My card?", "Your card is 4111 1111 1111 1111.", "I cannot see it."),  # sensitive PII
    _pair(3, "Email ann@example.com please.", "Done, I wrote to ann@example.com.", "No."),  # redacted, kept
    _pair(4, "What is 2+2?", "4", "5", margin=1.5),
    _pair(5, "what is 2+2?", "4", "5  "),  # duplicate of p4 after normalisation
    _pair(6, "What is 2+2?", "Four.", "5"),  # same prompt, other pair: kept
    {
        "id": "p7",
        "chosen": [U, A_GOOD],
        "rejected": [U, {"role": "model", "content": "Ask an idiot."}],
    },  # toxic
    {
        "id": "p8",
        "prompt": "My idiot boss?",
        "chosen": "Try talking to them.",
        "rejected": "Quit.",
    },  # user only
]


def _run_pipeline(
    tmp_path: Path, rows: list, shards: int = 2, tokenizer: str = "", bad: str = ""
) -> tuple[dict, list]:
    from gemmakit.data.pipeline import run
    from gemmakit.data.recipe import load_recipe

    (tmp_path / "prefs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows) + bad, encoding="utf-8")
    recipe = tmp_path / "r.toml"
    recipe.write_text(PIPE_RECIPE.format(shards=shards, tokenizer=tokenizer), encoding="utf-8")
    stats = run(load_recipe(recipe), tmp_path / "out")
    parts = sorted((tmp_path / "out" / "kept").glob("part-*.jsonl"))
    return stats, parts


def test_pipeline_judges_both_answers_and_counts_drops_by_reason(tmp_path) -> None:
    stats, parts = _run_pipeline(tmp_path, PIPE_ROWS)
    t = stats["total"]
    assert t["dropped"] == {"self_identification": 1, "toxicity_lexicon": 2, "pii_card": 1, "dedup_exact": 1}
    assert t["docs_in"] == 9 and t["kept"] == 4 and t["modified"] == {"pii_redacted": 1}
    kept = [json.loads(x) for p in parts for x in p.read_text(encoding="utf-8").splitlines()]
    assert [r["id"] for r in kept] == ["p3", "p4", "p6", "p8"]
    by_id = {r["id"]: r for r in kept}
    assert by_id["p3"]["prompt"] == [{"role": "user", "content": "Email <EMAIL> please."}]
    assert by_id["p3"]["chosen"] == [{"role": "assistant", "content": "Done, I wrote to <EMAIL>."}]
    assert by_id["p4"]["margin"] == 1.5 and "margin" not in by_id["p6"]
    assert all(r["corpus"] == "prefs" for r in kept)
    # The report's example of a drop is the failing answer's conversation.
    [example] = stats["examples"]["self_identification"]
    assert "ChatGPT" in example["text"] and "Gemma" not in example["text"]
    # The kept rows are what the preference trainers read.
    pairs = [p for part in parts if part.stat().st_size for p in read_preference_jsonl(part)]
    assert len(pairs) == 4 and pairs[1] == PreferencePair(
        (U,), (A_GOOD,), ({"role": "assistant", "content": "5"},), 1.5
    )


def test_pipeline_quarantines_bad_preference_rows_and_writes_no_tokens(tmp_path) -> None:
    bad = '{"prompt": "q", "chosen": 3, "rejected": "b"}\n{"chosen": "a", "rejected": "b"}\nnot json\n'
    stats, _ = _run_pipeline(tmp_path, PIPE_ROWS[4:5], shards=1, tokenizer="nano", bad=bad)
    t = stats["total"]
    assert t["malformed"] == {"bad_preference": 2, "invalid_json": 1} and t["kept"] == 1
    assert t["docs_in"] == t["kept"] + sum(t["dropped"].values()) + sum(t["malformed"].values())
    q = [
        json.loads(x)
        for p in (tmp_path / "out" / "quarantine").glob("*.jsonl")
        for x in p.read_text().splitlines()
    ]
    assert sorted((e["line"], e["category"]) for e in q) == [(2, "bad_preference"), (3, "bad_preference"),
                                                             (4, "invalid_json")]  # fmt: skip
    assert stats["total"].get("tokens", 0) == 0


def test_cli_data_run_on_a_preference_source(tmp_path) -> None:
    (tmp_path / "prefs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in PIPE_ROWS), encoding="utf-8")
    (tmp_path / "r.toml").write_text(PIPE_RECIPE.format(shards=1, tokenizer=""), encoding="utf-8")
    proc = subprocess.run([sys.executable, "-m", "gemmakit.cli", "data", "run", "--recipe", "r.toml",
                           "--output", "out"], capture_output=True, text=True, cwd=tmp_path)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    stats = json.loads((tmp_path / "out" / "stats.json").read_text())
    assert stats["total"]["kept"] == 4 and stats["total"]["dropped"]["toxicity_lexicon"] == 2
    assert "toxicity_lexicon" in (tmp_path / "out" / "report.md").read_text()
