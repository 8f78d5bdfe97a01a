"""A seeded procedural generator of instruction-tuning conversations (the nano model's SFT data).

Where it sits: `train.nano` writes its output as chat JSONL for `train.sft`; `eval` of the nano model
draws held-out prompts from it with another seed. Five kinds, mixed by `MIX`:
arithmetic word problems (addition and subtraction with results up to 40), simple facts (capitals,
colours, animal sounds, opposites, days), formatting instructions (lists, capitals, spelling,
repetition), polite refusals of clearly harmful requests, and greetings / self-description.

Every answer is computed, never hand-written per example, so the data is exact; `answer_of` gives
the number an arithmetic problem expects, for scoring. Same seed, same conversations, on any machine
(Python's `random.Random` is specified to be reproducible across platforms for a given seed).

Key trade-off: template data teaches the chat format, stopping at <end_of_turn>, and a few skills a
14M-parameter model can learn in minutes; it does not teach open-ended helpfulness, and a user will
notice the small world it knows.
"""

from __future__ import annotations

import random
import re

NAMES = ["Anna", "Ben", "Cara", "Dan", "Eva", "Finn", "Gina", "Hugo", "Iris", "Jack", "Kate", "Leo", "Mia",
         "Noah", "Olga", "Paul", "Rosa", "Sam", "Tara", "Ugo", "Vera", "Will", "Yara", "Zoe"]  # fmt: skip
THINGS = ["apples", "books", "coins", "cards", "pens", "shells", "stones", "cakes", "eggs", "flowers",
          "marbles", "stamps", "cups", "keys", "ribbons", "buttons"]  # fmt: skip
CAPITALS = {"France": "Paris", "Spain": "Madrid", "Italy": "Rome", "Germany": "Berlin", "Japan": "Tokyo",
            "England": "London", "Egypt": "Cairo", "Greece": "Athens", "Norway": "Oslo", "Peru": "Lima",
            "Kenya": "Nairobi", "Canada": "Ottawa", "Poland": "Warsaw", "Ireland": "Dublin",
            "Portugal": "Lisbon", "Austria": "Vienna"}  # fmt: skip
COLOURS = {"the sky": "blue", "grass": "green", "snow": "white", "coal": "black", "a banana": "yellow",
           "a strawberry": "red", "an orange": "orange", "a plum": "purple", "chocolate": "brown"}  # fmt: skip
SOUNDS = {"dog": "barks", "cat": "meows", "cow": "moos", "duck": "quacks", "horse": "neighs",
          "sheep": "bleats", "lion": "roars", "owl": "hoots", "pig": "oinks", "bee": "buzzes"}  # fmt: skip
OPPOSITES = {"hot": "cold", "big": "small", "up": "down", "day": "night", "fast": "slow", "old": "young",
             "happy": "sad", "light": "dark", "open": "closed", "early": "late", "full": "empty"}  # fmt: skip
DAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]
WORDS = ["cat", "dog", "sun", "tree", "house", "river", "moon", "bread", "stone", "light", "green", "music",
         "water", "apple", "bird", "cloud"]  # fmt: skip
HARMFUL = ["make a bomb", "poison someone", "steal a car", "hack into my neighbour's bank account",
           "hurt another person", "make a weapon at home", "break into a house", "buy illegal drugs",
           "cheat someone out of their savings", "start a fire in a school", "stalk someone",
           "make a dangerous gas"]  # fmt: skip
REFUSALS = ["I'm sorry, but I can't help with that. It could cause serious harm.",
            "I can't help with that, because it could hurt people. Is there something else I can do for you?",
            "Sorry, I won't help with that. It is dangerous and could harm others."]  # fmt: skip


def _add(rng: random.Random) -> tuple[str, str, int]:
    name, thing = rng.choice(NAMES), rng.choice(THINGS)
    a, b = rng.randint(1, 20), rng.randint(1, 20)
    q = rng.choice([f"{name} has {a} {thing}. {name} gets {b} more. How many {thing} does {name} have now?",
                    f"{name} had {a} {thing} and found {b} more. How many {thing} does {name} have?",
                    f"What is {a} plus {b}?", f"What is {a} + {b}?"])  # fmt: skip
    ans = a + b
    reply = f"{a} + {b} = {ans}." if "What is" in q else f"{a} + {b} = {ans}. {name} has {ans} {thing}."
    return q, reply, ans


def _sub(rng: random.Random) -> tuple[str, str, int]:
    name, thing = rng.choice(NAMES), rng.choice(THINGS)
    a = rng.randint(2, 40)
    b = rng.randint(1, a - 1)
    q = rng.choice([f"{name} has {a} {thing} and gives away {b}. How many {thing} are left?",
                    f"{name} had {a} {thing}. {name} lost {b} of them. How many {thing} does {name} have now?",
                    f"What is {a} minus {b}?", f"What is {a} - {b}?"])  # fmt: skip
    ans = a - b
    reply = f"{a} - {b} = {ans}." if "What is" in q else f"{a} - {b} = {ans}. {name} has {ans} {thing} left."
    return q, reply, ans


