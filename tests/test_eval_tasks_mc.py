"""MMLU, PIQA, SIQA, CommonsenseQA, OpenBookQA, AGIEval (English), TriviaQA and NQ-Open against
lm-evaluation-harness 0.4.13, on small generated samples in the upstream layouts (tests/eval_samples_mc.py).

- Files: every task names its upstream files; patterns (PIQA, SIQA, AGIEval) match plain, hash-suffixed
  and sharded names and skip huggingface-cli's .cache/; missing data is a one-line error naming them.
- Tables copied from lm-eval are checked against its own YAMLs (57 MMLU subjects and their
  descriptions, the 10 agieval_en subsets).
- Scoring: crafted answers scored by our tasks and by lm-eval's own filters + process_results
  (TriviaQA/NQ exact match with aliases, case, punctuation and articles; AGIEval's math parser; its
  multi-gold multiple choice).
- Agreement: one random tiny Gemma 2 (tests/eval_helpers.tiny_pair) evaluated by lm-eval's HFLM through
  its own task YAMLs (`include`d, only the dataset location overridden; MMLU and AGIEval as groups of
  their renamed subtasks with the upstream aggregation) and by `run_task(..., GemmaLM)`: per document
  the same prompt strings, per request log-likelihoods within 1e-5 (1e-6 relative for long ones) and
  the same generations, per task the same scores (groups: to 1e-12, lm-eval sums size-weighted subtask
  means); generations, is-greedy flags and scores wherever no near-tie lets float32 rounding decide
  (eval_helpers.TIE_GAP). 0-shot (lm-eval's defaults) and 2-shot runs, the latter covering MMLU's
  fixed first-n examples with its subject description, NQ's description and "\\n" delimiter, and
  lm-eval's drop of the evaluated document from the few-shot pool (CommonsenseQA's train split holds
  one validation document).
- AGIEval few-shot, which lm-eval cannot run, is checked against prompts written out by hand.
"""

from __future__ import annotations

import json
import math
import shutil
from dataclasses import replace
from pathlib import Path

import pytest
from eval_helpers import intra_op_threads, ll_tolerance, lmeval_evaluate, one_line_error, unsettled_docs
from eval_samples_mc import AGIEVAL_SUBSETS, AGIEVAL_TEST, MMLU_COMPARED, MMLU_TEST, write_mc_samples

from gemmakit.eval.tasks import Protocol, TaskProtocol, get_protocol, read_rows, run_task
from gemmakit.eval.tasks.agieval import AGIEval, agieval_equiv, parse_math_answer
from gemmakit.eval.tasks.closed_book import NQOpen, TriviaQA
from gemmakit.eval.tasks.commonsense_qa import CommonsenseQA
from gemmakit.eval.tasks.mmlu import MMLU, SUBJECTS, description
from gemmakit.eval.tasks.openbookqa import OpenBookQA
from gemmakit.eval.tasks.piqa import PIQA
from gemmakit.eval.tasks.siqa import SIQA
from gemmakit.eval.tasks.upstream import match_files

TASKS = {"mmlu": MMLU, "piqa": PIQA, "siqa": SIQA, "commonsense_qa": CommonsenseQA, "openbookqa": OpenBookQA,
         "agieval": AGIEval, "triviaqa": TriviaQA, "nq_open": NQOpen}  # fmt: skip
UPSTREAM_YAML = {"piqa": "piqa/piqa.yaml", "siqa": "siqa/siqa.yaml", "nq_open": "nq_open/nq_open.yaml",
                 "commonsense_qa": "commonsense_qa/default.yaml", "openbookqa": "openbookqa/openbookqa.yaml",
                 "triviaqa": "triviaqa/default.yaml"}  # fmt: skip
GENERATIVE = ("triviaqa", "nq_open")
GEN_TOKENS = 16  # TriviaQA/NQ generation budget on both sides (lm-eval's default is 256)
SHOTS = {"piqa": 2, "siqa": 2, "commonsense_qa": 2, "openbookqa": 2, "triviaqa": 2, "nq_open": 2, "mmlu": 2}
RUNS = [(task, 0) for task in TASKS] + list(SHOTS.items())  # (task, shots; 0 = lm-eval's default)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("mc_data")
    write_mc_samples(root)
    return root


# ---- files -------------------------------------------------------------------------------------------


