"""Small generated samples of MMLU, PIQA, SIQA, CommonsenseQA, OpenBookQA, AGIEval (English), TriviaQA and
NQ-Open in the upstream column layouts and repository paths lm-eval 0.4.13 loads (cais/mmlu,
baber/piqa, lighteval/siqa, tau/commonsense_qa, allenai/openbookqa, hails/agieval-*,
mandarjoshi/trivia_qa, google-research-datasets/nq_open), for tests/test_eval_tasks_mc.py.

Text uses the words the tests' SentencePiece model was trained on (eval_helpers.WORDS), so prompts stay
short in tokens. File names vary where the tasks match them by pattern (PIQA at the repository's top,
SIQA with a hash suffix, one AGIEval subset in two shards), to exercise that matching. Every
TriviaQA/NQ document also accepts a punctuation-only reference ("!!"), which normalises to "": the
random test model's answers that stop at once (at ".", "," or "\\n") then score 1, so exact match is
not 0 everywhere.
"""

from __future__ import annotations

import random
from pathlib import Path

from eval_helpers import NAMES, WORDS, random_words, write_parquet

MMLU_COMPARED = ("abstract_algebra", "high_school_government_and_politics", "world_religions")
AGIEVAL_SUBSETS = (
    "aqua-rat", "gaokao-english", "logiqa-en", "lsat-ar", "lsat-lr", "lsat-rc", "math",
    "sat-en-without-passage", "sat-en", "sat-math",
)  # fmt: skip
SIZES = {"train": 12, "validation": 16, "test": 16}  # documents per split (MMLU, AGIEval: below)
MMLU_TEST = {s: 4 for s in MMLU_COMPARED}  # test documents per subject (others: 1); dev has 5
AGIEVAL_TEST = 3  # documents per AGIEval subset


def _mmlu(rng: random.Random, subject: str) -> dict:
    question = random_words(rng, 3, 9).capitalize() + rng.choice(["?", ".", "? ", "\n"])
    return {"question": rng.choice(["", " "]) + question, "subject": subject,
            "choices": [random_words(rng, 1, 4) for _ in range(4)], "answer": rng.randrange(4)}  # fmt: skip


def _piqa(rng: random.Random) -> dict:
    return {"goal": random_words(rng, 3, 8).capitalize(), "sol1": random_words(rng, 2, 8),
            "sol2": random_words(rng, 2, 8), "label": rng.randrange(2)}  # fmt: skip


def _siqa(rng: random.Random) -> dict:
    who = rng.choice(NAMES)
    return {"context": f"{who} {random_words(rng, 3, 9)}.", "question": f"What will {who} want to do next?",
            **{f"answer{k}": random_words(rng, 1, 5) for k in "ABC"}, "label": rng.choice("123")}  # fmt: skip


def _commonsense_qa(rng: random.Random, i: int) -> dict:
    return {"id": f"csqa{i}",
            "question": random_words(rng, 4, 10).capitalize() + rng.choice(["?", "? ", "?\n"]),
            "question_concept": rng.choice(WORDS),
            "choices": {"label": list("ABCDE"), "text": [random_words(rng, 1, 2) for _ in range(5)]},
            "answerKey": rng.choice("ABCDE")}  # fmt: skip


def _openbookqa(rng: random.Random, i: int) -> dict:
    labels = list("ABCD")
    return {"id": f"{i}-{rng.randrange(1000)}", "question_stem": random_words(rng, 4, 10).capitalize(),
            "choices": {"text": [random_words(rng, 1, 6) for _ in labels], "label": labels},
            "answerKey": rng.choice(["", " "]) + rng.choice(labels)}  # fmt: skip


def _references(rng: random.Random) -> list[str]:
    value = random_words(rng, 1, 3)
    return [value.title(), value, "The " + value + ".", "!!"]


def _triviaqa(rng: random.Random, i: int) -> dict:
    aliases = _references(rng)
    question = random_words(rng, 4, 10).capitalize() + rng.choice(["", "?"])
    return {"question": question, "question_id": f"tc_{i}", "question_source": "http://www.quiz.com/",
            "entity_pages": {"doc_source": ["TagMe"], "filename": [f"{i}.txt"], "title": [aliases[0]],
                             "wiki_context": [""]},
            "search_results": {"description": [], "filename": [], "rank": [], "title": [], "url": [],
                               "search_context": []},
            "answer": {"aliases": aliases, "normalized_aliases": [a.lower() for a in aliases],
                       "matched_wiki_entity_name": "", "normalized_matched_wiki_entity_name": "",
                       "normalized_value": aliases[1].lower(), "type": "WikipediaEntity",
                       "value": aliases[0]}}  # fmt: skip


