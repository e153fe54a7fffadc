"""Built-in detectors: each finds its values (recall) and leaves lookalikes alone
(precision: timestamps, git SHAs, version strings, ids are not secrets or phones)."""

from __future__ import annotations

import pytest

from hoop_addon.masking.detectors import BUILTIN, Detector, luhn_valid
from hoop_addon.masking import engine
from hoop_addon.masking.engine import Scanner

ALL = Scanner(tuple(BUILTIN.values()))

FOUND = [
    ("email", "jane.doe+tag@mail.example.co.uk"),
    ("phone", "+1 415 555 2671"),
    ("phone", "+44 20 7946 0958"),
    ("phone", "+4915112345678"),
    ("phone", "(415) 555-2671"),
    ("phone", "415-555-2671"),
    ("payment_card", "4111 1111 1111 1111"),
    ("payment_card", "5555-5555-5555-4444"),
    ("payment_card", "378282246310005"),
    ("us_ssn", "078-05-1120"),
    ("iban", "DE89 3704 0044 0532 0130 00"),
    ("iban", "GB82WEST12345698765432"),
    ("ipv4", "192.168.10.254"),
    ("ipv6", "2001:db8::8a2e:370:7334"),
    ("ipv6", "fe80::1"),
    ("aws_access_key_id", "AKIAIOSFODNN7EXAMPLE"),
    ("openai_api_key", "sk-proj-Abc123_def456-GHI789jkl012"),
    ("anthropic_api_key", "sk-ant-api03-Abc123def456GHI789jkl012mno"),
    ("github_token", "ghp_" + "a1B2c3D4e5" * 3 + "f6G7h8"),
    ("github_token", "github_pat_11ABCDEFG0123456789_abcdefghijklmnop"),
    ("gitlab_token", "glpat-Abc123def456GHI789jk"),
    ("slack_token", "xoxb-1234567890-abcdefghij"),
    ("stripe_key", "sk_live_" + "4eC39HqLyjWDarjtT1zdp7dc"),
    ("google_api_key", "AIzaSyA-1234567890abcdefghijklmnopqrstu"),
    ("jwt", "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxMjM0NTY3ODkwIn0.dozjgNryP4J3jVmNHl0w5N_XgL0n3I9PlFUP0THsR8U"),
    ("pem_private_key", "-----BEGIN RSA PRIVATE KEY-----\nMIIEowIBAAKCAQEA\nq1w2e3r4\n-----END RSA PRIVATE KEY-----"),
]


@pytest.mark.parametrize(("name", "value"), FOUND, ids=[f"{n}-{i}" for i, (n, _) in enumerate(FOUND)])
def test_each_builtin_finds_its_values_in_text(name: str, value: str) -> None:
    text = f"see {value} here"
    spans = ALL.spans(text)

    assert [(text[s:e], d.name) for s, e, d in spans] == [(value, name)]


def test_aws_secret_key_needs_its_keyword_nearby() -> None:
    key = "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY"

    assert [d.name for _, _, d in ALL.spans(f"aws_secret_access_key = {key}")] == ["aws_secret_access_key"]
    assert ALL.spans(f"the value {key} alone") == []


@pytest.mark.parametrize(
    "text",
    [
        pytest.param("at 2025-11-25T04:30:03Z", id="iso-timestamp"),
        pytest.param("ts 1732509003", id="unix-seconds"),
        pytest.param("ts 1732509003123", id="unix-milliseconds"),
        pytest.param("at 2025-11-25 04:30:03.123456", id="datetime"),
        pytest.param("commit da39a3ee5e6b4b0d3255bfef95601890afd80709", id="git-sha1"),
        pytest.param("commit 9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08", id="sha256"),
        pytest.param("short sha 4aa0a7c", id="git-short-sha"),
        pytest.param("python 3.12.1, mitmproxy 12.1.2", id="versions"),
        pytest.param("Windows 10.0.19041.1", id="four-part-version"),
        pytest.param("v2.4.1-rc1+build.20251125", id="semver"),
        pytest.param("uuid 550e8400-e29b-41d4-a716-446655440000", id="uuid"),
        pytest.param("order 4111111111111112", id="luhn-invalid"),
        pytest.param("12:30:45 and 23:59", id="clock-times"),
        pytest.param("port 8080, pid 12345, 200 OK", id="small-numbers"),
        pytest.param("ssn 000-12-3456", id="ssn-area-000"),
        pytest.param("iban DE88 3704 0044 0532 0130 00", id="iban-bad-checksum"),
        pytest.param("task-sk-is-short sk-123", id="short-sk"),
    ],
)
def test_lookalikes_are_not_detected(text: str) -> None:
    assert [(text[s:e], d.name) for s, e, d in ALL.spans(text)] == []


def test_custom_detector_with_keyword_context() -> None:
    employee = Detector("employee_id", "EMPLOYEE", r"\b[0-9]{6}\b", keywords=("employee", "badge"), window=20)
    scanner = Scanner((employee,))

    assert [d.name for _, _, d in scanner.spans("Employee #123456 joined")] == ["employee_id"]
    assert scanner.spans("order 123456 shipped") == []
    assert scanner.spans("employee records were updated long ago; order 123456") == []  # outside the window


@pytest.mark.parametrize(
    ("number", "valid"),
    [
        pytest.param("4242 4242 4242 4242", True, id="grouped"),
        pytest.param("4242-4242-4242-4241", False, id="wrong-check-digit"),
        pytest.param("424242424242", False, id="too-short"),
        # a user's pattern may match other scripts' digits (`\p{Nd}`): they count too
        pytest.param("\uff14\uff12\uff14\uff12" * 4, True, id="full-width-digits"),
    ],
)
def test_luhn(number: str, valid: bool) -> None:
    assert luhn_valid(number) is valid


def _corpus():
    """bench/corpus.py's seeded generators: one list of formats for the benchmark and the tests."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[3] / "bench" / "corpus.py"
    spec = importlib.util.spec_from_file_location("hoop_bench_corpus", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


CORPUS = _corpus()
FORMATS = [(d, f) for d, formats in CORPUS.VALID.items() for f in formats]


@pytest.mark.parametrize(("name", "form"), FORMATS, ids=[f"{d}:{f}" for d, f in FORMATS])
def test_every_documented_format_is_found_whole(name: str, form: str) -> None:
    """Each format a detector claims (docs/detectors.md), 25 seeded values each: nothing
    of the value left in clear by that detector alone, nor by all of them at once (the
    digits inside a Slack token may be a card number: masked whole, under either name)."""
    rng, alone = CORPUS.Rng(f"{name}:{form}"), Scanner((BUILTIN[name],))
    missed = []
    for _ in range(25):
        value = CORPUS.VALID[name][form](rng)
        text = f"see {value} here"
        for scanner in (alone, ALL):
            if CORPUS.survived(value, "".join(engine.spread([text], scanner.spans(text), lambda _v, _d: "#"))):
                missed.append((scanner is ALL, value))
    assert missed == []


@pytest.mark.parametrize("kind", sorted(CORPUS.LOOKALIKES))
def test_generated_lookalikes_are_left_alone(kind: str) -> None:
    rng = CORPUS.Rng(kind)
    hits = [v for v in (CORPUS.LOOKALIKES[kind](rng) for _ in range(50)) if ALL.spans(f"see {v} here")]
    assert hits == []
