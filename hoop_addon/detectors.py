"""Built-in detectors: what sensitive data looks like.

A detector is an RE2 pattern (linear-time, no backtracking: user-written patterns can
never cause ReDoS) plus an optional validator that confirms a candidate match, so that
a 16-digit order number is not taken for a card number.

Sources: email after the dot-atom form of RFC 5322 §3.4.1 (practical subset);
payment cards per ISO/IEC 7812 (13 to 19 digits, Luhn check digit, ISO/IEC 7812-1 Annex B);
US SSN per SSA's rules (no area 000, 666 or 9xx, no group 00, no serial 0000);
AWS access key ids per AWS IAM identifiers documentation; OpenAI keys `sk-` / `sk-proj-`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import re2


class DetectorError(ValueError):
    """A detector's pattern does not compile under RE2 (message says why)."""


@dataclass(frozen=True, slots=True)
class Detector:
    """One kind of sensitive value.

    `name` is the policy name (`email`), `label` the replacement tag (`EMAIL`),
    `pattern` RE2 syntax without capturing groups, `validator` an optional
    `str -> bool` run on each candidate match only.
    """

    name: str
    label: str
    pattern: str
    validator: Callable[[str], bool] | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        try:
            compiled = re2.compile(self.pattern)
        except re2.error as exc:
            reason = exc.args[0].decode(errors="replace") if exc.args and isinstance(exc.args[0], bytes) else exc
            raise DetectorError(f"invalid RE2 pattern: {reason}") from None
        if compiled.groups:
            raise DetectorError("pattern must not contain capturing groups; use (?:...)")


def luhn_valid(number: str) -> bool:
    """True when the digits of `number` (separators ignored) pass the Luhn check
    (ISO/IEC 7812-1 Annex B)."""
    digits = [int(c) for c in number if c.isdigit()]
    if len(digits) < 13:
        return False
    total = 0
    for i, d in enumerate(reversed(digits)):
        if i % 2:
            d *= 2
            if d > 9:
                d -= 9
        total += d
    return total % 10 == 0


def ssn_valid(ssn: str) -> bool:
    """True for a structurally valid US SSN `AAA-GG-SSSS` (SSA: area not 000, 666 or
    900-999; group not 00; serial not 0000)."""
    area, group, serial = ssn[0:3], ssn[4:6], ssn[7:11]
    return area not in ("000", "666") and area[0] != "9" and group != "00" and serial != "0000"


BUILTIN: dict[str, Detector] = {
    d.name: d
    for d in (
        Detector(
            "email",
            "EMAIL",
            r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+(?:\.[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+)*"
            r"@(?:[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?\.)+[A-Za-z]{2,63}",
        ),
        Detector("payment_card", "CARD", r"\b(?:\d[ -]?){12,18}\d\b", luhn_valid),
        Detector("us_ssn", "SSN", r"\b\d{3}-\d{2}-\d{4}\b", ssn_valid),
        Detector("aws_access_key_id", "AWS_KEY", r"\b(?:AKIA|ASIA|ABIA|ACCA)[A-Z0-9]{16}\b"),
        Detector("openai_api_key", "OPENAI_KEY", r"\bsk-(?:proj-)?[A-Za-z0-9_-]{20,}\b"),
        Detector(
            "jwt",
            "JWT",
            r"\beyJ[A-Za-z0-9_-]{8,}\.eyJ[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]{16,}",
        ),
    )
}
