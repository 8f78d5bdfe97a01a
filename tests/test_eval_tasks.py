"""The task framework: registry, data files, protocols, few-shot sampling, task logic and run_task.

Task logic is checked against lm-eval 0.4.13's own functions where it has them (HellaSwag cleanup,
GSM8K's regex filters and exact match, its few-shot sampler); the end-to-end agreement on a model is
tests/test_eval_lmeval_agreement.py.
"""

from __future__ import annotations

import gzip
import json
import math
import random
from dataclasses import replace

import pytest
from eval_helpers import one_line_error, write_samples

from gemmakit.eval.lm import LM, GenerateRequest, LoglikelihoodRequest
from gemmakit.eval.tasks import (
    PROTOCOLS,
    TASKS,
    Protocol,
    TaskProtocol,
    get_protocol,
    get_task,
    read_rows,
    run_task,
    sample_fewshot,
)
from gemmakit.eval.tasks.gsm8k import FLEXIBLE, STRICT, extract
from gemmakit.eval.tasks.hellaswag import preprocess


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    write_samples(root)
    return root


# ---- registry, files, protocols --------------------------------------------------------------------


def test_registry_is_explicit_and_lazy():
    # the Gemma 1 report's benchmarks (Table 6), ARC split into its two sets as lm-eval does
    report = {"mmlu", "hellaswag", "piqa", "siqa", "boolq", "winogrande", "commonsense_qa", "openbookqa",
              "arc_easy", "arc_challenge", "triviaqa", "nq_open", "humaneval", "mbpp", "gsm8k", "math",
              "agieval", "bbh"}  # fmt: skip
    # the reports' safety benchmarks (Gemma 1.1 Table 8), with BBQ, BOLD and WinoBias also by part
    safety = {"realtoxicityprompts", "bold", "bold_gender", "bold_political_ideology", "bold_profession",
              "bold_race", "bold_religious_ideology", "crows_pairs", "bbq", "bbq_ambig", "bbq_disambig",
              "winogender", "winobias", "winobias_1_2", "winobias_2_2", "winobias_type1_pro",
              "winobias_type1_anti", "winobias_type2_pro", "winobias_type2_anti", "truthfulqa", "toxigen"}  # fmt: skip
    assert set(TASKS) == report | safety and len(set(TASKS)) == len(TASKS)
    for name in TASKS:
        task = get_task(name)
        assert task.name == name and task.primary_metric in task.metrics
    one_line_error(lambda: get_task("mmlu_pro_max"), "mmlu_pro_max", "arc_easy", "winogrande")


def test_expected_files_are_the_upstream_paths(tmp_path):
    files = {
        name: [
            str(p.relative_to(tmp_path)) if p.is_relative_to(tmp_path) else str(p)
            for p in get_task(name).expected_files(tmp_path)
        ]  # fmt: skip
        for name in TASKS
    }
    assert files["arc_easy"] == ["allenai/ai2_arc/ARC-Easy/test-00000-of-00001.parquet",
                                 "allenai/ai2_arc/ARC-Easy/train-00000-of-00001.parquet"]  # fmt: skip
    assert files["hellaswag"][0] == "Rowan/hellaswag/data/validation-00000-of-00001.parquet"
    assert files["winogrande"][0] == "allenai/winogrande/winogrande_xl/validation-00000-of-00001.parquet"
    assert files["gsm8k"] == ["openai/gsm8k/main/test-00000-of-00001.parquet",
                              "openai/gsm8k/main/train-00000-of-00001.parquet"]  # fmt: skip
    assert files["boolq"][0] == "aps/super_glue/boolq/validation-00000-of-00001.parquet"


def test_missing_data_names_every_expected_file(tmp_path):
    task = get_task("gsm8k")
    expected = [str(p) for p in task.expected_files(tmp_path)]
    one_line_error(lambda: task.load(tmp_path, "test"), *expected, "openai/gsm8k")


def test_read_rows_detects_formats_by_magic_bytes(tmp_path, data_dir):
    rows = [{"question": "q1", "answer": "#### 1"}, {"question": "q2", "answer": "#### 2"}]
    text = "".join(json.dumps(r) + "\n" for r in rows)
    (tmp_path / "a.parquet").write_text(text)  # the name lies: JSON lines inside
    (tmp_path / "b.jsonl").write_bytes(gzip.compress(text.encode()))
    (tmp_path / "c.bin").write_bytes(
        (data_dir / "openai/gsm8k/main/test-00000-of-00001.parquet").read_bytes()
    )
    assert read_rows(tmp_path / "a.parquet") == rows == read_rows(tmp_path / "b.jsonl")
    assert len(read_rows(tmp_path / "c.bin")) == 20
    (tmp_path / "bad.jsonl").write_text('{"a": 1}\n{"a": \n')
    one_line_error(lambda: read_rows(tmp_path / "bad.jsonl"), "bad.jsonl:2")
    (tmp_path / "zip.bin").write_bytes(b"PK\x03\x04rest")
    one_line_error(lambda: read_rows(tmp_path / "zip.bin"), "zip.bin", "PK")
    (tmp_path / "trunc.parquet").write_bytes(b"PAR1 and nothing else")
    one_line_error(lambda: read_rows(tmp_path / "trunc.parquet"), "trunc.parquet", "Parquet")


