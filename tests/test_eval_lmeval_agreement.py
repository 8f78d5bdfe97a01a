"""Acceptance: gemmakit's tasks + GemmaLM agree with lm-evaluation-harness 0.4.13 on the same model.

One random tiny Gemma 2 is saved as a transformers checkpoint (with an HF tokenizer converted from
the same SentencePiece file) and evaluated twice on the same local files, written in the upstream
layouts (tests/eval_helpers.py): by lm-eval's own HFLM (CPU, float32, batch size 1, eager attention)
through its own task YAMLs, each `include`d with only the dataset location overridden, and by
`run_task(..., GemmaLM(twin, batch_size=4), protocol)`. Per document the prompts must be the same
strings, per request the log-likelihoods within 1e-5 (1e-6 relative for long ones) with the same
is-greedy flag and the generated text identical, and per task every metric identical (text, flags
and scores wherever no near-tie lets float32 rounding decide: eval_helpers.TIE_GAP). Besides the
lm-eval defaults (0-shot, GSM8K 5-shot), a 2-shot run of four tasks checks few-shot sampling,
including lm-eval's drop of the evaluated document from the few-shot pool (BoolQ's train split
contains one validation document). The safety benchmarks lm-eval has (CrowS-Pairs, BBQ and its two
halves, Winogender, TruthfulQA MC1/MC2, ToxiGen, RealToxicityPrompts) are compared the same way at the
end, RealToxicityPrompts through lm-eval's own Perspective API metric with its HTTP call answered
locally by the scorer our task is given.
"""

from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path

import pytest

pytest.importorskip("lm_eval")

from eval_helpers import (  # noqa: E402
    intra_op_threads,
    ll_tolerance,
    lmeval_evaluate,
    tiny_pair,
    unsettled_docs,
    write_samples,
)

from gemmakit.eval.lm import GemmaLM  # noqa: E402
from gemmakit.eval.tasks import Protocol, TaskProtocol, get_protocol, get_task, run_task  # noqa: E402

UPSTREAM_YAML = {
    "arc_easy": "arc/arc_easy.yaml",
    "arc_challenge": "arc/arc_challenge.yaml",
    "hellaswag": "hellaswag/hellaswag.yaml",
    "winogrande": "winogrande/default.yaml",
    "gsm8k": "gsm8k/gsm8k.yaml",
    "boolq": "super_glue/boolq/default.yaml",
}
SHOTS = {"arc_challenge": 2, "hellaswag": 2, "winogrande": 2, "boolq": 2}  # the few-shot run
GEN_TOKENS = 16  # GSM8K's generation budget on both sides (lm-eval's default is 256)
# GSM8K: lm-eval's filter names -> our metric names
FILTER_METRIC = {"strict-match": "exact_match_strict", "flexible-extract": "exact_match_flexible"}
RUNS = [(task, 0) for task in UPSTREAM_YAML] + list(SHOTS.items())  # (task, shots; 0 = lm-eval default)


def _run_name(task: str, shots: int) -> str:
    return f"gk_{task}" + (f"_{shots}shot" if shots else "")


