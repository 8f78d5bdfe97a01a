"""PII detection on a labelled set the test generates: recall per kind (>= 0.95 for emails, phones and
cards; reported for the rest), no findings on look-alike negatives, and the drop / redact policy."""

from __future__ import annotations

import random

import pytest

from gemmakit.data.pii import PiiConfig, apply_pii_policy, find_pii, iban_ok, luhn_ok

pytest.importorskip("phonenumbers")

FILLER = ["The meeting moved to Thursday.", "Please see the attached notes.", "Call me when you land.",
          "Our office is on the second floor.", "Thanks again for your help!"]  # fmt: skip


def _card(rng: random.Random) -> str:
    prefix, length = rng.choice([("4", 16), ("51", 16), ("55", 16), ("37", 15), ("6011", 16)])
    body = prefix + "".join(rng.choice("0123456789") for _ in range(length - len(prefix) - 1))
    check = next(d for d in "0123456789" if luhn_ok(body + d))
    digits = body + check
    sep = rng.choice(["", " ", "-"])
    return sep.join(digits[i : i + 4] for i in range(0, len(digits), 4))


def _phone(rng: random.Random) -> str:
    area, exch, line = (
        rng.choice(["212", "415", "617", "312", "206"]),
        rng.randint(200, 989),
        rng.randint(0, 9999),
    )
    if exch == 555:
        exch = 556
    fmt = rng.choice(["({a}) {e}-{l:04d}", "{a}-{e}-{l:04d}", "+1 {a} {e} {l:04d}", "{a}.{e}.{l:04d}"])
    return fmt.format(a=area, e=exch, l=line) if rng.random() < 0.8 else rng.choice(
        ["+44 20 7946 0958", "+49 30 901820", "+33 1 42 68 53 00"])  # fmt: skip


def _email(rng: random.Random) -> str:
    user = rng.choice(["anna", "j.smith", "bob_42", "x+tag", "mary.o-neil"])
    return f"{user}{rng.randint(1, 999)}@{rng.choice(['example.com', 'mail.co.uk', 'uni.edu', 'corp.io'])}"


GENERATORS = {
    "email": _email,
    "phone": _phone,
    "card": _card,
    "national_id": lambda r: f"{r.randint(100, 665)}-{r.randint(10, 99)}-{r.randint(1000, 9999)}",
    "ip": lambda r: ".".join(str(r.randint(1, 254)) for _ in range(4)),
    "iban": lambda r: r.choice(
        [
            "GB82 WEST 1234 5698 7654 32",
            "DE89 3704 0044 0532 0130 00",
            "FR1420041010050500013M02606",
            "NL91ABNA0417164300",
        ]
    ),  # fmt: skip
    "secret": lambda r: r.choice(
        [
            "AKIA" + "".join(r.choice("ABCDEFGHIJKLMNOPQRSTUVWXYZ234567") for _ in range(16)),
            "ghp_" + "".join(r.choice("abcdefghijklmnopqrstuvwxyz0123456789") for _ in range(36)),
        ]
    ),  # fmt: skip
}
NEGATIVES = ["Order 1234-5678-9012-3457 shipped.", "It happened on 2024-05-17 at 10:30.", "Version 10.0.19045.2965",
             "Room 101, floor 3, building 12.", "The answer is 42 and the year 1999.", "ISBN 0-306-40615-2",
             "Invoice total: 1,234,567.89 USD", "Coordinates 48.8566, 2.3522", "user at example dot com"]  # fmt: skip


def test_recall_on_a_generated_labelled_set() -> None:
    rng = random.Random(0)
    recall = {}
    for kind, gen in GENERATORS.items():
        hits = 0
        for _ in range(200):
            value = gen(rng)
            text = f"{rng.choice(FILLER)} Contact: {value}. {rng.choice(FILLER)}"
            start = text.index(value)
            found = find_pii(text)
            hits += any(
                f.kind == kind and f.start <= start and f.end >= start + len(value) - 1 for f in found
            )
        recall[kind] = hits / 200
    print("PII recall:", recall)
    assert recall["email"] >= 0.95 and recall["phone"] >= 0.95 and recall["card"] >= 0.95, recall
    assert min(recall.values()) >= 0.9, recall


def test_look_alikes_are_not_flagged() -> None:
    false = {t: find_pii(t) for t in NEGATIVES + FILLER}
    assert not any(false.values()), {t: f for t, f in false.items() if f}


def test_policy_drops_sensitive_and_redacts_personal() -> None:
    text, reason, _ = apply_pii_policy("Mail anna@example.com or call (212) 736-5000 from 8.8.8.8 today.")
    assert reason == "pii_redacted" and text == "Mail <EMAIL> or call <PHONE> from <IP_ADDRESS> today."
    text, reason, _ = apply_pii_policy("Card 4111 1111 1111 1111, mail anna@example.com")
    assert text is None and reason == "pii_card"
    assert apply_pii_policy("Nothing personal here.") == ("Nothing personal here.", "", [])
    # severities are configurable: treat emails as sensitive, ignore cards
    cfg = PiiConfig(kinds=("email",), severity={"email": "sensitive"})
    assert apply_pii_policy("Card 4111 1111 1111 1111, mail anna@example.com", cfg)[1] == "pii_email"
    assert luhn_ok("4111111111111111") and not luhn_ok("4111111111111112")
    assert iban_ok("GB82 WEST 1234 5698 7654 32") and not iban_ok("GB82 WEST 1234 5698 7654 33")