def test_protocols_follow_the_reports():
    shots = {name: {t: p.num_fewshot for t, p in proto.tasks.items()} for name, proto in PROTOCOLS.items()}
    # reference §3.2: HellaSwag 0 -> 10 shots, ARC-c 25, WinoGrande 5-shot in Gemma 3, GSM8K 8-shot
    assert (shots["gemma1"]["hellaswag"], shots["gemma2"]["hellaswag"], shots["gemma3"]["hellaswag"]) == (
        0,
        10,
        10,
    )
    assert (shots["gemma2"]["arc_challenge"], shots["gemma3"]["arc_challenge"]) == (25, 25)
    assert (shots["gemma2"]["winogrande"], shots["gemma3"]["winogrande"]) == (0, 5)
    assert (shots["gemma1"]["gsm8k"], shots["gemma2"]["gsm8k"], shots["gemma3"]["gsm8k"]) == (5, 5, 8)
    assert all(shots[g]["boolq"] == 0 for g in ("gemma1", "gemma2", "gemma3"))
    for proto in PROTOCOLS.values():
        for task_name, setting in proto.tasks.items():
            assert setting.metric in get_task(task_name).metrics
    lm_eval = get_protocol("lm-eval")
    assert lm_eval.for_task(get_task("gsm8k")).num_fewshot == 5
    assert lm_eval.for_task(get_task("hellaswag")) == TaskProtocol(0, "acc_norm", "lm-eval 0.4.13 default")
    one_line_error(lambda: get_protocol("gemma4"), "gemma4", "gemma1", "lm-eval")
    one_line_error(lambda: Protocol("x", {}).for_task(get_task("boolq")), "boolq", "'x'")


# ---- task logic against lm-eval's functions --------------------------------------------------------


def test_hellaswag_cleanup_matches_lm_eval(data_dir):
    pytest.importorskip("lm_eval")
    import datasets
    from lm_eval.tasks.hellaswag import utils

    for text in [" A [title] B [step] c  d ", "[header] x", "no brackets", "a  [x]  b", "  ", "x [title]"]:
        assert preprocess(text) == utils.preprocess(text)
    task = get_task("hellaswag")
    ours = task.load(data_dir, "validation")
    raw = read_rows(data_dir / task.repo / task.files["validation"])
    theirs = list(utils.process_docs(datasets.Dataset.from_list(raw)))
    assert ours == theirs


def test_gsm8k_scoring_matches_lm_eval():
    pytest.importorskip("lm_eval")
    from lm_eval.api.metrics import exact_match_hf_evaluate
    from lm_eval.filters.extraction import RegexFilter

    ignore = [",", "\\$", "(?s).*#### ", "\\.$"]
    gold = "Natalia sold 48/2 = <<48/2=24>>24 clips.\n#### 1,072"
    responses = [
        " 1072 clips.\n#### 1,072", " #### 1072.", " $1,072", " It is 1072", "#### -3.5 then #### 1072",
        " 10 72", "", " no number", " 1,072.00", " 48 and then 1072.", " #### $1,072", "1072",
    ]  # fmt: skip
    task = get_task("gsm8k")
    scores = [task.score({"question": "q", "answer": gold}, [r]) for r in responses]
    for pattern, select, name in ((STRICT, 0, "strict"), (FLEXIBLE, -1, "flexible")):
        reference = RegexFilter(regex_pattern=pattern.pattern, group_select=select)
        extracted = [r[0] for r in reference.apply([[r] for r in responses], [{}] * len(responses))]
        assert [extract(r, pattern, select) for r in responses] == extracted, name
        for value, score in zip(extracted, scores, strict=True):
            expected = exact_match_hf_evaluate([value], [gold], regexes_to_ignore=ignore, ignore_case=True)
            assert score[f"exact_match_{name}"] == expected["exact_match"], (name, value)
    for metric in ("exact_match_strict", "exact_match_flexible"):
        assert {s[metric] for s in scores} == {0.0, 1.0}