def _write_yaml(yaml_dir: Path, data_dir: Path, cache_dir: Path, task: str, shots: int) -> None:
    import lm_eval.tasks

    ours = get_task(task)
    config = {
        "include": str(Path(lm_eval.tasks.__file__).parent / UPSTREAM_YAML[task]),
        "task": _run_name(task, shots),
        "tag": "gemmakit_agreement",
        "dataset_path": "parquet",
        "dataset_name": None,
        "dataset_kwargs": {
            "data_files": {split: str(data_dir / ours.repo / f) for split, f in ours.files.items()},
            "cache_dir": str(cache_dir),
        },
    }
    if shots:
        config["num_fewshot"] = shots
    if task == "gsm8k":
        config["generation_kwargs"] = {"until": ["Question:", "</s>", "<|im_end|>"], "do_sample": False,
                                       "temperature": 0.0, "max_gen_toks": GEN_TOKENS}  # fmt: skip
    # JSON is YAML; the upstream file's !function tags resolve next to it
    (yaml_dir / f"{config['task']}.yaml").write_text(json.dumps(config, indent=1))


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One intra-op thread for this module (why, with numbers: eval_helpers.intra_op_threads)."""
    with intra_op_threads(1):
        yield


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("agreement")
    hf_dir, model, tok = tiny_pair(root / "model")
    data_dir, yaml_dir = root / "data", root / "yaml"
    yaml_dir.mkdir()
    write_samples(data_dir)
    for task, shots in RUNS:
        _write_yaml(yaml_dir, data_dir, root / "datasets_cache", task, shots)
    return hf_dir, model, tok, data_dir, yaml_dir


@pytest.fixture(scope="module")
def lmeval_results(setup):
    hf_dir, _, _, _, yaml_dir = setup
    return lmeval_evaluate(hf_dir, yaml_dir, [_run_name(t, s) for t, s in RUNS])


@pytest.fixture(scope="module")
def our_results(setup):
    _, model, tok, data_dir, _ = setup
    lm = GemmaLM(model, tok, batch_size=4)
    defaults = replace(get_protocol("lm-eval"), max_gen_tokens=GEN_TOKENS)
    shots = Protocol(
        "agreement-2shot", {t: TaskProtocol(k, get_task(t).primary_metric) for t, k in SHOTS.items()}
    )
    return {_run_name(task, k): run_task(task, lm, data_dir, shots if k else defaults) for task, k in RUNS}


def _by_doc(samples: list[dict]) -> dict[int, list[dict]]:
    out: dict[int, list[dict]] = {}
    for sample in samples:
        out.setdefault(sample["doc_id"], []).append(sample)
    return out


@pytest.fixture(scope="module")
def unsettled(setup, our_results) -> dict[str, set[int]]:
    """Per run, the documents whose greedy text, is_greedy flags or scores a near-tie could flip
    (eval_helpers.unsettled_docs): the two sides compute the same logits up to float32 summation
    order, so only there may they differ. None of the tests' documents is one (measured: smallest GSM8K
    greedy-path gap 2.0e-4, smallest is_greedy gap 0.57, smallest log-likelihood margin between two
    choices 2.7e-4 against the 2e-5 that matters here)."""
    _, model, tok, data_dir, _ = setup
    return {
        _run_name(t, k): unsettled_docs(get_task(t), our_results[_run_name(t, k)], model, tok, data_dir)
        for t, k in RUNS
    }


@pytest.mark.parametrize("task,shots", RUNS, ids=[_run_name(t, s) for t, s in RUNS])
def test_requests_and_loglikelihoods_agree(task, shots, lmeval_results, our_results, unsettled):
    name = _run_name(task, shots)
    theirs, ours = _by_doc(lmeval_results["samples"][name]), our_results[name]
    assert len(theirs) == ours.n == 20
    assert len(unsettled[name]) <= 2, sorted(unsettled[name])
    worst = 0.0
    for sample in ours.samples:
        logged = theirs[sample.doc_index][0]
        settled = sample.doc_index not in unsettled[name]
        assert len(logged["arguments"]) == len(sample.requests)
        for args, resp, request, response in zip(
            logged["arguments"], logged["resps"], sample.requests, sample.responses, strict=True
        ):
            if task == "gsm8k":
                prompt, gen_kwargs = args
                assert (prompt, tuple(gen_kwargs["until"])) == (request.prompt, request.until)
                assert request.max_tokens == gen_kwargs["max_gen_toks"] == GEN_TOKENS
                assert resp[0] == response or not settled, f"doc {sample.doc_index}: generations differ"
            else:
                assert tuple(args) == (request.context, request.continuation)
                (ll, greedy) = resp[0]
                assert greedy == response[1] or not settled, f"doc {sample.doc_index}: is_greedy differs"
                worst = max(worst, abs(ll - response[0]) / ll_tolerance(response[0]))
    assert worst <= 1, f"{name}: largest log-likelihood difference {worst:.2f} x its ll_tolerance"


@pytest.mark.parametrize("task,shots", RUNS, ids=[_run_name(t, s) for t, s in RUNS])
def test_scores_identical(task, shots, lmeval_results, our_results, unsettled):
    name = _run_name(task, shots)
    ours, theirs, skip = our_results[name], lmeval_results["results"][name], unsettled[name]
    keys = {metric: f"exact_match,{f}" for f, metric in FILTER_METRIC.items()}
    for metric, value in ours.metrics.items():
        # identical, unless a document on a near-tie (none here) scored differently: 1/n of a mean each
        assert abs(theirs[keys.get(metric, f"{metric},none")] - value) <= len(skip) / ours.n, (
            f"{name} {metric}"
        )
        stderr = theirs[keys.get(metric, f"{metric},none").replace(",", "_stderr,")]
        assert math.isclose(stderr, ours.stderr[metric], rel_tol=1e-12, abs_tol=1e-15) or skip
    # and per document, filter by filter
    for sample in lmeval_results["samples"][name]:
        if sample["doc_id"] in skip:
            continue
        ours_doc = ours.samples[sample["doc_id"]].scores
        for key in sample["metrics"]:
            assert ours_doc[FILTER_METRIC.get(sample["filter"], key)] == sample[key]


def test_predictions_are_not_trivial(our_results):
    """The random model must make the comparison meaningful: varied answers, per-document scores that
    are not all equal. (Only BoolQ's pick is constant: a random model's " no"/" yes" preference after
    the fixed "?\nAnswer:" does not depend on the passage.)"""
    for name, result in our_results.items():
        if name.startswith("gk_gsm8k"):
            texts = [s.responses[0] for s in result.samples]
            assert len(set(texts)) > 10 and all(texts), texts
            continue
        assert 0 < result.metrics["acc"] < 1, f"{name}: acc {result.metrics['acc']}"
        assert len({s.responses[0][0] for s in result.samples}) > 10  # the first choice's ll varies
        picks = {max(range(len(s.responses)), key=lambda i: s.responses[i][0]) for s in result.samples}
        assert len(picks) >= (1 if "boolq" in name else 2), f"{name}: the model always picks {picks}"


# ---- the safety benchmarks (tests/eval_samples_safety.py) ---------------------------------------------
# The seven likelihood tasks lm-eval has, run 0-shot by both sides on the same files; RealToxicityPrompts
# generates and is scored through lm-eval's own Perspective API metric, its HTTP call answered locally
# with the same deterministic scorer our task gets. (WinoBias and BOLD are our own protocols: no upstream.)
SAFETY_YAML = {
    "crows_pairs": ("crows_pairs/crows_pairs_english.yaml",),
    "bbq": ("bbq/bbq_multiple_choice.yaml",),
    "bbq_ambig": ("bbq/bbq_multiple_choice_ambig.yaml",),
    "bbq_disambig": ("bbq/bbq_multiple_choice_disambig.yaml",),
    "winogender": ("winogender/winogender.yaml",),
    "truthfulqa": ("truthfulqa/truthfulqa_mc1.yaml", "truthfulqa/truthfulqa_mc2.yaml"),  # mc1, then mc2
    "toxigen": ("toxigen/toxigen.yaml",),
    "realtoxicityprompts": ("realtoxicityprompts/realtoxicityprompts.yaml",),
}
# per task: our metric -> (lm-eval subtask index, its metric); metrics that vary continuously with the
# log-likelihoods are compared to a tolerance, the others exactly
SAFETY_METRICS = {
    "crows_pairs": {"likelihood_diff": (0, "likelihood_diff"), "pct_stereotype": (0, "pct_stereotype")},
    "bbq": {"acc": (0, "acc")},
    "bbq_ambig": {"acc": (0, "acc")},
    "bbq_disambig": {"acc": (0, "acc")},
    "winogender": {"acc": (0, "acc")},
    "truthfulqa": {"mc1": (0, "acc"), "mc2": (1, "acc")},
    "toxigen": {"acc": (0, "acc"), "acc_norm": (0, "acc_norm")},
    "realtoxicityprompts": {
        "toxic_fraction": (0, "score"),
        "toxicity": (0, "perspective_api_toxicity_score"),
    },
}
CONTINUOUS = {"likelihood_diff", "mc2", "toxicity"}
# few-shot runs: BBQ Ambig 1-shot as the reports ran it (examples from the test split, the evaluated
# document not excluded), CrowS-Pairs' empty-delimiter examples, TruthfulQA with the document dropped
SAFETY_SHOTS = {"bbq_ambig": 1, "crows_pairs": 1, "truthfulqa": 2}
SAFETY_RUNS = [(task, 0) for task in SAFETY_YAML] + list(SAFETY_SHOTS.items())


def _safety_run(task: str, shots: int) -> str:
    return task + (f"_{shots}shot" if shots else "")


def fixture_toxicity(texts):
    """A test scorer: P(toxic) from the text's length, 0, 1/6, ..., 1 (3/6 = the 0.5 threshold itself)."""
    return [(len(t) % 7) / 6 for t in texts]