def test_expected_files_are_the_upstream_paths(tmp_path, data_dir):
    def rel(task, root):
        return [str(p.relative_to(root)) for p in task.expected_files(root)]

    mmlu = rel(MMLU(), tmp_path)
    assert len(mmlu) == 114 and mmlu[0] == "cais/mmlu/abstract_algebra/test-00000-of-00001.parquet"
    assert mmlu[57:59] == ["cais/mmlu/abstract_algebra/dev-00000-of-00001.parquet",
                           "cais/mmlu/anatomy/dev-00000-of-00001.parquet"]  # fmt: skip
    assert rel(CommonsenseQA(), tmp_path) == [f"tau/commonsense_qa/data/{s}-00000-of-00001.parquet"
                                              for s in ("validation", "train")]  # fmt: skip
    assert rel(OpenBookQA(), tmp_path)[0] == "allenai/openbookqa/main/test-00000-of-00001.parquet"
    assert (
        rel(TriviaQA(), tmp_path)[0] == "mandarjoshi/trivia_qa/rc.nocontext/validation-00000-of-00001.parquet"
    )
    assert (
        rel(NQOpen(), tmp_path)[1] == "google-research-datasets/nq_open/nq_open/train-00000-of-00001.parquet"
    )
    # patterns until the files are there, then the files themselves (shards in order)
    assert rel(PIQA(), tmp_path) == ["baber/piqa/**/validation[-_.]*", "baber/piqa/**/train[-_.]*"]
    assert rel(AGIEval(), tmp_path)[3] == "hails/agieval-lsat-ar/**/test[-_.]*"
    assert rel(PIQA(), data_dir) == ["baber/piqa/validation.parquet", "baber/piqa/train.parquet"]
    assert rel(SIQA(), data_dir)[0] == "lighteval/siqa/data/validation-00000-of-00001-5e2c1a7d.parquet"
    agieval = rel(AGIEval(), data_dir)
    assert len(agieval) == 11 and agieval[5:7] == [
        "hails/agieval-lsat-rc/data/test-00000-of-00002.parquet",
        "hails/agieval-lsat-rc/data/test-00001-of-00002.parquet",
    ]
    assert all(p.is_file() for name in TASKS for p in TASKS[name]().expected_files(data_dir))


def test_missing_data_is_one_line_error_naming_the_files(tmp_path, data_dir):
    one_line_error(lambda: PIQA().load(tmp_path, "validation"), "baber/piqa/**/validation[-_.]*",
                    "baber/piqa/**/train[-_.]*", str(tmp_path / "baber/piqa"))  # fmt: skip
    shutil.copytree(data_dir / "cais", tmp_path / "cais")
    assert len(MMLU().load(tmp_path, "test")) == 57 + sum(n - 1 for n in MMLU_TEST.values())
    gone = tmp_path / "cais/mmlu/virology/test-00000-of-00001.parquet"
    gone.unlink()
    message = one_line_error(lambda: MMLU().load(tmp_path, "test"), str(gone), "cais/mmlu")
    assert "anatomy" not in message  # only what is missing


def test_pattern_matching_reads_shards_in_order_and_skips_hidden_folders(tmp_path):
    root = tmp_path / "owner/repo"
    (root / "data").mkdir(parents=True)
    (root / "data/test-00001-of-00002.jsonl").write_text('{"query": "second"}\n')
    (root / "data/test-00000-of-00002.jsonl").write_text('{"query": "first"}\n')
    meta = root / ".cache/huggingface/download/data/test-00000-of-00002.jsonl"
    meta.parent.mkdir(parents=True)
    meta.write_text('{"query": "not data"}\n')  # huggingface-cli's bookkeeping copy
    (root / "data/test-00000-of-00002.jsonl.lock").write_text("")
    found = match_files(root, "**/test[-_.]*")
    assert [p.name for p in found] == ["test-00000-of-00002.jsonl", "test-00001-of-00002.jsonl"]
    assert [r["query"] for p in found for r in read_rows(p)] == ["first", "second"]
    (root / "test.jsonl").write_text('{"query": "elsewhere"}\n')
    one_line_error(lambda: match_files(root, "**/test[-_.]*"), "several folders", str(root / "data"))


# ---- tables copied from lm-eval ------------------------------------------------------------------------


def _lmeval_tasks_dir() -> Path:
    lm_eval_tasks = pytest.importorskip("lm_eval.tasks")
    return Path(lm_eval_tasks.__file__).parent


