"""Small generated samples of the safety benchmarks in their Hugging Face column layouts and repository
paths (CrowS-Pairs, BBQ, Winogender, WinoBias, TruthfulQA, ToxiGen, RealToxicityPrompts, BOLD), for
tests/test_eval_safety.py and the lm-eval agreement test.

Text uses the tests' tokenizer words (eval_helpers.WORDS), so prompts stay short in tokens. Rows carry
every column lm-eval's task code reads (BBQ's answer_info and additional_metadata, which its
process_docs walks), with values of the upstream kinds: BBQ's unknown answers are its phrasings,
categories are its eleven. BOLD's files come both ways upstream (JSON lines, one JSON array), so the
sample writes both; one WinoBias row has no second occupation, to be dropped.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from eval_helpers import NAMES, random_words, write_parquet

BBQ_CATEGORIES = ("Age", "Disability_status", "Gender_identity", "Nationality", "Physical_appearance",
                  "Race_ethnicity", "Religion", "SES", "Sexual_orientation")  # fmt: skip
BBQ_UNKNOWN = ("Unknown", "Cannot answer", "Can't be determined", "Not known", "Undetermined",
               "Not enough information")  # fmt: skip
OCCUPATIONS = ("janitor", "accountant", "developer", "designer", "nurse", "carpenter", "construction worker",
               "librarian", "physician", "clerk")  # fmt: skip
N = 8  # documents per evaluated split (16 cost ~2 min of the suite for no extra coverage: every request is compared)
BOLD_DOMAINS = ("gender", "political_ideology", "profession", "race", "religious_ideology")


def _crows(rng: random.Random) -> dict:
    a, b = rng.sample(NAMES, 2)
    tail = random_words(rng, 2, 6)
    return {"sent_more": f"{a} {tail}.", "sent_less": f"{b} {tail}.",
            "stereo_antistereo": rng.choice(["stereo", "antistereo"]),
            "bias_type": rng.choice(["race-color", "gender", "age", "religion"])}  # fmt: skip


def _bbq(rng: random.Random, i: int) -> dict:
    a, b = rng.sample(NAMES, 2)
    unknown = rng.choice(BBQ_UNKNOWN)
    answers = [f"The {a}", f"The {b}", unknown]
    rng.shuffle(answers)
    info = {f"ans{k}": (["unknown", "unknown"] if ans == unknown else [ans.split()[-1], rng.choice(["old", "nonOld"])])
            for k, ans in enumerate(answers)}  # fmt: skip
    condition = "ambig" if i % 2 == 0 else "disambig"
    label = answers.index(unknown) if condition == "ambig" and rng.random() < 0.8 else rng.randrange(3)
    return {"example_id": i, "question_index": str(i % 5), "question_polarity": rng.choice(["neg", "nonneg"]),
            "context_condition": condition, "category": rng.choice(BBQ_CATEGORIES), "answer_info": info,
            "additional_metadata": {"subcategory": "None", "stereotyped_groups": ["old"], "version": "a",
                                    "source": "https://example.org"},
            "context": f"{a} and {b} {random_words(rng, 3, 8)}.", "question": f"Who {random_words(rng, 2, 5)}?",
            "ans0": answers[0], "ans1": answers[1], "ans2": answers[2], "label": label}  # fmt: skip


def _winogender(rng: random.Random, i: int) -> dict:
    occupation, participant = rng.sample(OCCUPATIONS, 2)
    pronoun = rng.choice(["he", "she", "they", "his", "her"])
    sentence = f"The {occupation} told the {participant} that {pronoun} {random_words(rng, 2, 5)}."
    return {"sentid": f"{occupation}.{participant}.{i}", "sentence": sentence, "pronoun": pronoun,
            "occupation": occupation, "participant": participant, "gender": rng.choice(["male", "female"]),
            "target": occupation, "label": rng.randrange(2)}  # fmt: skip


def _winobias(rng: random.Random, i: int, broken: bool = False) -> dict:
    """A CoNLL-layout row: "The <occ1> <verb> the <occ2> because <pronoun> ...", cluster 1 = the gold
    occupation's "the" phrase and the pronoun (word indices as strings, flattened pairs)."""
    first, second = rng.sample(OCCUPATIONS, 2)
    if broken:
        second = "money"  # no second occupation: the task drops the row
    one, two = ["The", *first.split()], ["the", *second.split()]
    verb = rng.choice(["told", "asked", "met"])
    pronoun = rng.choice(["he", "she", "her", "him"])
    tokens = [*one, verb, *two, "because", pronoun, *random_words(rng, 2, 4).split(), "."]
    gold = rng.randrange(2)
    start = 0 if gold == 0 else len(one) + 1
    end = start + (len(one) if gold == 0 else len(two)) - 1
    where = tokens.index(pronoun, len(one) + 1 + len(two))
    return {"document_id": f"nw/test/{i}", "part_number": "0", "word_number": list(range(len(tokens))),
            "tokens": tokens, "coreference_clusters": [str(start), str(end), str(where), str(where)]}  # fmt: skip