def _safety_name(run: str, i: int) -> str:
    return f"gk_safety_{run}_{i}"


@pytest.fixture(scope="module")
def safety_setup(setup):
    import lm_eval.tasks
    from eval_samples_safety import write_safety_samples

    hf_dir, model, tok, data_dir, yaml_dir = setup
    safety_dir = data_dir.parent / "safety"
    write_safety_samples(safety_dir)
    yamls = yaml_dir.parent / "safety_yaml"
    yamls.mkdir(exist_ok=True)
    for task, shots in SAFETY_RUNS:
        ours = get_task(task)
        files = {s: [str(p) for p in ours.split_files(safety_dir, s)] for s in ours.files}
        for i, include in enumerate(SAFETY_YAML[task]):
            name = _safety_name(_safety_run(task, shots), i)
            config = {"include": str(Path(lm_eval.tasks.__file__).parent / include), "task": name,
                      "tag": "gemmakit_safety", "dataset_path": "json" if task == "realtoxicityprompts" else "parquet",
                      "dataset_name": None,
                      "dataset_kwargs": {"data_files": files, "cache_dir": str(data_dir.parent / "datasets_cache")}}  # fmt: skip
            if shots:
                config["num_fewshot"] = shots
            if task == "realtoxicityprompts":
                config["generation_kwargs"] = {"until": ["\n\n"], "do_sample": False, "temperature": 0.0,
                                               "max_gen_toks": GEN_TOKENS}  # fmt: skip
            (yamls / f"{config['task']}.yaml").write_text(json.dumps(config, indent=1))
    return hf_dir, model, tok, safety_dir, yamls


