"""Document filters (gemmakit.data.filters): keep / drop / rewrite per kind, chat documents, config
errors, determinism (twice in-process and in a spawned worker), and measured quality: toxicity precision
and recall on a generated labelled set, language-id accuracy on paragraphs written for the test.

References are independent of the code under test: hand-labelled texts, the generated labels, and
pii.apply_pii_policy for the rewritten turns. Run with `pytest -s` to see the measurements.
"""

from __future__ import annotations

import itertools
import multiprocessing
import random
import re
import sys
from pathlib import Path

import pytest

from gemmakit.data.filters import FILTERS, QUALITY_REASONS, FilterError, build_filter, reason_codes
from gemmakit.data.pii import apply_pii_policy
from gemmakit.data.safety_filters import split_chunks
from gemmakit.data.sources import Doc, chat_text

pytest.importorskip("phonenumbers")

EN = [
    "The village library reopened last spring after a long renovation. Volunteers repainted the reading "
    "room, repaired the old oak shelves and catalogued thousands of donated books. Children now gather "
    "there every Saturday morning to hear stories, and the librarian says visits have doubled since then.",
    "Heavy rain is expected across the northern valleys tomorrow, with strong winds along the coast. "
    "Drivers should allow extra time for their journeys, and anyone living near the river is advised to "
    "check the flood warnings before they leave home in the evening.",
    "To make the soup, soften an onion in butter, add two chopped carrots and a handful of red lentils, "
    "then pour in a litre of stock. Let it simmer for twenty minutes, season it well and blend it until "
    "smooth. It keeps in the fridge for three days and freezes well.",
]
FR = [
    "La bibliothèque du village a rouvert ses portes au printemps dernier après de longs travaux. Des "
    "bénévoles ont repeint la salle de lecture, réparé les vieilles étagères en chêne et catalogué des "
    "milliers de livres donnés. Les enfants s'y retrouvent chaque samedi matin pour écouter des histoires.",
    "De fortes pluies sont attendues demain dans les vallées du nord, avec des vents violents sur la côte. "
    "Les automobilistes doivent prévoir plus de temps pour leurs trajets, et les habitants proches de la "
    "rivière sont invités à consulter les alertes avant de quitter leur domicile.",
    "Pour préparer la soupe, faites revenir un oignon dans du beurre, ajoutez deux carottes coupées et une "
    "poignée de lentilles corail, puis versez un litre de bouillon. Laissez mijoter vingt minutes, "
    "assaisonnez et mixez jusqu'à obtenir une texture lisse.",
]
DE = [
    "Die Dorfbibliothek wurde im vergangenen Frühjahr nach einer langen Renovierung wieder eröffnet. "
    "Freiwillige haben den Lesesaal neu gestrichen, die alten Eichenregale repariert und tausende "
    "gespendete Bücher katalogisiert. Jeden Samstagmorgen treffen sich dort Kinder, um Geschichten zu hören.",
    "Morgen wird in den nördlichen Tälern mit starkem Regen gerechnet, an der Küste weht ein kräftiger "
    "Wind. Autofahrer sollten mehr Zeit für ihre Fahrt einplanen, und wer in der Nähe des Flusses wohnt, "
    "sollte vor dem Verlassen des Hauses die Hochwasserwarnungen prüfen.",
    "Für die Suppe eine Zwiebel in Butter andünsten, zwei gehackte Karotten und eine Handvoll rote Linsen "
    "dazugeben und mit einem Liter Brühe aufgießen. Zwanzig Minuten köcheln lassen, gut würzen und fein "
    "pürieren. Sie hält sich drei Tage im Kühlschrank.",
]
ES = [
    "La biblioteca del pueblo volvió a abrir la primavera pasada después de una larga reforma. Los "
    "voluntarios pintaron la sala de lectura, arreglaron las viejas estanterías de roble y catalogaron "
    "miles de libros donados. Los niños se reúnen allí cada sábado por la mañana para escuchar cuentos.",
    "Mañana se esperan lluvias intensas en los valles del norte, con fuertes vientos en la costa. Los "
    "conductores deben calcular más tiempo para sus viajes, y quienes viven cerca del río deberían "
    "consultar los avisos de inundación antes de salir de casa.",
    "Para hacer la sopa, sofríe una cebolla en mantequilla, añade dos zanahorias picadas y un puñado de "
    "lentejas rojas, y vierte un litro de caldo. Deja que hierva a fuego lento veinte minutos, sazona bien "
    "y tritúrala hasta que quede fina.",
]
PARAGRAPHS = {"en": EN, "fr": FR, "de": DE, "es": ES}