def test_fewshot_sampler_matches_lm_eval():
    pytest.importorskip("lm_eval")
    from lm_eval.api.samplers import ContextSampler

    pool = [{"i": i} for i in range(15)] + [{"i": 3}]  # a duplicate of doc 3
    docs = [{"i": i} for i in (3, 20, 7, 3)]
    for exclude in (False, True):
        reference = ContextSampler(pool, rnd=1234)
        ours = random.Random(1234)
        for n in (0, 1, 4, 14):
            for doc in docs:
                expected = reference.sample(n, eval_doc=doc if exclude else None)
                assert sample_fewshot(pool, n, ours, doc, exclude) == expected, (exclude, n, doc)
    one_line_error(lambda: sample_fewshot(pool[:3], 3, random.Random(0), docs[0], True), "4", "3")


def test_prompts_follow_lm_eval_templates(data_dir):
    arc, wino, boolq = get_task("arc_easy"), get_task("winogrande"), get_task("boolq")
    doc = {"question": "Why?", "choices": {"text": ["a b", "c"], "label": ["1", "2"]}, "answerKey": "2"}
    assert arc.build(doc, [doc]) == [
        LoglikelihoodRequest("Question: Why?\nAnswer: c\n\nQuestion: Why?\nAnswer:", " a b"),
        LoglikelihoodRequest("Question: Why?\nAnswer: c\n\nQuestion: Why?\nAnswer:", " c"),
    ]
    w = {"sentence": "Ann hit Bo because _ was mad.", "option1": "Ann", "option2": "Bo", "answer": "2"}
    assert wino.build(w, [w]) == [
        LoglikelihoodRequest("Ann hit Bo because Bo was mad.\n\nAnn hit Bo because Ann", " was mad."),
        LoglikelihoodRequest("Ann hit Bo because Bo was mad.\n\nAnn hit Bo because Bo", " was mad."),
    ]
    b = {"passage": "P.", "question": "is it", "label": 1, "idx": 0}
    assert [r.continuation for r in boolq.build(b, [])] == [" no", " yes"]
    assert boolq.build(b, [])[0].context == "P.\nQuestion: is it?\nAnswer:"
    one_line_error(lambda: wino.build({**w, "answer": ""}, []), "answer ''")
    one_line_error(lambda: arc.gold({**doc, "answerKey": "E"}), "answerKey 'E'")
    one_line_error(lambda: arc.build({"question": "x"}, []), "no field 'choices'")


# ---- run_task ------------------------------------------------------------------------------------


class ScriptedLM(LM):
    """A deterministic stand-in model (the code under test is run_task, not a model)."""

    name = "scripted"

    def __init__(self) -> None:
        self.calls: list[str] = []

    def loglikelihood(self, requests):
        self.calls.append("loglikelihood")
        return [(-float(len(r.continuation) % 7), len(r.context) % 2 == 0) for r in requests]

    def loglikelihood_rolling(self, requests):
        raise AssertionError("no task here needs it")

    def generate_until(self, requests):
        self.calls.append("generate_until")
        return [f" so #### {len(r.prompt) % 3}" for r in requests]

    def token_count(self, text):
        return len(text.split())


def test_run_task_batches_by_type_and_aggregates(data_dir):
    from statistics import fmean, stdev

    lm = ScriptedLM()
    result = run_task("arc_easy", lm, data_dir, "gemma2", limit=7)
    assert lm.calls == ["loglikelihood"] and result.n == 7 and result.num_fewshot == 0
    assert (result.task, result.protocol, result.primary_metric) == ("arc_easy", "gemma2", "acc_norm")
    for metric in ("acc", "acc_norm"):
        values = [s.scores[metric] for s in result.samples]
        assert result.metrics[metric] == fmean(values)
        assert math.isclose(result.stderr[metric], stdev(values) / math.sqrt(7), rel_tol=1e-12)
    lm = ScriptedLM()
    protocol = replace(get_protocol("gemma3"), max_gen_tokens=3)
    result = run_task(get_task("gsm8k"), lm, data_dir, protocol, limit=4)
    assert lm.calls == ["generate_until"] and result.num_fewshot == 8
    request = result.samples[0].requests[0]
    assert isinstance(request, GenerateRequest) and request.max_tokens == 3
    assert request.prompt.count("Question:") == 9 and request.prompt.endswith("\nAnswer:")
    assert math.isnan(run_task("boolq", ScriptedLM(), data_dir, limit=1).stderr["acc"])
    one_line_error(lambda: run_task("boolq", lm, data_dir, limit=0), "limit")
    assert run_task("winogrande", ScriptedLM(), data_dir, "gemma3", limit=2).num_fewshot == 5
    too_many = Protocol("p", {"hellaswag": TaskProtocol(20, "acc")})
    one_line_error(lambda: run_task("hellaswag", lm, data_dir, too_many), "20-shot", "need 21", "has 12")
    one_line_error(
        lambda: run_task("boolq", lm, data_dir, Protocol("p", {"boolq": TaskProtocol(0, "f1")})), "f1"
    )