class _PerspectiveReply:
    ok = True

    def __init__(self, text: str) -> None:
        self.text = json.dumps(
            {"attributeScores": {"TOXICITY": {"summaryScore": {"value": fixture_toxicity([text])[0]}}}}
        )


def _fake_perspective_post(session, url, **kwargs):
    """requests.Session.post for lm-eval's Perspective API metric: TOXICITY = fixture_toxicity(text)."""
    return _PerspectiveReply(kwargs["json"]["comment"]["text"])


@pytest.fixture(scope="module")
def safety_lmeval(safety_setup):
    import requests

    hf_dir, _, _, _, yamls = safety_setup
    names = [_safety_name(_safety_run(t, k), i) for t, k in SAFETY_RUNS for i in range(len(SAFETY_YAML[t]))]
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PERSPECTIVE_API_KEY", "local-test")
        mp.setattr(requests.Session, "post", _fake_perspective_post)
        return lmeval_evaluate(hf_dir, yamls, names)


@pytest.fixture(scope="module")
def safety_ours(safety_setup):
    from gemmakit.eval.tasks.safety_toxicity import RealToxicityPrompts

    _, model, tok, safety_dir, _ = safety_setup
    lm = GemmaLM(model, tok, batch_size=4)
    defaults = replace(get_protocol("lm-eval"), max_gen_tokens=GEN_TOKENS)
    fewshot = Protocol(
        "safety-fewshot", {t: TaskProtocol(k, get_task(t).primary_metric) for t, k in SAFETY_SHOTS.items()}
    )
    out = {}
    for task, shots in SAFETY_RUNS:
        instance = RealToxicityPrompts(fixture_toxicity) if task == "realtoxicityprompts" else get_task(task)
        out[_safety_run(task, shots)] = run_task(instance, lm, safety_dir, fewshot if shots else defaults)
    return out


class _Discrete:
    """A task whose score leaves out the continuous metrics, for eval_helpers.unsettled_docs (which asks
    whether a near-tie could change a score: a continuous one always moves a little)."""

    def __init__(self, task) -> None:
        self.task, self.eval_split = task, task.eval_split

    def load(self, data_dir, split):
        return self.task.load(data_dir, split)

    def score(self, doc, responses):
        return {k: v for k, v in self.task.score(doc, responses).items() if k not in CONTINUOUS}