def _nq_open(rng: random.Random) -> dict:
    return {"question": random_words(rng, 4, 9), "answer": _references(rng)[rng.randrange(2) :]}


def _agieval(rng: random.Random, subset: str) -> dict:
    if subset == "math":
        x, y = rng.randint(1, 9), rng.randint(2, 9)
        answer = rng.choice([str(x + y), f"\\frac{{{x}}}{{{y}}}", f"{x}/{y}", f"\\sqrt{{{x}}}"])
        return {"query": f"Q: {random_words(rng, 4, 9)} {x} and {y}?\nA: The answer is", "answer": answer}
    n = 5 if subset in ("aqua-rat", "lsat-ar", "lsat-lr", "lsat-rc", "logiqa-en") else 4
    letters = "ABCDE"[:n]
    texts = [random_words(rng, 1, 4) for _ in range(n)]
    choices = [f"({letter}){text}" for letter, text in zip(letters, texts, strict=True)]
    gold = sorted(rng.sample(range(n), 2)) if rng.random() < 0.2 else [rng.randrange(n)]
    query = (f"Q: {random_words(rng, 5, 12).capitalize()}? Answer Choices: {' '.join(choices)}\n"
             f"A: Among A through {letters[-1]}, the answer is")  # fmt: skip
    return {"query": query, "choices": choices, "gold": gold}


def write_mc_samples(data_dir: Path, seed: int = 0) -> None:
    """Write every split the eight tasks read under data_dir/<owner>/<repo>/..."""
    from gemmakit.eval.tasks.mmlu import SUBJECTS

    rng = random.Random(seed)
    for subject in SUBJECTS:
        for split, n in (("test", MMLU_TEST.get(subject, 1)), ("dev", 5)):
            write_parquet(data_dir / f"cais/mmlu/{subject}/{split}-00000-of-00001.parquet",
                   [_mmlu(rng, subject) for _ in range(n)])  # fmt: skip
    for split in ("train", "validation"):
        n = SIZES[split]
        write_parquet(data_dir / f"baber/piqa/{split}.parquet", [_piqa(rng) for _ in range(n)])
        write_parquet(data_dir / f"lighteval/siqa/data/{split}-00000-of-00001-5e2c1a7d.parquet",
               [_siqa(rng) for _ in range(n)])  # fmt: skip
        csqa = [_commonsense_qa(rng, i) for i in range(n)]
        if split == "train":  # an evaluated document in the few-shot pool: lm-eval's sampler drops it
            csqa[2] = _commonsense_qa(random.Random(seed + 1), 0)
        elif split == "validation":
            csqa[0] = _commonsense_qa(random.Random(seed + 1), 0)
        write_parquet(data_dir / f"tau/commonsense_qa/data/{split}-00000-of-00001.parquet", csqa)
        write_parquet(data_dir / f"mandarjoshi/trivia_qa/rc.nocontext/{split}-00000-of-00001.parquet",
               [_triviaqa(rng, i) for i in range(n)])  # fmt: skip
        write_parquet(data_dir / f"google-research-datasets/nq_open/nq_open/{split}-00000-of-00001.parquet",
               [_nq_open(rng) for _ in range(n)])  # fmt: skip
    for split in ("train", "validation", "test"):
        write_parquet(data_dir / f"allenai/openbookqa/main/{split}-00000-of-00001.parquet",
               [_openbookqa(rng, i) for i in range(SIZES[split])])  # fmt: skip
    for subset in AGIEVAL_SUBSETS:
        rows = [_agieval(rng, subset) for _ in range(AGIEVAL_TEST)]
        root = data_dir / f"hails/agieval-{subset}/data"
        if subset == "lsat-rc":  # two shards, read in name order
            write_parquet(root / "test-00000-of-00002.parquet", rows[:2])
            write_parquet(root / "test-00001-of-00002.parquet", rows[2:])
        else:
            write_parquet(root / "test-00000-of-00001.parquet", rows)