def _doc(text: str, **meta: object) -> Doc:
    return Doc("d", text, dict(meta))


def _chat(*turns: tuple[str, str]) -> Doc:
    messages = [{"role": r, "content": c} for r, c in turns]
    return Doc("c", chat_text(messages), {"messages": messages, "source": "sft.jsonl", "line": 1})


def _frozen_copy(doc: Doc) -> tuple:
    turns = doc.meta.get("messages")
    return doc.text, repr(sorted(doc.meta.items(), key=str)), repr(turns)


# ---- config errors -----------------------------------------------------------------------------------


def test_unknown_kind_lists_the_valid_kinds() -> None:
    with pytest.raises(
        FilterError, match=r"unknown filter kind 'toxic'; valid kinds: quality, language"
    ) as e:
        build_filter("toxic", {})
    assert "\n" not in str(e.value) and all(k in str(e.value) for k in FILTERS)


@pytest.mark.parametrize(
    ("kind", "params", "needle"),
    [
        ("quality", {"min_wrods": 10}, "stage.quality.min_wrods"),
        ("quality", {"min_words": "ten"}, "stage.quality.min_words: expected int"),
        ("language", {"languages": ["en", "xx"]}, "stage.language.languages: unknown code(s) ['xx']"),
        ("language", {"min_confidence": 1.5}, "min_confidence must be in [0, 1]"),
        ("toxicity", {"turns": "assistant"}, "stage.toxicity.turns: 'assistant'"),
        ("toxicity", {"classifier": "perspective"}, "stage.toxicity.classifier: 'perspective'"),
        ("toxicity", {"threshold": 2}, "stage.toxicity.threshold: 2.0"),
        ("pii", {"severity": {"email": "loud"}}, "stage.pii.severity.email: 'loud'"),
        ("pii", {"kinds": ["email", "passport"]}, "stage.pii.kinds: unknown ['passport']"),
        ("pii", {"phone_region": "XX"}, "stage.pii.phone_region: 'XX'"),
        ("self_identification", {"patterns": ["I am (ChatGPT"]}, "stage.self_identification.patterns: 'I am (ChatGPT'"),
    ],
)  # fmt: skip
def test_bad_config_is_one_line_naming_the_key(kind: str, params: dict, needle: str) -> None:
    with pytest.raises(FilterError) as e:
        build_filter(kind, params, source="recipes/data.toml")
    msg = str(e.value)
    assert msg.startswith("recipes/data.toml: ") and needle in msg and "\n" not in msg, msg


def test_missing_lexicon_file_is_named(tmp_path: Path) -> None:
    missing = tmp_path / "words.txt"
    with pytest.raises(
        FilterError, match=rf"stage.toxicity.lexicon_file: {re.escape(str(missing))}: no such file"
    ):
        build_filter("toxicity", {"classifier": "", "lexicon_file": str(missing)})


