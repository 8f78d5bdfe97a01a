"""Personal and sensitive data in text: detection, and the report's two-level policy (drop or redact).

Where it sits: a filter of the data pipeline (pretraining and SFT data); pure functions of text.
The Gemma report removes "certain personal information and other sensitive data"; as in its tool,
findings come in two severities (`SEVERITY`, configurable through `PiiConfig`):
- sensitive (payment cards, national ids, IBANs, secrets and API keys): the document is dropped;
- personal (emails, phone numbers, IP addresses): replaced by typed placeholders such as <EMAIL>.

Detectors: regular expressions narrowed by checks that real values satisfy: the Luhn checksum for
cards, ISO 13616 mod-97 for IBANs, `phonenumbers` (Google's libphonenumber port) for phones with a
region hint, octet ranges for IPv4, and the SSA's invalid-range rules for US SSNs.

Key trade-off: validation before flagging trades some recall on malformed values (a card with a
typo fails Luhn and stays) for far fewer false positives on numbers that merely look like ids
(order numbers, timestamps), which in pretraining data are much more common than real PII.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass, field

SENSITIVE, PERSONAL = "sensitive", "personal"
SEVERITY = {"card": SENSITIVE, "national_id": SENSITIVE, "iban": SENSITIVE, "secret": SENSITIVE,
            "email": PERSONAL, "phone": PERSONAL, "ip": PERSONAL}  # fmt: skip
PLACEHOLDER = {"email": "<EMAIL>", "phone": "<PHONE>", "ip": "<IP_ADDRESS>", "card": "<CARD>",
               "national_id": "<NATIONAL_ID>", "iban": "<IBAN>", "secret": "<SECRET>"}  # fmt: skip

_EMAIL = re.compile(
    r"(?<![\w.+-])[A-Za-z0-9][A-Za-z0-9._%+-]{0,63}@(?:[A-Za-z0-9-]{1,63}\.)+[A-Za-z]{2,24}\b"
)
_CARD = re.compile(r"(?<![\d-])(?:\d[ -]?){12,18}\d(?![\d-])")
_SSN = re.compile(r"(?<!\d)(\d{3})-(\d{2})-(\d{4})(?!\d)")
_IBAN = re.compile(r"\b[A-Z]{2}\d{2}(?: ?[A-Z0-9]{4}){2,7}(?: ?[A-Z0-9]{1,4})?\b")
_IPV4 = re.compile(r"(?<![\d.])(?:\d{1,3}\.){3}\d{1,3}(?!\.?\d)")  # a sentence's full stop may follow
_SECRETS = [
    re.compile(r"\bAKIA[0-9A-Z]{16}\b"),  # AWS access key id
    re.compile(r"\bgh[pousr]_[A-Za-z0-9]{36}\b"),  # GitHub tokens
    re.compile(r"\bxox[abpr]-[A-Za-z0-9-]{10,}\b"),  # Slack tokens
    re.compile(r"\bsk-[A-Za-z0-9]{32,}\b"),  # OpenAI-style secret keys
    re.compile(r"-----BEGIN (?:RSA |EC |OPENSSH |DSA )?PRIVATE KEY-----"),
    re.compile(r"(?i)\b(?:api[_-]?key|secret|password|passwd|token)\s*[:=]\s*['\"]?[A-Za-z0-9_\-/+]{16,}"),
]
_PHONE_CANDIDATE = re.compile(r"(?<![\w+-])\+?\(?\d[\d\s().-]{6,18}\d(?![\w-])")  # not inside ids/UUIDs


@dataclass(frozen=True)
class Finding:
    kind: str  # a key of SEVERITY
    start: int  # character span in the text
    end: int


@dataclass(frozen=True)
class PiiConfig:
    """What to detect and what to do with it."""

    # Kinds to look for (keys of SEVERITY).
    kinds: tuple[str, ...] = tuple(SEVERITY)
    # Severity per kind: "sensitive" drops the document, "personal" redacts the span.
    severity: dict[str, str] = field(default_factory=lambda: dict(SEVERITY))
    # Region used to parse phone numbers written without a country code (ISO 3166 alpha-2).
    phone_region: str = "US"


def luhn_ok(digits: str) -> bool:
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = int(ch)
        if i % 2:
            d = d * 2 - 9 if d > 4 else d * 2
        total += d
    return total % 10 == 0


def iban_ok(text: str) -> bool:
    s = text.replace(" ", "")
    if not 15 <= len(s) <= 34:
        return False
    moved = s[4:] + s[:4]
    return int("".join(str(int(c, 36)) for c in moved)) % 97 == 1


def card_ok(digits: str) -> bool:
    """A payment card number: Luhn-valid and shaped like a real network's (issuer prefix 2-6; 13 digits
    only for Visa, 14 for Diners, 15 for Amex). The prefix rule alone rejects most numbers that pass Luhn
    by chance, e.g. one 13-digit millisecond timestamp in ten."""
    n, first = len(digits), digits[:1]
    if not 13 <= n <= 19 or first not in "23456" or not luhn_ok(digits):
        return False
    if n == 13:
        return first == "4"
    if n == 14:
        return digits.startswith(("30", "36", "38"))
    if n == 15:
        return digits.startswith(("34", "37"))
    return True


def _ssn_ok(a: str, g: str, s: str) -> bool:
    return a not in ("000", "666") and not a.startswith("9") and g != "00" and s != "0000"


def find_pii(text: str, cfg: PiiConfig | None = None) -> list[Finding]:
    """Every validated finding, non-overlapping (the earliest, then longest, span wins)."""
    cfg = cfg or PiiConfig()
    found: list[Finding] = []
    want = set(cfg.kinds)
    if "email" in want:
        found += [Finding("email", m.start(), m.end()) for m in _EMAIL.finditer(text)]
    if "secret" in want:
        found += [Finding("secret", m.start(), m.end()) for rx in _SECRETS for m in rx.finditer(text)]
    if "card" in want:
        for m in _CARD.finditer(text):
            digits = re.sub(r"\D", "", m.group())
            if card_ok(digits):
                found.append(Finding("card", m.start(), m.end()))
    if "national_id" in want:
        found += [
            Finding("national_id", m.start(), m.end()) for m in _SSN.finditer(text) if _ssn_ok(*m.groups())
        ]
    if "iban" in want:
        found += [Finding("iban", m.start(), m.end()) for m in _IBAN.finditer(text) if iban_ok(m.group())]
    if "ip" in want:
        for m in _IPV4.finditer(text):
            try:
                ipaddress.IPv4Address(m.group())
            except ValueError:
                continue
            found.append(Finding("ip", m.start(), m.end()))
    if "phone" in want:
        found += _phones(text, cfg.phone_region)
    return _non_overlapping(found)


def _phones(text: str, region: str) -> list[Finding]:
    import phonenumbers

    out = []
    for m in _PHONE_CANDIDATE.finditer(text):
        raw = m.group()
        try:
            num = phonenumbers.parse(raw, region)
        except phonenumbers.NumberParseException:
            continue
        if phonenumbers.is_valid_number(num):
            out.append(Finding("phone", m.start(), m.end()))
    return out


def _non_overlapping(found: list[Finding]) -> list[Finding]:
    out: list[Finding] = []
    for f in sorted(found, key=lambda f: (f.start, -(f.end - f.start))):
        if not out or f.start >= out[-1].end:
            out.append(f)
    return out


def apply_pii_policy(text: str, cfg: PiiConfig | None = None) -> tuple[str | None, str, list[Finding]]:
    """(new text, reason, findings): None and "pii_<kind>" if a sensitive finding drops the document,
    else the text with personal findings replaced by placeholders and reason "" (or "pii_redacted")."""
    cfg = cfg or PiiConfig()
    findings = find_pii(text, cfg)
    for f in findings:
        if cfg.severity.get(f.kind, SENSITIVE) == SENSITIVE:
            return None, f"pii_{f.kind}", findings
    if not findings:
        return text, "", findings
    return _replace(text, findings), "pii_redacted", findings


def redact_all(text: str, cfg: PiiConfig | None = None) -> str:
    """The text with every finding, whatever its severity, replaced by its placeholder (for display)."""
    return _replace(text, find_pii(text, cfg))


def _replace(text: str, findings: list[Finding]) -> str:
    parts, last = [], 0
    for f in findings:
        parts += [text[last : f.start], PLACEHOLDER[f.kind]]
        last = f.end
    parts.append(text[last:])
    return "".join(parts)