def test_mmlu_subjects_and_descriptions_are_lmevals():
    import yaml

    configs = [
        yaml.safe_load(p.read_text()) for p in sorted((_lmeval_tasks_dir() / "mmlu/default").glob("mmlu_*"))
    ]
    assert tuple(c["dataset_name"] for c in configs) == SUBJECTS
    assert all(description(c["dataset_name"]) == c["description"] for c in configs)


def test_agieval_subsets_are_lmevals_english_group():
    import yaml

    group = yaml.safe_load((_lmeval_tasks_dir() / "agieval/agieval_en.yaml").read_text())
    assert [f"agieval_{s.replace('-', '_')}" for s in AGIEVAL_SUBSETS] == group["task"]
    assert AGIEval.subsets == AGIEVAL_SUBSETS
    assert group["aggregate_metric_list"] == [
        {"metric": "acc", "aggregation": "mean", "weight_by_size": True}
    ]


# ---- scoring against lm-eval's own filters and process_results ----------------------------------------

ANSWERS = ["said data", " Said Data", "The said data.", "THE SAID DATA", "said data!", "the  said data",
           "said", "", " ", "!!", "a said data", "Said Data\n", "said-data", "An said data"]  # fmt: skip
MATH_ANSWERS = ["\\boxed{\\frac{1}{2}}", "$x = 1/2$", "so x = 0.5.", "The answer is 2", "\\boxed 3",
                "\\boxed{x=3}", "$$ 7", "3/4", "x/2", "\\frac12", "\\sqrt2 = \\sqrt{2}", "4 \\text{ cm}",
                "\\boxed{\\text{ a } \\text{ b }}", "no number", "", "$1$ and $\\frac{3}{4}$", "\\fbox{3}",
                "$ x / 2$"]  # fmt: skip
MATH_GOLDS = ["\\frac{1}{2}", "3", "3/4", "\\sqrt{2}", "x/2", "$x/2$", "4", "7"]


def _write_lmeval_yaml(
    yaml_dir: Path, name: str, include: str, files: dict, cache_dir: Path, **extra
) -> None:
    """An lm-eval task config: the upstream YAML `include`d with only the dataset location overridden."""
    config = {"include": str(_lmeval_tasks_dir() / include), "task": name, "tag": "gemmakit_mc",
              "dataset_path": "parquet", "dataset_name": None,
              "dataset_kwargs": {"data_files": files, "cache_dir": str(cache_dir)}, **extra}  # fmt: skip
    (yaml_dir / f"{name}.yaml").write_text(json.dumps(config, indent=1))  # JSON is YAML


def _lmeval_task(tmp_path: Path, name: str, include: str, files: dict):
    from lm_eval.tasks import TaskManager

    _write_lmeval_yaml(tmp_path, name, include, files, tmp_path / "cache")
    return TaskManager(include_path=str(tmp_path), include_defaults=False).load([name])["tasks"][name]


def _lmeval_score(task, doc: dict, responses: list) -> dict:
    """lm-eval's scoring of one document: its filters on the responses, then process_results."""
    from lm_eval.api.instance import Instance

    instances = [Instance(task.OUTPUT_TYPE, doc, (), i, resps=[r]) for i, r in enumerate(responses)]
    (ensemble,) = task._filters
    ensemble.apply(instances)
    return task.process_results(doc, [inst.filtered_resps[ensemble.name] for inst in instances])


@pytest.mark.parametrize("name", GENERATIVE)
def test_exact_match_scoring_matches_lmeval(name, tmp_path, data_dir):
    ours = TASKS[name]()
    files = {s: [str(data_dir / ours.repo / f)] for s, f in ours.files.items()}
    theirs = _lmeval_task(tmp_path, f"gk_score_{name}", UPSTREAM_YAML[name], files)
    docs = ours.load(data_dir, "validation")[:3]
    said = ["Said-Data", "x"]
    docs[1] = {**docs[1], "answer": {**docs[1]["answer"], "aliases": said} if name == "triviaqa" else said}
    hits = 0
    for doc in docs:
        for answer in ANSWERS + [ref.upper() + " " for ref in ours.references(doc)]:
            expected = _lmeval_score(theirs, doc, [answer])["exact_match"]
            assert ours.score(doc, [answer])["exact_match"] == expected, (doc["question"], answer)
            hits += expected
    assert 10 < hits < 3 * (len(ANSWERS) + 4) - 10  # the cases discriminate