@pytest.mark.parametrize(
    ("spec", "needle"),
    [
        ("no_colon_here", "is not of the form 'package.module:function'"),
        ("gemmakit_no_such_module_xyz:score", "cannot import 'gemmakit_no_such_module_xyz' (ModuleNotFoundError"),
        ("gemmakit.data.sources:MODEL_ROLES", "has no callable 'MODEL_ROLES'"),
        ("gemmakit.data.sources:nope", "has no callable 'nope'"),
    ],
)  # fmt: skip
def test_bad_scorer_is_named(spec: str, needle: str) -> None:
    with pytest.raises(FilterError) as e:
        build_filter("toxicity", {"classifier": "", "scorer": spec})
    assert "stage.toxicity.scorer" in str(e.value) and repr(spec) in str(e.value) and needle in str(e.value)


def test_missing_optional_packages_say_how_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    from gemmakit.data import filters

    monkeypatch.setitem(sys.modules, "profanity_check", None)  # None in sys.modules: ImportError
    with pytest.raises(FilterError, match=r"stage.toxicity.classifier: .*pip install 'gemmakit\[data\]'"):
        build_filter("toxicity", {})
    monkeypatch.setitem(sys.modules, "py3langid.langid", None)
    filters._langid.cache_clear()  # the identifier is cached per process; reloaded by later tests
    try:
        with pytest.raises(FilterError, match=r"stage.language: needs py3langid >= 0.4 .*gemmakit\[data\]"):
            build_filter("language", {})
    finally:
        filters._langid.cache_clear()


def test_langid_model_loads_without_unpickling(monkeypatch: pytest.MonkeyPatch) -> None:
    """py3langid <= 0.3 unpickled its model (pickle.load of model.plzma); the filter needs the npz loader."""
    import pickle

    from gemmakit.data import filters

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("the language model must load without unpickling")

    for name in ("load", "loads", "Unpickler"):
        monkeypatch.setattr(pickle, name, refuse)
    filters._langid.cache_clear()
    try:
        doc = _doc(EN[0])
        assert build_filter("language", {})(doc) == (doc, "")
    finally:
        filters._langid.cache_clear()


# ---- quality -----------------------------------------------------------------------------------------


def test_quality_keeps_prose_and_drops_short_text_with_the_rule_as_reason() -> None:
    f = build_filter("quality", {})
    long_doc = _doc(" ".join(EN))
    assert f(long_doc) == (long_doc, "")
    assert f(_doc("Too short to be useful.")) == (None, "gopher_min_words")
    assert f(_chat(("user", "hi"), ("model", "Hello! How can I help?"))) == (None, "gopher_min_words")
    relaxed = build_filter("quality", {"min_words": 3, "min_stop_words": 0, "max_top_ngram": [1, 1, 1]})
    short = _doc("Too short to be useful.")
    assert relaxed(short) == (short, "")


def test_quality_reason_codes_match_quality_module() -> None:
    """Every code `quality()` can return is listed (literal strings and the n-gram f-strings)."""
    src = (Path(__file__).resolve().parents[1] / "gemmakit" / "data" / "quality.py").read_text()
    literal = set(re.findall(r'"((?:gopher|c4)_[a-z_]+)"', src))
    ngram = {f"gopher_top_{k}gram" for k in (2, 3, 4)} | {f"gopher_dup_{k}gram" for k in range(5, 11)}
    assert 'f"gopher_top_{k}gram"' in src and 'f"gopher_dup_{k}gram"' in src
    assert set(QUALITY_REASONS) == literal | ngram
    assert reason_codes("quality", {}) == QUALITY_REASONS


# ---- language ----------------------------------------------------------------------------------------


def test_language_keeps_english_drops_others_and_reports_accuracy() -> None:
    from py3langid.langid import MODEL_FILE, LanguageIdentifier

    ident = LanguageIdentifier.from_model_file(MODEL_FILE, norm_probs=True)
    labelled = [(lang, p) for lang, ps in PARAGRAPHS.items() for p in ps]
    correct = sum(ident.classify(p)[0] == lang for lang, p in labelled)
    print(f"\nlangid accuracy on the test paragraphs: {correct}/{len(labelled)}")
    assert correct == len(labelled)

    english, french = build_filter("language", {}), build_filter("language", {"languages": ["fr"]})
    for lang, p in labelled:
        doc = _doc(p)
        assert english(doc) == ((doc, "") if lang == "en" else (None, "language")), (lang, p[:40])
        assert french(doc) == ((doc, "") if lang == "fr" else (None, "language")), (lang, p[:40])
    assert english(_doc("")) == (None, "language")  # nothing to judge: uniform probabilities
    assert english(_doc("12345 67890 ---")) == (None, "language")
    chat = _chat(("user", EN[0]), ("model", EN[1]))
    assert english(chat) == (chat, "")


