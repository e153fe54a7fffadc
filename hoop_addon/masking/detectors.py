"""Built-in detectors: what sensitive data looks like.

A detector is an RE2 pattern (linear-time, no backtracking: user-written patterns can
never cause ReDoS) plus an optional validator that confirms a candidate match, so that
a 16-digit order number is not taken for a card number, and optional keyword context
(one of `keywords` must appear shortly before the match).

Sources, and what keeps each precise:
- email: dot-atom form of RFC 5322 §3.4.1 (practical subset).
- phone: ITU-T E.164 (`+` and 7 to 15 digits, separators allowed) and the North
  American Numbering Plan (NXX-NXX-XXXX: area and exchange codes start with 2-9);
  separators are required in national form, so timestamps and ids are not phones.
- payment_card: ISO/IEC 7812 (13 to 19 digits, Luhn check digit per ISO/IEC 7812-1
  Annex B) and a major-industry identifier of 2 to 6 (cards), so a millisecond
  timestamp (1...) is not a card.
- us_ssn: SSA's rules (no area 000, 666 or 9xx, no group 00, no serial 0000), with
  dashes, spaces or dots between the groups.
- iban: ISO 13616 (the registry's length and format per country, mod-97 == 1),
  compact or in groups of four (spaces or dots).
- Cards, SSNs and IBANs written with NBSP, thin spaces or zero-width characters
  between groups are found in the text as read (`hoop_addon.masking.normalize`).
- ipv4 / ipv6: RFC 791 dotted quad, RFC 4291 §2.2 text forms (validated by
  `ipaddress`, so `12:30:45` is not an address).
- secrets, by the formats their issuers document (the whole table, with sources:
  docs/detectors.md): AWS access key ids (AKIA/ASIA/ABIA/ACCA) and secret access keys
  (40 base64 characters with the word `aws` or `secret` nearby, mixed case and a
  digit, so a git SHA is not one); OpenAI `sk-`/`sk-proj-`/`sk-svcacct-`/`sk-admin-`;
  Anthropic `sk-ant-`; GitHub `ghp_`/`gho_`/`ghu_`/`ghs_`/`ghr_`/`github_pat_`; every
  GitLab token prefix; Slack tokens, app tokens and webhook URLs; Stripe keys and
  webhook secrets; Google API keys, OAuth client secrets and access tokens; JWTs (RFC
  7515 compact JWS and RFC 7519 unsecured JWTs); PEM private keys (RFC 7468).
Version strings (`1.2.3`), git SHAs and timestamps match none of these.
"""

from __future__ import annotations

import base64
import binascii
import ipaddress
import json
from collections.abc import Callable
from dataclasses import dataclass, field

import re2
from stdnum import iban as stdnum_iban


class DetectorError(ValueError):
    """A detector's pattern does not compile under RE2, or compiles to too large a
    program (message says why)."""


MAX_PROGRAM_SIZE = 2000
"""Most RE2 program instructions a detector's pattern may compile to. Every body is
scanned with every detector, and the cost per byte grows with the program where RE2's
DFA cannot cache it (`.{300}x` is 2,405 instructions; the largest built-in, 355);
what the limit cannot see, the masking stage's time budget per body bounds."""


@dataclass(frozen=True, slots=True)
class Detector:
    """One kind of sensitive value.

    `name` is the policy name (`email`), `label` the replacement tag (`EMAIL`),
    `pattern` RE2 syntax without capturing groups, `validator` an optional
    `str -> bool` run on each candidate match only. With `keywords` (lower-case), a
    candidate counts only if one of them occurs, in any case, within `window`
    characters before it. `max_length` (characters) bounds a value that may contain
    spaces or quotes, so that a stream holds enough of its tail to catch one split there.
    `grouped` (characters) marks a value written in groups of those characters with
    one separator between groups (cards, IBANs): a failed candidate is retried over
    its run of groups (see `Scanner`). `claims` marks a shape specific enough that a
    candidate is one value, valid or not: nothing inside it is masked as another.
    """

    name: str
    label: str
    pattern: str
    validator: Callable[[str], bool] | None = field(default=None, compare=False)
    keywords: tuple[str, ...] = ()
    window: int = 40
    max_length: int | None = None
    grouped: str = ""
    claims: bool = False
    _hash: int = field(default=0, init=False, compare=False, repr=False)

    def __hash__(self) -> int:
        return self._hash  # computed once: detectors key the scanners' lookups of every match

    def __post_init__(self) -> None:
        object.__setattr__(self, "_hash", hash((self.name, self.label, self.pattern, self.keywords, self.window, self.max_length, self.grouped, self.claims)))
        try:
            compiled = re2.compile(self.pattern)
        except re2.error as exc:
            reason = exc.args[0].decode(errors="replace") if exc.args and isinstance(exc.args[0], bytes) else exc
            raise DetectorError(f"invalid RE2 pattern: {reason}") from None
        if compiled.groups:
            raise DetectorError("pattern must not contain capturing groups; use (?:...)")
        if compiled.programsize > MAX_PROGRAM_SIZE:
            raise DetectorError(
                f"pattern compiles to an RE2 program of {compiled.programsize} instructions, more than "
                f"{MAX_PROGRAM_SIZE}: it would cost too much per byte scanned (shorten counted repetitions)"
            )

    def in_context(self, text: str, start: int) -> bool:
        """True when the detector has no keywords, or one occurs in the `window`
        characters of `text` before offset `start`."""
        if not self.keywords:
            return True
        before = text[max(0, start - self.window) : start].lower()
        return any(k in before for k in self.keywords)


