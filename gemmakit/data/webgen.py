"""A seeded generator of web-like documents with known labels: the corpus the data tests and the data
throughput benchmark run on (no corpus is downloaded).

Where it sits: beside the pipeline, used only by tests and benchmarks/data_throughput.py. `web_docs`
yields records {"id", "text", "kind"}: "kind" says what the document was made to be, so a test can
check each filter against the truth:
- "prose": English paragraphs from a ~300-word vocabulary of common words (passes the Gopher rules);
- "short", "symbols", "boilerplate", "repetitive": low-quality pages each aimed at one rule family;
- "pii_email" (personal: redacted) and "pii_card" (sensitive: dropped);
- "near_dup": an earlier prose document with a few words changed (word 5-gram Jaccard >= 0.8);
- "exact_dup": an earlier prose document with different case and spacing;
- "french", "german": prose in another language.

Key trade-off: bag-of-words prose is cheap and fully reproducible but reads like word salad; it has the
statistics the heuristics look at (word lengths, stop words, line structure, n-gram repetition), not
meaning, so it measures pipeline speed and rule behaviour, not classifier quality on real text.
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterator
from pathlib import Path

from gemmakit.data.pii import luhn_ok
from gemmakit.errors import UserError


class SynthError(UserError):
    """The demo corpus cannot be written where asked; names the path and the reason."""


def _words(text: str) -> list[str]:
    return text.split()


_EN = _words(
    "the of and to in a is that for it as was with be by on not he i this are or his from at which but have an "
    "they you were their one all we can her has there been if more when will would who so no time people "
    "year way day man thing woman life child world school state family student group country problem hand "
    "part place case week company system program question work government number night point home water "
    "room mother area money story fact month lot right study book eye job word business issue side kind "
    "head house service friend father power hour game line end member law car city community name "
    "president team minute idea kid body information back parent face others level office door health "
    "person art war history party result change morning reason research girl guy moment air teacher force "
    "education foot boy age policy process music market sense nation plan college interest death "
    "experience effect use class control care field development role effort rate heart drug show leader "
    "light voice wife police mind price report decision son view relationship town road arm difference "
    "value building action model season society tax director position player record paper space ground "
    "form event official matter center couple site project activity star table need court oil situation "
    "cost industry figure street image phone data picture practice piece land product doctor wall patient "
    "worker news test movie north love support technology step baby computer type attention film tree "
    "source organization hair window evidence population truth energy period course summer plant garden "
    "river bridge island mountain village harbour library museum kitchen"
)
_VERBS = _words("make take see know get give find think tell become leave feel bring begin keep hold write stand "
          "hear let mean set meet run pay sit speak lie lead read grow lose fall send build stay open walk "
          "carry remember visit describe explain follow")  # fmt: skip
_ADJ = _words("good new first last long great little own other old right big high different small large next early "
        "young important few public bad same able quiet bright careful simple modern ancient narrow gentle "
        "busy famous local certain clear")  # fmt: skip
_FR = _words("le la les de des un une et est dans pour que qui sur avec par pas plus nous vous ils elle sont "
       "maison ville temps travail monde jour année enfant famille pays histoire eau livre école rue "
       "toujours souvent aussi très bien petit grand nouveau vieux beau été avoir faire aller voir")  # fmt: skip
_DE = _words("der die das und ist nicht ein eine zu den mit von sich auf für dem auch es an werden aus er hat "
       "dass sie nach wird bei einer um noch wie einem über so zum kann Haus Stadt Zeit Arbeit Welt Tag "
       "Jahr Kind Familie Land Geschichte Wasser Buch Schule Straße immer oft sehr gut klein groß")  # fmt: skip
_STOP = ("the", "of", "and", "to", "that", "with", "have", "be", "a", "in")
KINDS = {"prose": 0.62, "short": 0.05, "symbols": 0.03, "boilerplate": 0.03, "repetitive": 0.04,
         "pii_email": 0.04, "pii_card": 0.02, "near_dup": 0.07, "exact_dup": 0.04, "french": 0.03,
         "german": 0.03}  # fmt: skip


def _sentence(rng: random.Random, words: list[str]) -> str:
    n = rng.randint(8, 22)
    out = []
    for i in range(n):
        r = rng.random()
        pool = _STOP if r < 0.2 and words is _EN else _VERBS if r < 0.32 else _ADJ if r < 0.45 else words
        w = rng.choice(pool)
        out.append(w)
        if i and i < n - 1 and rng.random() < 0.06:
            out[-1] += ","
    out[0] = out[0].capitalize()
    return " ".join(out) + rng.choice(".....!?")


def _prose(rng: random.Random, words: list[str] = _EN, paragraphs: tuple[int, int] = (2, 6)) -> str:
    paras = []
    for _ in range(rng.randint(*paragraphs)):
        paras.append(" ".join(_sentence(rng, words) for _ in range(rng.randint(3, 6))))
    return "\n\n".join(paras)


def _edit(rng: random.Random, text: str, edits: int) -> str:
    words = text.split(" ")
    for _ in range(edits):
        i = rng.randrange(len(words))
        op = rng.random()
        if op < 0.5:
            words[i] = rng.choice(_EN)
        elif op < 0.75:
            words.insert(i, rng.choice(_EN))
        elif len(words) > 20:
            del words[i]
    return " ".join(words)


def _card(rng: random.Random) -> str:
    body = "4" + "".join(str(rng.randrange(10)) for _ in range(14))  # a Visa prefix
    s = body + next(d for d in "0123456789" if luhn_ok(body + d))  # the one check digit that passes Luhn
    return " ".join(s[i : i + 4] for i in range(0, 16, 4))


def _make(kind: str, rng: random.Random, prose_pool: list[tuple[str, str]]) -> tuple[str, str]:
    """(text, id of the document it copies or ""): only duplicates copy."""
    if kind in ("near_dup", "exact_dup") and prose_pool:
        base_id, base = rng.choice(prose_pool)
        if kind == "near_dup":
            return _edit(rng, base, max(1, len(base.split()) // 150)), base_id
        return "  ".join(base.upper().split(" ")), base_id
    return _text(kind, rng), ""


def _text(kind: str, rng: random.Random) -> str:
    if kind in ("prose", "near_dup", "exact_dup"):
        return _prose(rng)
    if kind == "short":
        return _sentence(rng, _EN)
    if kind == "symbols":
        return " ".join(rng.choice(["#", "##", "...", "|", "#tag"]) + rng.choice(_EN) for _ in range(120))
    if kind == "boilerplate":
        return _prose(rng, paragraphs=(2, 3)) + "\n\nCookie policy. All rights reserved. Privacy policy."
    if kind == "repetitive":
        line = _sentence(rng, _EN)
        return "\n".join([line] * rng.randint(8, 20) + [_sentence(rng, _EN)])
    if kind == "pii_email":
        name = rng.choice(_EN) + str(rng.randrange(100))
        return _prose(rng, paragraphs=(2, 4)) + f"\n\nContact {name}@example.org for the full report."
    if kind == "pii_card":
        return _prose(rng, paragraphs=(2, 4)) + f"\n\nPaid with card {_card(rng)} on Monday."
    return _prose(rng, _FR if kind == "french" else _DE)


def web_docs(n: int, seed: int = 0, kinds: dict[str, float] | None = None) -> Iterator[dict]:
    """`n` records {"id", "text", "kind", "of"} ("of": the id a duplicate copies, else ""); the same
    (n, seed, kinds) gives the same records anywhere."""
    rng = random.Random(seed)
    table = kinds or KINDS
    names, weights = list(table), list(table.values())
    pool: list[tuple[str, str]] = []
    for i in range(n):
        kind = rng.choices(names, weights)[0]
        doc_id = f"web-{seed}-{i}"
        text, of = _make(kind, rng, pool)
        if kind == "prose":
            pool.append((doc_id, text))
            if len(pool) > 500:  # bound memory; duplicates then come from the recent past
                pool.pop(rng.randrange(len(pool)))
        yield {"id": doc_id, "text": text, "kind": kind, "of": of}


EVAL_ITEMS = [
    "Which of the following rivers carries the most water into the northern harbour during the long summer "
    "season of the ancient village",
    "A careful student measured the quiet garden every morning for one month and wrote the result in a small "
    "book; what was the average",
    "The famous director of the local museum described the history of the narrow bridge to a young visitor; "
    "which year did he name",
]


def write_demo_corpus(out: Path, n: int, seed: int = 0, files: int = 4) -> list[Path]:
    """A corpus to try the pipeline on: `files` JSONL files of `n` web-like documents under out/web/, and
    out/evals/quiz.jsonl, an evaluation set that about one document in a hundred quotes (so the
    decontamination stage has something to find). Returns the files written."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise SynthError(f"--out {out}: exists and is not a directory")
    rng = random.Random(seed)
    try:
        (out / "web").mkdir(parents=True, exist_ok=True)
        (out / "evals").mkdir(parents=True, exist_ok=True)
        paths = [out / "web" / f"part-{i:03d}.jsonl" for i in range(files)]
        handles = [open(p, "w", encoding="utf-8") for p in paths]  # noqa: SIM115 (closed below)
    except OSError as e:  # read-only filesystem, no permission, a parent that is a file
        raise SynthError(f"--out {out}: cannot write there ({e.strerror or e})") from None
    try:
        for i, d in enumerate(web_docs(n, seed)):
            if d["kind"] == "prose" and rng.random() < 0.01:
                d["text"] += "\n\n" + rng.choice(EVAL_ITEMS) + "?"
            handles[i % files].write(json.dumps({"id": d["id"], "text": d["text"]}) + "\n")
    finally:
        for h in handles:
            h.close()
    quiz = out / "evals" / "quiz.jsonl"
    quiz.write_text("".join(json.dumps({"question": q + "?"}) + "\n" for q in EVAL_ITEMS), encoding="utf-8")
    return [*paths, quiz]