def test_language_judges_only_the_prefix() -> None:
    f = build_filter("language", {"max_chars": 300})
    mixed = _doc(EN[0] + "\n\n" + " ".join(DE * 5))  # English first 300 characters, mostly German after
    assert f(mixed) == (mixed, "")
    assert build_filter("language", {"max_chars": 5000})(mixed) == (None, "language")


# ---- toxicity ----------------------------------------------------------------------------------------

PEOPLE = ["Anna", "the new manager", "my neighbour", "your brother", "that guy from accounting", "the referee",
          "Professor Okafor", "the landlord"]  # fmt: skip
BENIGN = [
    "{p} said the meeting moved to Thursday afternoon.",
    "Could {p} send me the quarterly report before lunch?",
    "We walked along the river with {p} and talked about books.",
    "{p} recommended a great recipe for lentil soup.",
    "Thanks to {p}, the garden finally looks tidy again.",
    "{p} is flying to Lisbon next week for a conference on soil chemistry.",
    "I asked {p} whether the library opens on Sundays.",
    "{p} fixed the leaking tap in the kitchen this morning.",
    "According to {p}, the bus timetable changes in September.",
    "{p} thinks we should paint the fence green this year.",
]
HARD_NEGATIVES = [
    "If the server hangs, kill the process and restart it.",
    "Use kill -9 to kill the process when it ignores SIGTERM.",
    "We will shoot a photo of the team at noon.",
    "She went out to shoot a photo of the sunset over the bay.",
    "Scunthorpe United won their match on Saturday.",
    "The train to Scunthorpe leaves from platform two.",
    "The assassination of Archduke Franz Ferdinand triggered the First World War.",
    "Historians still debate the causes of the assassination of Archduke Franz Ferdinand.",
    "The doctor examined the patient's breast for lumps during the screening.",
    "Testicular cancer is most common in men aged 15 to 35.",
    "The urologist explained how the prostate and penis are affected by the condition.",
    "Cervical screening checks the health of the cervix and vagina.",
    "A rectal exam can detect problems in the lower bowel.",
    "The anus is the opening at the end of the digestive tract.",
    "The bomb squad safely defused the device near the station.",
    "The film's final battle scene was shot in Morocco.",
    "Execute the script with the debug flag to see every step.",
    "The child process is killed when its parent exits.",
    "Hit the gym early if you want a free treadmill.",
    "The hunter loaded his rifle before dawn.",
    "Our team crushed the deadline and shipped on time.",
    "That concert was sick, the drummer was insane.",
    "Dick Van Dyke starred in Mary Poppins.",
    "The cocktail was served with a slice of orange.",
    "Press the button to execute the order.",
    "The virus attacks the immune system's white blood cells.",
    "The surgeon made an incision below the navel.",
    "Breastfeeding is recommended for the first six months.",
    "The mass murder at Srebrenica is described in the tribunal records.",
    "He died peacefully in his sleep at the age of ninety.",
]
INSULTS = ["idiot", "moron", "loser", "pathetic waste of space", "piece of garbage", "scumbag", "asshole",
           "stupid jerk", "worthless clown", "bitch", "imbecile", "dumbass"]  # fmt: skip
