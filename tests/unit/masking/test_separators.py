"""Separators and candidates (issue 16, items 4, 6 and 10): cards, SSNs and IBANs
with dots, NBSP, thin spaces or zero-width characters between groups are masked
(original span replaced); a greedy candidate that fails validation neither hides a
valid card around it nor gets a valid-looking piece of itself masked as something else."""

from __future__ import annotations

import random

import pytest

from hoop_addon.masking.detectors import luhn_valid
from tests.support.masking import masked_text, rule

ALL = rule(detectors=("payment_card", "us_ssn", "iban", "ipv4", "ipv6", "phone", "email"))
SEPARATORS = {"space": " ", "dash": "-", "dot": ".", "nbsp": "\u00a0", "thin": "\u2009", "narrow-nbsp": "\u202f",
              "zwsp": "\u200b", "zwj": "\u200d", "word-joiner": "\u2060"}


def mask(text: str) -> str:
    return masked_text(text, [ALL])


@pytest.mark.parametrize("sep", list(SEPARATORS.values()), ids=list(SEPARATORS))
def test_a_card_with_any_separator_is_masked_whole(sep: str) -> None:
    card = sep.join(["4111", "1111", "1111", "1111"])
    assert mask(f"pay with {card} now") == "pay with [REDACTED:CARD] now"


@pytest.mark.parametrize("sep", [" ", ".", "-", "\u00a0", "\u2009", "\u200b"])
def test_an_ssn_with_spaces_dots_or_invisible_separators_is_masked(sep: str) -> None:
    ssn = sep.join(["078", "05", "1120"])
    assert mask(f"ssn {ssn}.") == "ssn [REDACTED:SSN]."


@pytest.mark.parametrize("sep", [" ", ".", "\u00a0", "\u200b", ""])
def test_an_iban_in_groups_with_any_separator_is_masked(sep: str) -> None:
    iban = sep.join(["DE89", "3704", "0044", "0532", "0130", "00"])
    assert mask(f"iban {iban} ok") == "iban [REDACTED:IBAN] ok"


def test_fullwidth_digits_read_as_digits() -> None:
    assert mask("card \uff14\uff11\uff11\uff11 1111 1111 1111") == "card [REDACTED:CARD]"


def _card(rng: random.Random) -> str:
    while True:
        digits = "4" + "".join(rng.choice("0123456789") for _ in range(15))
        if luhn_valid(digits):
            return " ".join(digits[i : i + 4] for i in range(0, 16, 4))


@pytest.mark.parametrize("seed", range(20))
def test_a_valid_card_next_to_digit_groups_is_masked_on_either_side(seed: int) -> None:
    """The greedy-candidate miss: `1234 4111 1111 1111 1111` is one 20-digit run whose
    first 16 digits fail Luhn; the valid card runs past that candidate's end."""
    rng = random.Random(seed)
    card = _card(rng)
    before, after = f"{rng.randint(1000, 9999)}", f"{rng.randint(10, 99)}"
    for text in (f"ref {before} {card} ok", f"ref {card} {after} ok", f"ref {before} {card} {after} ok"):
        out = mask(text)
        assert card not in out and "[REDACTED:CARD]" in out, text


def test_two_cards_in_one_run_of_groups_are_both_masked() -> None:
    assert mask("x 4111 1111 1111 1111 5555 5555 5555 4444 y") == "x [REDACTED:CARD] [REDACTED:CARD] y"


@pytest.mark.parametrize("text", [
    pytest.param("DE89 3704 0044 0532 0130 01", id="invalid-iban-holds-a-card-valid-piece"),
    pytest.param("DE00 4111 1111 1111 1111", id="iban-shaped-with-a-card-inside"),
    pytest.param("2001:db8:1:::2:1", id="malformed-ipv6"),
    pytest.param("fe80::1::2", id="two-double-colons"),
    pytest.param("4111 1111 1111 1112", id="luhn-invalid"),
    pytest.param("order-1234567890123456", id="order-id"),
])
def test_a_value_invalid_as_a_whole_is_not_masked_as_something_else(text: str) -> None:
    assert mask(f"value {text} end") == f"value {text} end"


def test_a_long_run_of_digit_groups_costs_linear_time() -> None:
    """A run of 20 000 digit groups is retried window by window (bounded windows):
    thousands of groups go through without a quadratic blow-up; counted, not timed."""
    text = " ".join(["1234"] * 20_000)
    assert mask(text) == text
