"""PII: every type is replaced by its placeholder and counted; look-alikes that fail the checks stay."""

from __future__ import annotations

from datagen import make_cn_id
from hypothesis import given
from hypothesis import strategies as st

from tinychat.data.pii import PIIConfig, cn_id_ok, luhn_ok, scrub_pii

VALID_ID = make_cn_id("11010519491231002")  # ends in X
POSITIVES = {
    "email": ["john.doe+news@example.co.uk", "a_b@mail.example.cn"],
    "phone": [
        "+44 20 7946 0958",
        "+1 (415) 555-2671",
        "(415) 555-2671",
        "415-555-2671",
        "13812345678",
        "+86 139-1234-5678",
        "138 1234 5678",
    ],
    "ipv4": ["192.168.1.20", "8.8.8.8"],
    "ipv6": [
        "2001:db8::8a2e:370:7334",
        "fe80::1",
        "::ffff:192.0.2.1",
        "2001:0db8:85a3:0000:0000:8a2e:0370:7334",
    ],
    "credit_card": ["4111 1111 1111 1111", "5500-0055-5555-5559", "378282246310005"],
    "cn_id": [VALID_ID, make_cn_id("44030419900101123")],
}
NEGATIVES = [
    "version 1.2.3.4.5",
    "999.1.1.1",
    "12:30:45",
    "std::vector",
    "a::b",
    "2023-11-05",
    "3.14159",
    "1,000,000 people",
    "order 1234567890123456",
    "4111 1111 1111 1112",
    "110105194912310021",
    "ISBN 978-3-16-148410-0",
    "call me at 5",
    "x@y",
]


def test_every_type_is_scrubbed_and_counted():
    cfg = PIIConfig()
    for kind, values in POSITIVES.items():
        for v in values:
            out, counts = scrub_pii(f"Contact: {v}. Thanks!", cfg)
            assert v not in out, (kind, v, out)
            assert counts == {kind: 1}, (kind, v, counts)
            assert out.startswith("Contact: <") and out.endswith(">. Thanks!"), out


def test_chinese_context():
    text = f"我的手机是13912345678，身份证号{VALID_ID}，邮箱是zhang.san@example.com。或li@example.cn联系"
    out, counts = scrub_pii(text, PIIConfig())
    assert out == "我的手机是<PHONE>，身份证号<ID_NUMBER>，邮箱是<EMAIL>。或<EMAIL>联系"
    assert counts == {"phone": 1, "cn_id": 1, "email": 2}


def test_look_alikes_are_left_alone():
    for text in NEGATIVES:
        out, counts = scrub_pii(text, PIIConfig())
        assert out == text and not counts, (text, out)


def test_types_can_be_switched_off():
    text = "mail a@example.com from 10.0.0.1"
    out, counts = scrub_pii(text, PIIConfig(email=False))
    assert out == "mail a@example.com from <IP_ADDRESS>" and counts == {"ipv4": 1}
    assert scrub_pii(text, PIIConfig(enabled=False)) == (text, {})


def test_checksums():
    assert luhn_ok("4111111111111111") and not luhn_ok("4111111111111112")
    assert cn_id_ok(VALID_ID) and not cn_id_ok(VALID_ID[:-1] + "0")


@given(st.lists(st.integers(0, 9), min_size=12, max_size=18))
def test_luhn_check_digit_property(digits):
    body = "".join(map(str, digits))
    check = next(d for d in "0123456789" if luhn_ok(body + d))
    assert luhn_ok(body + check)
    assert sum(luhn_ok(body + d) for d in "0123456789") == 1