def _truthfulqa(rng: random.Random) -> dict:
    def targets(n_right: int, n: int) -> dict:
        return {"choices": [random_words(rng, 1, 5).capitalize() + "." for _ in range(n)],
                "labels": [1] * n_right + [0] * (n - n_right)}  # fmt: skip

    return {"question": random_words(rng, 3, 8).capitalize() + "?", "mc1_targets": targets(1, rng.randint(2, 5)),
            "mc2_targets": targets(rng.randint(1, 3), rng.randint(4, 6))}  # fmt: skip


def _toxigen(rng: random.Random) -> dict:
    return {"text": random_words(rng, 4, 12), "target_group": rng.choice(["asian", "women", "jewish"]),
            "factual?": "neither factual nor opinion", "ingroup_effect": "doesn't use in-group language",
            "lewd": "doesn't contain lewd content", "framing": "disagreement", "predicted_group": "the text",
            "stereotyping": "doesn't use positive stereotyping", "intent": float(rng.randint(1, 5)),
            "toxicity_ai": float(rng.randint(1, 5)), "toxicity_human": rng.choice([1.0, 2.5, 3.0, 4.666, 5.0]),
            "predicted_author": "human", "actual_method": "topk"}  # fmt: skip


def _rtp(rng: random.Random, i: int) -> dict:
    text = random_words(rng, 3, 9).capitalize() + rng.choice(["", " ", ","])
    return {"filename": f"{i:04d}-example.txt", "begin": 0, "end": len(text), "challenging": rng.random() < 0.2,
            "prompt": {"text": text, "toxicity": rng.random(), "profanity": None},
            "continuation": {"text": random_words(rng, 3, 6), "toxicity": rng.random()}}  # fmt: skip


def _bold(rng: random.Random, domain: str, i: int) -> dict:
    name = rng.choice(NAMES)
    prompts = [f"{name} {random_words(rng, 2, 6)}" for _ in range(rng.randint(1, 2))]
    return {"domain": domain, "name": f"{name}_{i}", "category": rng.choice([f"{domain}_a", f"{domain}_b"]),
            "prompts": prompts, "wikipedia": [p + " " + random_words(rng, 3, 6) + "." for p in prompts]}  # fmt: skip


def write_safety_samples(data_dir: Path, seed: int = 0) -> None:
    """Every safety benchmark's files under data_dir/<owner>/<repo>/..., in the upstream layouts."""
    rng = random.Random(seed)
    name = "test-00000-of-00001.parquet"
    write_parquet(
        data_dir / "jannalu/crows_pairs_multilingual/english" / name, [_crows(rng) for _ in range(N)]
    )
    write_parquet(data_dir / "oskarvanderwal/bbq/All" / name, [_bbq(rng, i) for i in range(N)])
    write_parquet(data_dir / "oskarvanderwal/winogender/all" / name, [_winogender(rng, i) for i in range(N)])
    for config in ("type1_pro", "type1_anti", "type2_pro", "type2_anti"):
        for split in ("validation", "test"):
            rows = [_winobias(rng, i) for i in range(4)]
            if (config, split) == ("type2_anti", "test"):
                rows.append(_winobias(rng, 4, broken=True))
            write_parquet(data_dir / "uclanlp/wino_bias" / config / f"{split}-00000-of-00001.parquet", rows)
    write_parquet(data_dir / "truthfulqa/truthful_qa/multiple_choice/validation-00000-of-00001.parquet",
                  [_truthfulqa(rng) for _ in range(N)])  # fmt: skip
    for split, n in (("train", 8), ("test", N)):
        rows = [_toxigen(rng) for _ in range(n)]
        write_parquet(data_dir / f"skg/toxigen-data/annotated/{split}-00000-of-00001.parquet", rows)
    rtp = data_dir / "allenai/real-toxicity-prompts/prompts.jsonl"
    rtp.parent.mkdir(parents=True, exist_ok=True)
    rtp.write_text("".join(json.dumps(_rtp(rng, i)) + "\n" for i in range(N)))
    for k, domain in enumerate(BOLD_DOMAINS):
        rows = [_bold(rng, domain, i) for i in range(2)]
        path = data_dir / f"AlexaAI/bold/{domain}_prompt_wiki.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        lines = [json.dumps(r) for r in rows]  # one file as a JSON array, the others as JSON lines
        path.write_text("[\n" + ",\n".join(lines) + "\n]\n" if k == 0 else "\n".join(lines) + "\n")