@pytest.fixture(scope="module")
def safety_unsettled(safety_setup, safety_ours) -> dict[str, set[int]]:
    """Per task, the documents a near-tie could flip (none measured on these samples)."""
    _, model, tok, safety_dir, _ = safety_setup
    return {
        _safety_run(t, k): unsettled_docs(
            _Discrete(get_task(t)), safety_ours[_safety_run(t, k)], model, tok, safety_dir
        )
        for t, k in SAFETY_RUNS
    }


@pytest.mark.parametrize("task,shots", SAFETY_RUNS, ids=[_safety_run(t, k) for t, k in SAFETY_RUNS])
def test_safety_requests_and_answers_agree(task, shots, safety_lmeval, safety_ours, safety_unsettled):
    run = _safety_run(task, shots)
    ours, skip = safety_ours[run], safety_unsettled[run]
    assert len(skip) <= ours.n // 8, sorted(skip)
    theirs = [_by_doc(safety_lmeval["samples"][_safety_name(run, i)]) for i in range(len(SAFETY_YAML[task]))]
    assert all(len(t) == ours.n for t in theirs) and ours.n >= 4  # bbq_ambig: half of the 8 documents
    worst = 0.0
    for sample in ours.samples:
        logged = [t[sample.doc_index][0] for t in theirs]
        args = [a for entry in logged for a in entry["arguments"]]
        resps = [r for entry in logged for r in entry["resps"]]
        assert len(args) == len(sample.requests)
        for arg, resp, request, response in zip(args, resps, sample.requests, sample.responses, strict=True):
            if task == "realtoxicityprompts":
                prompt, gen_kwargs = arg
                assert (prompt, tuple(gen_kwargs["until"])) == (request.prompt, request.until)
                assert request.max_tokens == gen_kwargs["max_gen_toks"] == GEN_TOKENS
                assert resp[0] == response or sample.doc_index in skip, f"doc {sample.doc_index}"
            else:
                assert tuple(arg) == (request.context, request.continuation)
                ll, greedy = resp[0]
                assert greedy == response[1] or sample.doc_index in skip
                worst = max(worst, abs(ll - response[0]) / ll_tolerance(response[0]))
    assert worst <= 1, f"{run}: largest log-likelihood difference {worst:.2f} x its ll_tolerance"


@pytest.mark.parametrize("task,shots", SAFETY_RUNS, ids=[_safety_run(t, k) for t, k in SAFETY_RUNS])
def test_safety_scores_agree(task, shots, safety_lmeval, safety_ours, safety_unsettled):
    run = _safety_run(task, shots)
    ours, skip = safety_ours[run], safety_unsettled[run]
    for metric, (i, theirs_metric) in SAFETY_METRICS[task].items():
        theirs = safety_lmeval["results"][_safety_name(run, i)][f"{theirs_metric},none"]
        slack = 1e-5 if metric in CONTINUOUS else len(skip) / ours.n
        assert abs(theirs - ours.metrics[metric]) <= slack, (task, metric, theirs, ours.metrics[metric])
        for logged in safety_lmeval["samples"][_safety_name(run, i)]:
            if logged["doc_id"] in skip:
                continue
            mine = ours.samples[logged["doc_id"]].scores[metric]
            assert mine == pytest.approx(logged[theirs_metric], abs=1e-5 if metric in CONTINUOUS else 0)
    if run == "bbq":  # the ambiguous / disambiguated halves of the whole run are the two subtasks
        full = safety_lmeval["results"][_safety_name("bbq", 0)]
        assert full["accuracy_amb,none"] == pytest.approx(safety_ours["bbq_ambig"].metrics["acc"], abs=1e-12)
        assert full["accuracy_disamb,none"] == pytest.approx(
            safety_ours["bbq_disambig"].metrics["acc"], abs=1e-12
        )


def test_safety_predictions_are_not_trivial(safety_ours):
    for run, result in safety_ours.items():
        metric = result.primary_metric
        values = {s.scores[metric] for s in result.samples}
        assert len(values) >= 2, f"{run}: every document scored {values}"
    assert safety_ours["bbq_ambig_1shot"].num_fewshot == 1
    assert safety_ours["bbq_ambig_1shot"].samples[0].requests[0].context.count("\nA: ") == 1
