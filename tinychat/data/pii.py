"""PII scrubbing: replace personal identifiers with typed placeholders before a model can memorise them.

Why typed placeholders (<EMAIL>, <PHONE>, ...) instead of deleting: the sentence stays grammatical, the
model still learns that "write to <EMAIL>" is a thing people say, and the count per type in stats.json
tells how much was removed. Why checksums: a 16-digit order number is not a credit card and an
18-digit serial is not an ID card; the Luhn check (cards) and ISO 7064 MOD 11-2 (Chinese resident IDs)
keep false positives down, which matters because every false positive destroys real text.

Types and what matches (applied in this order, so a longer identifier is not eaten by a shorter one):
  email        local@domain.tld
  cn_id        18-character PRC resident ID: region(6) birth date(8) sequence(3) check digit or X,
               with a valid date and a valid MOD 11-2 check character
  credit_card  13-19 digits, optionally grouped by single spaces or dashes, passing the Luhn check
  phone        Chinese mobile numbers (1[3-9]x xxxx xxxx, optional +86 / 86 prefix);
               international numbers with a leading + and country code;
               North American (xxx) xxx-xxxx / xxx-xxx-xxxx / xxx.xxx.xxxx
  ipv4         dotted quads with every part 0-255
  ipv6         full, compressed (::) and IPv4-mapped forms, validated by the ipaddress module

Not covered: postal addresses, names, passport numbers, phone numbers written without any separator
or prefix outside the Chinese mobile pattern (too ambiguous with other numbers).
"""

from __future__ import annotations

import ipaddress
import re
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

from tinychat.config import field

PLACEHOLDERS = {
    "email": "<EMAIL>",
    "cn_id": "<ID_NUMBER>",
    "credit_card": "<CREDIT_CARD>",
    "phone": "<PHONE>",
    "ipv4": "<IP_ADDRESS>",
    "ipv6": "<IP_ADDRESS>",
}


@dataclass
class PIIConfig:
    enabled: bool = field(True, help="scrub personal identifiers at all")
    email: bool = field(True, help="e-mail addresses -> <EMAIL>")
    phone: bool = field(True, help="phone numbers (international, North American, Chinese mobile) -> <PHONE>")
    ip: bool = field(True, help="IPv4 and IPv6 addresses -> <IP_ADDRESS>")
    credit_card: bool = field(True, help="Luhn-valid card numbers -> <CREDIT_CARD>")
    cn_id: bool = field(True, help="checksum-valid Chinese resident ID numbers -> <ID_NUMBER>")


# ASCII-only boundaries, so an address right after or before Chinese text (是a@b.com。) still matches
_EMAIL = re.compile(
    r"(?<![A-Za-z0-9._%+-])[A-Za-z0-9][A-Za-z0-9._%+-]*@(?:[A-Za-z0-9-]+\.)+[A-Za-z]{2,24}(?![A-Za-z0-9-])"
)
_CN_ID = re.compile(
    r"(?<![0-9A-Za-z])[1-9]\d{5}"  # region
    r"(?:18|19|20)\d{2}(?:0[1-9]|1[0-2])(?:0[1-9]|[12]\d|3[01])"  # birth date YYYYMMDD
    r"\d{3}[\dXx](?![0-9A-Za-z])"  # sequence, check character
)
_CARD = re.compile(r"(?<![\d-])\d(?:[ -]?\d){12,18}(?![\d-])")
_PHONE_CN = re.compile(r"(?<![\d+])(?:(?:\+|00)?86[ -]?)?1[3-9]\d(?:[ -]?\d{4}){2}(?!\d)")
_PHONE_INTL = re.compile(r"(?<![\w+])\+\d{1,3}(?:[ .-]?\(?\d{1,4}\)?)(?:[ .-]?\d{2,5}){1,4}(?!\d)")
_PHONE_NANP = re.compile(r"(?<![\w(])(?:\(\d{3}\) ?|\d{3}[.-])\d{3}[.-]\d{4}(?!\d)")
_OCTET = r"(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)"
_IPV4 = re.compile(rf"(?<![\d.]){_OCTET}(?:\.{_OCTET}){{3}}(?!\.?\d)")
_IPV6 = re.compile(
    r"(?<![\w:])(?:[0-9A-Fa-f]{0,4}:){2,7}"  # groups and the :: gap
    r"(?:(?:\d{1,3}\.){3}\d{1,3}|[0-9A-Fa-f]{1,4})?"  # last group, or an embedded IPv4 (::ffff:1.2.3.4)
    r"(?![\w:]|\.\d)"
)
_DIGIT = re.compile(r"\d")
_DOTTED = re.compile(r"\d\.\d")
_DIGIT_RUN = re.compile(r"\d(?:[ ().-]{0,2}\d){6}")  # 7 digits with separators: every phone/card/ID has it
_CN_ID_WEIGHTS = (7, 9, 10, 5, 8, 4, 2, 1, 6, 3, 7, 9, 10, 5, 8, 4, 2)
_CN_ID_CHECK = "10X98765432"