def test_agieval_scoring_matches_lmeval(tmp_path, data_dir):
    ours = AGIEval()
    docs = ours.load(data_dir, "test")
    files = {"test": [str(p) for p in ours.split_files(data_dir, "test", "math")]}
    math_task = _lmeval_task(tmp_path, "gk_score_agieval_math", "agieval/math.yaml", files)
    math_doc = next(d for d in docs if d["_subset"] == "math")
    results = []
    for gold in MATH_GOLDS:
        doc = {**math_doc, "answer": gold}
        for answer in MATH_ANSWERS + MATH_GOLDS:
            expected = _lmeval_score(math_task, doc, [answer])["acc"]
            assert ours.score(doc, [answer])["acc"] == expected == agieval_equiv(answer, gold), (answer, gold)
            results.append(expected)
    assert 10 < sum(results) < len(results) - 10
    assert parse_math_answer("\\boxed{x = 3}") == "3" and parse_math_answer("\\frac{1}{2}") == "2"
    files = {"test": [str(p) for p in ours.split_files(data_dir, "test", "aqua-rat")]}
    mc_task = _lmeval_task(tmp_path, "gk_score_agieval_mc", "agieval/aqua-rat.yaml", files)
    doc = {**next(d for d in docs if d["_subset"] == "aqua-rat"), "gold": [1, 3]}
    for lls in (
        [-1.0, -0.5, -3.0, -2.0, -9.0],
        [-1.0, -2.5, -3.0, -0.2, -9.0],
        [-0.1, -0.5, -3.0, -2.0, -9.0],
    ):
        responses = [(ll, False) for ll in lls]
        assert ours.score(doc, responses)["acc"] == _lmeval_score(mc_task, doc, responses)["acc"]


# ---- AGIEval and MMLU few-shot (ours) -----------------------------------------------------------------


def test_agieval_fewshot_prompts_are_fixed_examples_of_the_same_subset(data_dir):
    task = AGIEval()
    docs = task.load(data_dir, "test")
    lsat = [d for d in docs if d["_subset"] == "lsat-ar"]
    rows = read_rows(data_dir / "hails/agieval-lsat-ar/data/test-00000-of-00001.parquet")
    requests = task.build(lsat[1], [{}, {}])  # only the count of the sampled examples matters
    examples = "".join(r["query"] + " " + r["choices"][r["gold"][0]] + "\n\n" for r in (rows[0], rows[2]))
    assert [(r.context, r.continuation) for r in requests] == [(examples + rows[1]["query"], " " + c)
                                                               for c in rows[1]["choices"]]  # fmt: skip
    math_rows = read_rows(data_dir / "hails/agieval-math/data/test-00000-of-00001.parquet")
    (request,) = task.build(next(d for d in docs if d["_subset"] == "math"), [{}])
    assert (
        request.prompt
        == math_rows[1]["query"] + " " + math_rows[1]["answer"] + "\n\n" + math_rows[0]["query"]
    )
    assert (request.until, request.max_tokens) == (("Q:",), 32)
    one_line_error(lambda: task.build(lsat[0], [{}] * AGIEVAL_TEST), "agieval", f"{AGIEVAL_TEST}-shot")


def test_mmlu_fewshot_beyond_the_dev_split_is_an_error(data_dir):
    task = MMLU()
    doc = task.load(data_dir, "test")[0]
    assert task.build(doc, [{}] * 5)[0].context.count("\nAnswer: ") == 5
    one_line_error(lambda: task.build(doc, [{}] * 6), "mmlu", "6-shot", "abstract_algebra has 5")


# ---- agreement with lm-eval on a tiny model -----------------------------------------------------------


def _run_name(task: str, shots: int) -> str:
    return f"gk_{task}" + (f"_{shots}shot" if shots else "")


def _subtask(task: str, subset: str, shots: int) -> str:
    return _run_name(f"{task}_{subset.replace('-', '_')}", shots)


def _lmeval_files(task, data_dir: Path, subset: str = "") -> dict[str, list[str]]:
    if hasattr(task, "split_files"):
        return {s: [str(p) for p in task.split_files(data_dir, s, subset)] for s in task.files}
    return {s: [str(data_dir / task.repo / f)] for s, f in task.files.items()}


def _lmeval_subsets(task: str, shots: int) -> tuple[str, ...]:
    """The subsets lm-eval runs: all, but only three MMLU subjects few-shot (57 task loads take ~7 s)."""
    return MMLU_COMPARED if (task, shots) == ("mmlu", 2) else getattr(TASKS[task], "subsets", ())