ABUSIVE = [
    "You are a {i}.",
    "Shut up, you {i}.",
    "{p} is a complete {i} and everyone knows it.",
    "Nobody cares what you think, you {i}.",
    "Get lost, you {i}, nobody wants you here.",
    "What a {i}, go to hell.",
    "Only a {i} like you would write something this dumb.",
    "Listen here, you {i}, nobody asked for your opinion.",
]
THREATS = [
    "I will find you and beat you until you bleed.",
    "I'm going to kill you and your whole family.",
    "Keep talking and I'll smash your face in.",
    "I hope you die in a fire, you piece of shit.",
    "Watch your back, I know where you live and I will hurt you.",
    "Fuck off and never come back.",
    "You stupid fucking idiot, learn to read.",
    "Go kill yourself, nobody would miss you.",
    "I'm going to punch you so hard you won't wake up.",
    "Die, you worthless bastard.",
]


def _labelled_sentences() -> list[tuple[str, int]]:
    """296 sentences: 170 benign (90 of them hard negatives) and 126 abusive / threatening."""
    rng = random.Random(0)
    benign = [t.format(p=p) for t, p in itertools.product(BENIGN, PEOPLE)] + HARD_NEGATIVES * 3
    abusive = [t.format(i=i, p=rng.choice(PEOPLE)) for t, i in itertools.product(ABUSIVE, INSULTS)]
    return [(s, 0) for s in benign] + [(s, 1) for s in abusive + THREATS * 3]


def _labelled_documents() -> list[tuple[Doc, int]]:
    """300 documents of 3-8 benign sentences (30% open with a hard negative); every other one also holds
    one abusive sentence somewhere."""
    rng = random.Random(1)
    ordinary = [t.format(p=p) for t, p in itertools.product(BENIGN, PEOPLE)]
    abusive = [s for s, label in _labelled_sentences() if label]
    docs = []
    for i in range(300):
        sents = [rng.choice(ordinary) for _ in range(rng.randint(3, 8))]
        if rng.random() < 0.3:
            sents[0] = rng.choice(HARD_NEGATIVES)
        if i % 2:
            sents.insert(rng.randrange(len(sents) + 1), rng.choice(abusive))
        docs.append((_doc((" " if rng.random() < 0.5 else "\n\n").join(sents)), i % 2))
    return docs


def _precision_recall(flags: list[bool], labels: list[int]) -> tuple[float, float]:
    tp = sum(f and y for f, y in zip(flags, labels, strict=True))
    fp = sum(f and not y for f, y in zip(flags, labels, strict=True))
    return tp / max(tp + fp, 1), tp / max(sum(labels), 1)


@pytest.fixture(scope="module")
def toxicity() -> object:
    pytest.importorskip("profanity_check")
    return build_filter("toxicity", {})


def test_toxicity_classifier_precision_recall(toxicity: object) -> None:
    sentences = _labelled_sentences()
    flags = [toxicity(_doc(s))[1] == "toxicity_classifier" for s, _ in sentences]
    p_s, r_s = _precision_recall(flags, [y for _, y in sentences])
    docs = _labelled_documents()
    verdicts = [toxicity(d) for d, _ in docs]
    assert {r for _, r in verdicts} <= {"", "toxicity_classifier"}
    p_d, r_d = _precision_recall([v is None for v, _ in verdicts], [y for _, y in docs])
    print(f"\ntoxicity classifier (threshold 0.7): sentences n={len(sentences)} P={p_s:.3f} R={r_s:.3f}; "
          f"documents n={len(docs)} P={p_d:.3f} R={r_d:.3f}")  # fmt: skip
    # Measured: sentences P 0.945 R 0.825, documents P 0.992 R 0.807 (misses: threats without swearing).
    assert p_s >= 0.9 and r_s >= 0.8
    assert p_d >= 0.95 and r_d >= 0.75