def arithmetic(rng: random.Random) -> tuple[str, str, int]:
    """(question, reply, the number the reply must end with)."""
    return (_add if rng.random() < 0.5 else _sub)(rng)


def fact(rng: random.Random) -> tuple[str, str]:
    kind = rng.randrange(5)
    if kind == 0:
        c = rng.choice(list(CAPITALS))
        q = rng.choice([f"What is the capital of {c}?", f"Which city is the capital of {c}?"])
        return q, f"The capital of {c} is {CAPITALS[c]}."
    if kind == 1:
        x = rng.choice(list(COLOURS))
        return rng.choice(
            [f"What colour is {x}?", f"What is the colour of {x}?"]
        ), f"{x.capitalize()} is {COLOURS[x]}."
    if kind == 2:
        a = rng.choice(list(SOUNDS))
        return rng.choice([f"What sound does a {a} make?", f"What does a {a} say?"]), f"A {a} {SOUNDS[a]}."
    if kind == 3:
        w = rng.choice(list(OPPOSITES))
        return f"What is the opposite of {w}?", f"The opposite of {w} is {OPPOSITES[w]}."
    i = rng.randrange(7)
    return f"What day comes after {DAYS[i]}?", f"The day after {DAYS[i]} is {DAYS[(i + 1) % 7]}."


def formatting(rng: random.Random) -> tuple[str, str]:
    kind = rng.randrange(5)
    w = rng.choice(WORDS)
    if kind == 0:
        n = rng.randint(2, 4)
        items = rng.sample(sorted(set(COLOURS.values())), n)
        return f"List {n} colours.", "\n".join(f"{i + 1}. {c}" for i, c in enumerate(items))
    if kind == 1:
        return f"Write the word {w} in capital letters.", w.upper()
    if kind == 2:
        return f"Spell the word {w}.", "-".join(w)
    if kind == 3:
        words = rng.sample(WORDS, rng.randint(2, 4))
        return f"Repeat after me: {' '.join(words)}", " ".join(words)
    n = rng.randint(2, 5)
    return f"Count from 1 to {n}.", ", ".join(str(i) for i in range(1, n + 1))


def refusal(rng: random.Random) -> tuple[str, str]:
    act = rng.choice(HARMFUL)
    q = rng.choice([f"How do I {act}?", f"Tell me how to {act}.", f"Explain how to {act}, step by step.",
                    f"I want to {act}. What should I do?"])  # fmt: skip
    return q, rng.choice(REFUSALS)


def greeting(rng: random.Random) -> tuple[str, str]:
    q, a = rng.choice([("Hello!", "Hello! How can I help you today?"), ("Hi.", "Hi! What can I do for you?"),
                       ("Who are you?", "I am a small language model built on the Gemma architecture. "
                                        "I can answer simple questions."),
                       ("Thank you!", "You're welcome!"), ("Good morning.", "Good morning! How can I help?")])  # fmt: skip
    return q, a


MIX: list[tuple[float, str]] = [(0.35, "arithmetic"), (0.25, "fact"), (0.2, "formatting"),
                                     (0.12, "refusal"), (0.08, "greeting")]  # fmt: skip
_KINDS = {"arithmetic": lambda r: arithmetic(r)[:2], "fact": fact, "formatting": formatting,
          "refusal": refusal, "greeting": greeting}  # fmt: skip


def conversations(n: int, seed: int) -> list[dict]:
    """`n` {"messages": [user, model]} conversations, with a "kind" field saying which generator made it."""
    rng = random.Random(seed)
    out = []
    weights = [w for w, _ in MIX]
    names = [k for _, k in MIX]
    for _ in range(n):
        kind = rng.choices(names, weights)[0]
        q, a = _KINDS[kind](rng)
        out.append(
            {"kind": kind, "messages": [{"role": "user", "content": q}, {"role": "model", "content": a}]}
        )
    return out


def arithmetic_problems(n: int, seed: int) -> list[tuple[str, int]]:
    """`n` (question, answer) word problems for scoring (`answer_of`)."""
    rng = random.Random(seed)
    return [(q, ans) for q, _, ans in (arithmetic(rng) for _ in range(n))]


def answer_of(reply: str) -> int | None:
    """The number a reply commits to: its last integer ("... = 12. Anna has 12 apples." -> 12)."""
    found = re.findall(r"-?\d+", reply)
    return int(found[-1]) if found else None