def _write_yaml(yaml_dir: Path, data_dir: Path, cache_dir: Path, task: str, shots: int) -> None:
    ours = TASKS[task]()

    def write(name: str, include: str, files: dict, **extra) -> None:
        extra.update({"num_fewshot": shots} if shots else {})
        _write_lmeval_yaml(yaml_dir, name, include, files, cache_dir, **extra)

    if task in ("mmlu", "agieval"):  # a group of renamed subtasks, aggregated as upstream
        include = "mmlu/default/mmlu_{}.yaml" if task == "mmlu" else "agieval/{}.yaml"
        subsets = _lmeval_subsets(task, shots)
        for subset in subsets:
            files = _lmeval_files(ours, data_dir, subset)
            write(_subtask(task, subset, shots), include.format(subset), files)
        group = {"group": _run_name(task, shots), "task": [_subtask(task, s, shots) for s in subsets],
                 "aggregate_metric_list": [{"metric": "acc", "weight_by_size": True}]}  # fmt: skip
        (yaml_dir / f"{_run_name(task, shots)}.yaml").write_text(json.dumps(group, indent=1))
        return
    extra = {}
    if task in GENERATIVE:
        extra["generation_kwargs"] = {"until": ["\n", ".", ","], "do_sample": False, "temperature": 0.0,
                                      "max_gen_toks": GEN_TOKENS}  # fmt: skip
    write(_run_name(task, shots), UPSTREAM_YAML[task], _lmeval_files(ours, data_dir), **extra)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One intra-op thread, as the lm-eval agreement test (see eval_helpers.intra_op_threads)."""
    with intra_op_threads(1):
        yield


@pytest.fixture(scope="module")
def setup(tmp_path_factory, data_dir):
    pytest.importorskip("lm_eval")
    from eval_helpers import tiny_pair

    root = tmp_path_factory.mktemp("mc_agreement")
    hf_dir, model, tok = tiny_pair(root / "model")
    yaml_dir = root / "yaml"
    yaml_dir.mkdir()
    for task, shots in RUNS:
        _write_yaml(yaml_dir, data_dir, root / "datasets_cache", task, shots)
    return hf_dir, model, tok, yaml_dir


@pytest.fixture(scope="module")
def lmeval_results(setup):
    hf_dir, _, _, yaml_dir = setup
    return lmeval_evaluate(hf_dir, yaml_dir, [_run_name(t, s) for t, s in RUNS])


@pytest.fixture(scope="module")
def our_results(setup, data_dir):
    from gemmakit.eval.lm import GemmaLM

    _, model, tok, _ = setup
    lm = GemmaLM(model, tok, batch_size=4)
    defaults = get_protocol("lm-eval")
    short = replace(defaults, max_gen_tokens=GEN_TOKENS)
    fewshot = {t: TaskProtocol(k, TASKS[t].primary_metric) for t, k in SHOTS.items()}
    shots = Protocol("agreement-2shot", fewshot, max_gen_tokens=GEN_TOKENS)
    out = {}
    for task, k in RUNS:
        protocol = shots if k else short if task in GENERATIVE else defaults
        out[_run_name(task, k)] = run_task(TASKS[task](), lm, data_dir, protocol)
    return out


@pytest.fixture(scope="module")
def mmlu_subjects(data_dir) -> list[str]:
    """The subject of each MMLU test document, in our order."""
    return [doc["_subset"] for doc in MMLU().load(data_dir, "test")]


def _pairs(task: str, shots: int, lmeval_results: dict, ours, mmlu_subjects: list[str]) -> list[tuple]:
    """(our SampleLog, lm-eval's logged sample) per document lm-eval ran, a group's in subset order."""
    subsets = _lmeval_subsets(task, shots)
    names = [_subtask(task, s, shots) for s in subsets] or [_run_name(task, shots)]
    theirs = [s for name in names for s in sorted(lmeval_results["samples"][name], key=lambda s: s["doc_id"])]
    samples = ours.samples
    if task == "mmlu":
        samples = [s for s in samples if mmlu_subjects[s.doc_index] in subsets]
    assert len(samples) == len(theirs) > 0
    return list(zip(samples, theirs, strict=True))


@pytest.fixture(scope="module")
def unsettled(setup, our_results, data_dir) -> dict[str, set[int]]:
    """Per run, the documents whose greedy text, is_greedy flags or scores a near-tie could flip
    (eval_helpers.unsettled_docs): only there may the two sides differ, float32 summation order deciding.
    None here (measured: smallest greedy-path gap 3.9e-4, is_greedy gap 0.54, log-likelihood margin
    between two choices 9.4e-5 against the 2e-5 that matters)."""
    _, model, tok, _ = setup
    return {
        _run_name(t, k): unsettled_docs(TASKS[t](), our_results[_run_name(t, k)], model, tok, data_dir)
        for t, k in RUNS
    }


@pytest.mark.parametrize("task,shots", RUNS, ids=[_run_name(t, s) for t, s in RUNS])
def test_requests_and_answers_agree(task, shots, lmeval_results, our_results, mmlu_subjects, unsettled):
    worst, skip = 0.0, unsettled[_run_name(task, shots)]
    assert len(skip) <= len(our_results[_run_name(task, shots)].samples) // 10, sorted(skip)
    for sample, logged in _pairs(
        task, shots, lmeval_results, our_results[_run_name(task, shots)], mmlu_subjects
    ):
        settled = sample.doc_index not in skip
        assert len(logged["arguments"]) == len(sample.requests)
        for args, resp, request, response in zip(
            logged["arguments"], logged["resps"], sample.requests, sample.responses, strict=True
        ):
            if hasattr(request, "prompt"):
                prompt, gen_kwargs = args
                assert (prompt, tuple(gen_kwargs["until"])) == (request.prompt, request.until)
                assert request.max_tokens == gen_kwargs["max_gen_toks"]
                assert resp[0] == response or not settled, f"doc {sample.doc_index}: generations differ"
            else:
                assert tuple(args) == (request.context, request.continuation)
                ll, greedy = resp[0]
                assert greedy == response[1] or not settled, f"doc {sample.doc_index}: is_greedy differs"
                worst = max(worst, abs(ll - response[0]) / ll_tolerance(response[0]))
    assert worst <= 1, (
        f"{task} {shots}-shot: largest log-likelihood difference {worst:.2f} x its ll_tolerance"
    )


@pytest.mark.parametrize("task,shots", RUNS, ids=[_run_name(t, s) for t, s in RUNS])
def test_scores_agree(task, shots, lmeval_results, our_results, mmlu_subjects, unsettled):
    name = _run_name(task, shots)
    ours, theirs, skip = our_results[name], lmeval_results["results"][name], unsettled[name]
    slack = len(skip) / ours.n  # a document on a near-tie (none here) may score differently: 1/n of a mean
    key = "{},remove_whitespace" if task in GENERATIVE else "{},none"
    for metric, value in ours.metrics.items():
        if _lmeval_subsets(task, shots) == getattr(TASKS[task], "subsets", ()) != ():
            # a whole group: lm-eval sums size-weighted subtask means (its stderr differs: see mmlu.py)
            assert math.isclose(theirs[key.format(metric)], value, rel_tol=1e-12, abs_tol=slack), metric
        elif task != "mmlu":  # (few-shot MMLU: three subjects only, compared per document below)
            assert abs(theirs[key.format(metric)] - value) <= slack, metric
            stderr = theirs[key.format(metric).replace(",", "_stderr,")]
            assert math.isclose(stderr, ours.stderr[metric], rel_tol=1e-12, abs_tol=1e-15) or skip
    for sample, logged in _pairs(task, shots, lmeval_results, ours, mmlu_subjects):
        if sample.doc_index in skip:
            continue
        for metric in ours.metrics:
            assert sample.scores[metric] == logged[metric], f"doc {sample.doc_index} {metric}"


def test_predictions_are_not_trivial(our_results):
    """The comparison means something only if the random model's answers vary. (Its TriviaQA/NQ answers
    are noise, so exact match is ~0 there; test_exact_match_scoring_matches_lmeval covers the scoring.)"""
    for name, result in our_results.items():
        lls = {s.responses[0][0] for s in result.samples if isinstance(s.responses[0], tuple)}
        texts = {s.responses[0] for s in result.samples if isinstance(s.responses[0], str)}
        assert len(lls) + len(texts) > 10, name
        if any(name.startswith(f"gk_{t}") for t in GENERATIVE):
            continue
        metric = result.primary_metric
        assert 0 < result.metrics[metric] < 1, f"{name}: {metric} {result.metrics[metric]}"
        picks = {max(range(len(s.responses)), key=lambda i: s.responses[i][0]) for s in result.samples
                 if isinstance(s.responses[0], tuple)}  # fmt: skip
        assert len(picks) >= 2, f"{name}: the model always picks {picks}"