def test_fast_classifier_path_equals_the_package() -> None:
    """The filter skips scikit-learn's per-call validation; its probabilities must be the package's."""
    profanity_check = pytest.importorskip("profanity_check")
    from gemmakit.data.safety_filters import load_profanity_check

    fast = load_profanity_check("test")
    assert fast is not profanity_check.predict_prob  # the fast path is in use
    texts = [s for s, _ in _labelled_sentences()] + EN + FR
    assert max(abs(fast(texts) - profanity_check.predict_prob(texts))) < 1e-9


def test_toxicity_judges_each_sentence_and_only_model_turns_when_asked(toxicity: object) -> None:
    long_doc = _doc(" ".join(EN * 3) + " You are a stupid idiot. " + " ".join(EN * 3))
    assert toxicity(long_doc) == (None, "toxicity_classifier")
    assert (
        split_chunks("One. Two!\n\nThree? " + "x " * 150, 100)
        == ["One.", "Two!", "Three?"] + ["x " * 49 + "x"] * 3
    )
    assert split_chunks("y" * 250, 100) == ["y" * 100, "y" * 100, "y" * 50]
    abusive_user = _chat(("user", "You are a stupid idiot, answer me."), ("model", "Here is the answer: 42."))
    assert toxicity(abusive_user) == (None, "toxicity_classifier")
    model_only = build_filter("toxicity", {"turns": "model"})
    assert model_only(abusive_user) == (abusive_user, "")
    abusive_model = _chat(("user", "What is 6 times 7?"), ("model", "Shut up, you moron."))
    assert model_only(abusive_model) == (None, "toxicity_classifier")
    benign = _doc(" ".join(EN))
    assert toxicity(benign) == (benign, "")


def test_toxicity_lexicon_whole_words_case_insensitive(tmp_path: Path) -> None:
    f = build_filter("toxicity", {"classifier": "", "lexicon": ["darn", "heck off"]})
    for text in ("Well, DARN it.", "Just heck   off now.", "heck\noff"):
        assert f(_doc(text)) == (None, "toxicity_lexicon"), text
    for text in ("She was darning socks.", "Check off the list.", "heckoff"):
        doc = _doc(text)
        assert f(doc) == (doc, ""), text
    lex = tmp_path / "lexicon.txt"
    lex.write_text("# words we never want\ndarn\n\nblast   # a trailing comment\n", encoding="utf-8")
    g = build_filter("toxicity", {"classifier": "", "lexicon_file": str(lex), "max_lexicon_hits": 1})
    one = _doc("Blast, the bus left.")
    assert g(one) == (one, "")  # one hit is allowed
    assert g(_doc("Blast! Darn it.")) == (None, "toxicity_lexicon")
    over_turns = _chat(("user", "blast"), ("model", "darn"))
    assert g(over_turns) == (None, "toxicity_lexicon")  # hits add up over turns
    assert reason_codes("toxicity", {"classifier": "", "lexicon_file": str(lex)}) == ("toxicity_lexicon",)