def luhn_ok(digits: str) -> bool:
    """The Luhn mod-10 check every payment card number satisfies."""
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = ord(ch) - 48
        if i % 2 == 1:
            d = d * 2 - 9 if d > 4 else d * 2
        total += d
    return total % 10 == 0


def cn_id_ok(s: str) -> bool:
    """ISO 7064 MOD 11-2 check character of an 18-character Chinese resident ID (GB 11643-1999)."""
    total = sum(int(c) * w for c, w in zip(s[:17], _CN_ID_WEIGHTS))
    return _CN_ID_CHECK[total % 11] == s[17].upper()


def _card_ok(m: re.Match[str]) -> bool:
    digits = re.sub(r"[ -]", "", m.group())
    seps = set(re.findall(r"[ -]", m.group()))
    return 13 <= len(digits) <= 19 and len(seps) <= 1 and len(set(digits)) > 1 and luhn_ok(digits)


def _ipv6_ok(m: re.Match[str]) -> bool:
    s = m.group()
    if not any(c.isdigit() for c in s):
        return False  # "::", "a::b", "dead::beef": valid in theory, but in text they are code, not hosts
    try:
        ipaddress.IPv6Address(s)
    except ValueError:
        return False
    return True


# (type, config flag, pattern, validator) in application order
_RULES: list[tuple[str, str, re.Pattern[str], Callable[[re.Match[str]], bool] | None]] = [
    ("email", "email", _EMAIL, None),
    ("cn_id", "cn_id", _CN_ID, lambda m: cn_id_ok(m.group())),
    ("credit_card", "credit_card", _CARD, _card_ok),
    ("phone", "phone", _PHONE_CN, None),
    ("phone", "phone", _PHONE_INTL, lambda m: sum(c.isdigit() for c in m.group()) >= 8),
    ("phone", "phone", _PHONE_NANP, None),
    ("ipv6", "ip", _IPV6, _ipv6_ok),  # before ipv4, so ::ffff:192.0.2.1 goes whole
    ("ipv4", "ip", _IPV4, None),
]


def scrub_pii(text: str, cfg: PIIConfig) -> tuple[str, Counter[str]]:
    """(scrubbed text, count of replacements per type)."""
    counts: Counter[str] = Counter()
    if not cfg.enabled:
        return text, counts
    # Cheap gates: most documents have no '@', no long digit run and no digit.digit, so most rules
    # are skipped without running their (slower) patterns.
    gates = {
        "email": "@" in text,
        "ipv6": ":" in text and _DIGIT.search(text) is not None,
        "ipv4": _DOTTED.search(text) is not None,
    }
    long_digits = _DIGIT_RUN.search(text) is not None
    for kind, flag, pattern, ok in _RULES:
        if not getattr(cfg, flag) or not gates.get(kind, long_digits):
            continue

        def repl(m: re.Match[str], kind: str = kind, ok=ok) -> str:
            if ok is not None and not ok(m):
                return m.group()
            counts[kind] += 1
            return PLACEHOLDERS[kind]

        text = pattern.sub(repl, text)
    return text, counts