def luhn_valid(number: str) -> bool:
    """True when the digits of `number` (separators ignored) pass the Luhn check
    (ISO/IEC 7812-1 Annex B)."""
    digits = [int(c) for c in number if c.isdecimal()]  # any script's digits: a user's pattern may match them
    if len(digits) < 13:
        return False
    # from the right: digits in odd places as they are, in even places doubled (digit sum)
    return (sum(digits[-1::-2]) + sum(_DOUBLED[d] for d in digits[-2::-2])) % 10 == 0


_DOUBLED = (0, 2, 4, 6, 8, 1, 3, 5, 7, 9)  # the digit sum of 2 * d


def card_valid(number: str) -> bool:
    """A payment card number: Luhn-valid, with a card industry identifier (2-6)."""
    return number[0] in "23456" and luhn_valid(number)


def ssn_valid(ssn: str) -> bool:
    """True for a structurally valid US SSN `AAA-GG-SSSS` (SSA: area not 000, 666 or
    900-999; group not 00; serial not 0000)."""
    area, group, serial = ssn[0:3], ssn[4:6], ssn[7:11]
    return area not in ("000", "666") and area[0] != "9" and group != "00" and serial != "0000"


def iban_valid(iban: str) -> bool:
    """ISO 13616: the country's registered length and BBAN format, and the ISO 7064
    mod 97-10 check (python-stdnum's copy of the IBAN registry), so that the first
    groups of a longer invalid IBAN are not a valid IBAN by chance (1 in 97)."""
    return stdnum_iban.is_valid(iban.replace(" ", "").replace(".", ""), check_country=False)


def phone_valid(phone: str) -> bool:
    """7 to 15 digits (E.164 §6.2.1), not all the same digit."""
    digits = [c for c in phone if c.isdigit()]
    return 7 <= len(digits) <= 15 and len(set(digits)) > 1


def ip_valid(text: str) -> bool:
    """A valid IPv4 or IPv6 address (RFC 791 / RFC 4291 §2.2, a zone id per RFC 6874),
    optionally with a prefix length (`/48`, RFC 4291 §2.3) no longer than the
    address; not the unspecified `::` or `0.0.0.0`."""
    address, _, prefix = text.partition("/")
    try:
        parsed = ipaddress.ip_address(address)
    except ValueError:
        return False
    if prefix and int(prefix) > parsed.max_prefixlen:  # the pattern admits ASCII digits only
        return False
    return not parsed.is_unspecified


def jwt_valid(token: str) -> bool:
    """A compact JWS (RFC 7515 §7.1) or unsecured JWT (RFC 7519 §6: `alg: none`, empty
    signature) whose header decodes to a JSON object naming its `alg`."""
    header = token.partition(".")[0]
    try:
        decoded = json.loads(base64.urlsafe_b64decode(header + "=" * (-len(header) % 4)))
    except (ValueError, binascii.Error):
        return False
    return isinstance(decoded, dict) and isinstance(decoded.get("alg"), str)


def aws_secret_valid(key: str) -> bool:
    """40 base64 characters with upper and lower case and a digit (a hex SHA has no
    upper case)."""
    return any(c.isupper() for c in key) and any(c.islower() for c in key) and any(c.isdigit() for c in key)


def openai_key_valid(key: str) -> bool:
    """An `sk-` key that is not Anthropic's `sk-ant-` (that detector reports it)."""
    return not key.startswith("sk-ant-")


_OCTET = r"(?:25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])"