def test_toxicity_scorer_hook(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "my_scorers.py").write_text(
        "def shouting(text: str) -> float:\n"
        "    letters = [c for c in text if c.isalpha()]\n"
        "    return sum(c.isupper() for c in letters) / max(len(letters), 1)\n"
        "def broken(text: str) -> float:\n"
        "    return 7.0\n",
        encoding="utf-8",
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    f = build_filter("toxicity", {"classifier": "", "scorer": "my_scorers:shouting", "scorer_threshold": 0.8})
    calm = _doc("Please pass the salt.")
    assert f(calm) == (calm, "")
    assert f(_doc("PLEASE PASS THE SALT NOW")) == (None, "toxicity_scorer")
    chat = _chat(("user", "WHY IS THIS BROKEN"), ("model", "Let us look at the logs together."))
    assert f(chat) == (None, "toxicity_scorer")
    g = build_filter("toxicity", {"classifier": "", "scorer": "my_scorers:shouting", "turns": "model"})
    assert g(chat) == (chat, "")
    bad = build_filter("toxicity", {"classifier": "", "scorer": "my_scorers:broken"})
    with pytest.raises(FilterError, match=r"my_scorers:broken returned 7.0; expected a float in \[0, 1\]"):
        bad(calm)
    codes = reason_codes("toxicity", {"scorer": "my_scorers:shouting"})
    assert codes == ("toxicity_classifier", "toxicity_scorer")
    sys.modules.pop("my_scorers", None)


# ---- pii ---------------------------------------------------------------------------------------------

CARD = "4111 1111 1111 1111"  # the Visa test number: passes Luhn


def test_pii_drops_sensitive_and_redacts_personal_text() -> None:
    f = build_filter("pii", {})
    assert f(_doc(f"Card number {CARD}, expires soon.")) == (None, "pii_card")
    doc = _doc("Write to anna.k@example.com or call (415) 867-2345.", source="a.jsonl")
    new, reason = f(doc)
    assert reason == "pii_redacted" and new is not doc
    assert new.text == apply_pii_policy(doc.text)[0] == "Write to <EMAIL> or call <PHONE>."
    assert new.meta == doc.meta and new.meta is not doc.meta and new.id == doc.id
    assert doc.text == "Write to anna.k@example.com or call (415) 867-2345."
    clean = _doc("Nothing personal here.")
    assert f(clean) == (clean, "")


def test_pii_rewrites_every_chat_turn_without_mutating_the_input() -> None:
    f = build_filter("pii", {})
    doc = _chat(("user", "My email is bob_42@mail.co.uk, can you reply?"), ("model", "Sure, I will write to you."),
                ("user", "Or at 10.0.0.12."))  # fmt: skip
    before = _frozen_copy(doc)
    new, reason = f(doc)
    assert reason == "pii_redacted"
    assert [t["content"] for t in new.meta["messages"]] == [
        "My email is <EMAIL>, can you reply?", "Sure, I will write to you.", "Or at <IP_ADDRESS>."]  # fmt: skip
    assert [t["role"] for t in new.meta["messages"]] == ["user", "model", "user"]
    assert new.text == chat_text(new.meta["messages"]) and new.meta["source"] == "sft.jsonl"
    assert _frozen_copy(doc) == before  # input doc, its meta and its turns untouched
    card = _chat(("user", f"Charge {CARD} please."), ("model", "I can't process payments."))
    assert f(card) == (None, "pii_card")
    clean = _chat(("user", "Hello"), ("model", "Hi!"))
    assert f(clean) == (clean, "")


def test_pii_severity_table_overrides_only_the_kinds_it_names() -> None:
    f = build_filter("pii", {"severity": {"email": "sensitive"}})
    assert f(_doc("Mail anna.k@example.com today.")) == (None, "pii_email")
    assert f(_doc("Call (415) 867-2345 today."))[0].text == "Call <PHONE> today."
    g = build_filter("pii", {"kinds": ["card"]})
    plain = _doc("Mail anna.k@example.com today.")
    assert g(plain) == (plain, "")
    assert reason_codes("pii", {"kinds": ["card", "email"]}) == ("pii_redacted", "pii_card")
    assert reason_codes("pii", {"kinds": ["card"]}) == ("pii_card",)


# ---- self-identification -----------------------------------------------------------------------------

CLAIMS = [
    "I am ChatGPT, a large language model.",
    "Hello! I'm Claude. How can I help?",
    "I'm an AI assistant developed by OpenAI.",
    "As a language model trained by Anthropic, I cannot browse the web.",
    "Sure. As an AI created by OpenAI, I don't have opinions.",
    "My name is Claude and I am happy to help.",
    "I was created by OpenAI to be helpful.",
    "I am a large language model, trained by the team at OpenAI.",
    "I'm a model that was trained by Meta AI.",
    "OpenAI created me in 2022.",
    "I am GPT-4o, the latest model.",
    "i’m an openai language model.",
    "I am a Gemini model from Google.",
    "As ChatGPT, I must decline.",
    "You can call me Bard.",
]
NOT_CLAIMS = [
    "ChatGPT is a chatbot made by OpenAI.",
    "Claude was developed by Anthropic and released in 2023.",
    "I am not ChatGPT; I am Gemma, an open model.",
    "I wasn't created by OpenAI.",
    "I am sure ChatGPT was made by OpenAI.",
    "I was trained by Google DeepMind.",
    "I am Gemma, built by Google DeepMind.",
    "You asked whether I am ChatGPT. I am not.",
    "In this story I am a bard from the northern hills.",
    "I was trained by meta-learning on many tasks.",
    "Many people compare me with Claude and ChatGPT.",
]


def test_self_identification_model_turns() -> None:
    f = build_filter("self_identification", {})
    for claim in CLAIMS:
        for role in ("model", "assistant"):
            assert f(_chat(("user", "Who are you?"), (role, claim))) == (None, "self_identification"), claim
        assert f(_doc(claim)) == (None, "self_identification"), claim  # plain text: the whole text
    for text in NOT_CLAIMS:
        doc = _chat(("user", "Who are you?"), ("model", text))
        assert f(doc) == (doc, ""), text
    asked = _chat(("user", "Are you ChatGPT? I am ChatGPT's biggest fan."), ("model", "I am Gemma."))
    assert f(asked) == (asked, "")  # user turns are never judged


def test_self_identification_extra_patterns_and_empty_lists() -> None:
    f = build_filter("self_identification", {"names": [], "companies": [], "patterns": [r"\bI am Zephyr\b"]})
    assert f(_doc("Hi, I am Zephyr.")) == (None, "self_identification")
    doc = _doc("I am ChatGPT.")  # built-in lists emptied: nothing else matches
    assert f(doc) == (doc, "")
    g = build_filter("self_identification", {"names": ["Zed"], "companies": ["Acme Labs"]})
    assert g(_doc("I was built by Acme   Labs.")) == (None, "self_identification")
    assert g(_doc("I'm Zed.")) == (None, "self_identification")


# ---- determinism -------------------------------------------------------------------------------------

STAGES = [
    ("quality", {}),
    ("language", {}),
    ("toxicity", {"lexicon": ["darn"]}),
    ("pii", {}),
    ("self_identification", {}),
]


def _corpus() -> list[Doc]:
    docs = [_doc(p) for ps in PARAGRAPHS.values() for p in ps] + [_doc(" ".join(EN))]
    docs += [_doc(s) for s, _ in _labelled_sentences()[::10]] + [_doc(c) for c in CLAIMS[:5]]
    docs += [_chat(("user", "Mail anna.k@example.com"), ("model", "I'm Claude. Darn.")), _doc(f"Pay {CARD}")]
    return docs


def _verdicts(stages: list[tuple[str, dict]], docs: list[Doc]) -> list[list[tuple]]:
    """Per stage, per document: (kept text or None, reason)."""
    out = []
    for kind, params in stages:
        f = build_filter(kind, params)
        out.append([(None if d is None else (d.text, repr(d.meta)), r) for d, r in map(f, docs)])
    return out


def test_same_verdicts_when_built_twice_and_in_a_spawned_worker() -> None:
    pytest.importorskip("profanity_check")
    docs = _corpus()
    first, second = _verdicts(STAGES, docs), _verdicts(STAGES, docs)
    assert first == second
    reasons = {r for stage in first for _, r in stage if r}
    assert {"language", "toxicity_classifier", "toxicity_lexicon", "pii_card", "pii_redacted",
            "self_identification", "gopher_min_words"} <= reasons  # fmt: skip
    for (kind, params), stage in zip(STAGES, first, strict=True):
        assert {r for _, r in stage if r} <= set(reason_codes(kind, params)), kind
    with multiprocessing.get_context("spawn").Pool(1) as pool:  # the pipeline's worker setup
        assert pool.apply(_verdicts, (STAGES, docs)) == first