BUILTIN: dict[str, Detector] = {
    d.name: d
    for d in (
        Detector(
            "email",
            "EMAIL",
            r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+(?:\.[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+)*"
            r"@(?:[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?\.)+[A-Za-z]{2,63}",
        ),
        Detector(
            "phone",
            "PHONE",
            r"(?:\+[1-9](?:[ .-]?\(?[0-9]\)?){6,14}\b"
            r"|(?:\([2-9][0-9]{2}\) ?|\b[2-9][0-9]{2}[-. ])[2-9][0-9]{2}[-. ][0-9]{4}\b)",
            phone_valid,
        ),
        Detector(
            "payment_card",
            "CARD",
            # spaces or dashes anywhere; dots only between the printed groups (4-4-4-4, Amex 4-6-5),
            # so that a list of IPv4 addresses or a version string does not read as one number
            r"\b(?:(?:\d[ -]?){12,18}\d|\d{4}(?:\.\d{4}){2,3}(?:\.\d{1,3})?|\d{4}\.\d{6}\.\d{4,5})\b",
            card_valid,
            grouped="0123456789",
        ),
        Detector("us_ssn", "SSN", r"\b(?:\d{3}-\d{2}-\d{4}|\d{3} \d{2} \d{4}|\d{3}\.\d{2}\.\d{4})\b", ssn_valid),
        Detector(
            "iban",
            "IBAN",
            r"\b[A-Z]{2}[0-9]{2}(?:[ .]?[A-Z0-9]{4}){2,7}(?:[ .]?[A-Z0-9]{1,4})?\b",
            iban_valid,
            grouped="ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789",
            claims=True,
        ),
        Detector("ipv4", "IPV4", rf"\b{_OCTET}(?:\.{_OCTET}){{3}}\b", ip_valid),
        Detector(
            "ipv6",
            "IPV6",
            # a group ends in a hex digit at a word boundary, or in `::` before a non-word
            # character; `::` opens only after a non-word character (not C++'s `std::add`)
            r"(?:\b[0-9A-Fa-f]{1,4}|\B:)(?::[0-9A-Fa-f]{0,4}){0,6}"
            r"(?::[0-9A-Fa-f]{1,4}\b(?:\.[0-9]{1,3}){0,3}|:\B)(?:%[0-9A-Za-z._~-]+)?(?:/[0-9]{1,3}\b)?",
            ip_valid,
            claims=True,
        ),
        Detector("aws_access_key_id", "AWS_KEY", r"\b(?:AKIA|ASIA|ABIA|ACCA)[A-Z0-9]{16}\b"),
        Detector(
            "aws_secret_access_key",
            "AWS_SECRET",
            # a word boundary where the key begins or ends with a letter or digit; a key
            # may begin or end with `/` or `+` too
            r"(?:\b[A-Za-z0-9]|\B[/+])[A-Za-z0-9/+]{38}(?:[A-Za-z0-9]\b|[/+]\B)",
            aws_secret_valid,
            keywords=("aws", "secret"),
        ),
        Detector("openai_api_key", "OPENAI_KEY", r"\bsk-(?:proj-|svcacct-|admin-)?[A-Za-z0-9_-]{20,}", openai_key_valid),
        Detector("anthropic_api_key", "ANTHROPIC_KEY", r"\bsk-ant-[A-Za-z0-9_-]{20,}"),
        Detector("github_token", "GITHUB_TOKEN", r"\b(?:gh[pousr]_[A-Za-z0-9]{36,}|github_pat_[A-Za-z0-9_]{22,})"),
        Detector(
            "gitlab_token",
            "GITLAB_TOKEN",
            # every prefix of GitLab's token-prefix table, an instance prefix before it
            # (`acme-glpat-`), the routable form's `.<version>.<crc>` tail; legacy runner
            # registration tokens `GR1348941`
            r"\b(?:(?:[A-Za-z0-9]+-)?gl(?:pat|oas|dt|rt|rtr|cbt|ptt|ft|imt|agent|soat|ffct|wt)-[A-Za-z0-9_-]{20,}"
            r"(?:\.[0-9A-Za-z]{2}\.[0-9A-Za-z]{7,10}\b)?|GR1348941[A-Za-z0-9_-]{20,})",
        ),
        Detector(
            "slack_token",
            "SLACK_TOKEN",
            # xoxb/xoxp/xoxa/xoxr/xoxs/xoxo, browser xoxc/xoxd, rotating xoxe.xoxp-/xoxe-,
            # app-level xapp-, and incoming webhook, workflow and trigger URLs
            r"\b(?:xox(?:[abposrcd]|e(?:\.xox[bp])?)-[A-Za-z0-9-]{10,}|xapp-[0-9]+-[A-Za-z0-9-]{10,}"
            r"|https://hooks\.slack\.com/(?:services|workflows|triggers)/[A-Za-z0-9_/-]{16,})",
        ),
        Detector("stripe_key", "STRIPE_KEY", r"\b(?:(?:sk|rk|pk)_(?:live|test)_[A-Za-z0-9]{16,}|whsec_[A-Za-z0-9]{24,})"),
        Detector(
            "google_api_key",
            "GOOGLE_KEY",
            # API keys, OAuth 2.0 client secrets, access tokens and refresh tokens
            r"\b(?:AIza[0-9A-Za-z_-]{35}|GOCSPX-[0-9A-Za-z_-]{28}|ya29\.[0-9A-Za-z_-]{20,}|1//0[0-9A-Za-z_-]{40,})",
        ),
        Detector(
            "jwt",
            "JWT",
            # a JSON header (`{"` or `{` and white space), any payload, a signature or
            # none (`alg: none`); jwt_valid reads the header
            r"\be[wy][A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]{8,}\.(?:[A-Za-z0-9_-]{16,})?",
            jwt_valid,
        ),
        Detector(
            "pem_private_key",
            "PRIVATE_KEY",
            r"-----BEGIN (?:[A-Z0-9]+ )*PRIVATE KEY-----(?s:.)*?-----END (?:[A-Z0-9]+ )*PRIVATE KEY-----",
        ),
    )
}
