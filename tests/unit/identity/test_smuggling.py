"""Finding a gateway token in any form (hoop_addon.identity.smuggling), by generation:
seeded tokens of a trusted issuer, carried in seeded forms (wrapped, percent-encoded
once or nested, JSON-escaped, hex, base64 once or twice at any offset, cut in two),
are found; tokens of other issuers, other JWTs sharing the header, and look-alike text
are not."""

from __future__ import annotations

import base64
import json
import random
from collections import Counter
from urllib.parse import quote

from hoop_addon.identity.smuggling import PIECE, Fingerprint, encoded_forms, holds_token, readings

TRUSTED = {"https://idp.example"}.__contains__


def _jwt(issuer: str, rng: random.Random) -> str:
    def part(doc: dict) -> str:
        return base64.urlsafe_b64encode(json.dumps(doc).encode()).rstrip(b"=").decode()

    signature = base64.urlsafe_b64encode(rng.randbytes(64)).rstrip(b"=").decode()
    return f"{part({'alg': 'RS256', 'kid': 'k1'})}.{part({'iss': issuer, 'sub': 'a', 'n': rng.random()})}.{signature}"


def _percent(text: str, rng: random.Random) -> str:
    cut = rng.randint(0, len(text))
    return "".join(f"%{ord(c):02X}" for c in text[:cut]) + text[cut:]


def _b64(text: str, rng: random.Random) -> str:
    data = (rng.choice(["", "a:", "xy:", "user:"]) + text).encode()
    return rng.choice([base64.b64encode, base64.urlsafe_b64encode])(data).decode()


ENCODINGS = {
    "as is": lambda t, rng: t,
    "wrapped": lambda t, rng: rng.choice(["", "x", "ab:", "id="]) + t + rng.choice(["", "xyz", "==", "_", " x"]),
    "percent": _percent,
    "percent twice": lambda t, rng: _percent(_percent(t, rng), rng).replace("%", "%25", rng.randint(1, 3)),
    "percent all twice": lambda t, rng: quote(quote(t, safe=""), safe=""),
    "json escape": lambda t, rng: json.dumps({"k": t}).replace("e", "\\u0065", 1),
    "hex": lambda t, rng: rng.choice([str.lower, str.upper])(t.encode().hex()),
    "base64": _b64,
    "base64 twice": lambda t, rng: _b64(_b64(t, rng), rng),
    "base64 of percent": lambda t, rng: _b64(quote(t, safe=""), rng),
    "hex of base64": lambda t, rng: _b64(t, rng).encode().hex(),
    # an outside attack: text glued on without a separator, three levels, mixed chains
    "glued base64 twice": lambda t, rng: rng.choice(["p", "pr", "pre"]) + _b64(_b64(t, rng), rng),
    "base64 three times": lambda t, rng: _b64(_b64(_b64(t, rng), rng), rng),
    "base64 of hex": lambda t, rng: rng.choice(["", "p", "pr"]) + _b64(t.encode().hex(), rng),
    "hex of base64 twice": lambda t, rng: _b64(_b64(t, rng), rng).encode().hex(),
}


def test_every_form_of_a_trusted_token_is_found_and_no_other() -> None:
    rng = random.Random(7)
    seen: Counter[str] = Counter()
    found: Counter[str] = Counter()
    for _ in range(150):
        token = _jwt("https://idp.example", rng)
        for name, encode in ENCODINGS.items():
            text = encode(token, rng).encode()
            seen[name] += 1
            # alone (a header value) and inside a body
            found[name] += holds_token(text, TRUSTED) and holds_token(b'{"x": "' + text + b'"}', TRUSTED)
        other = _jwt("https://elsewhere.example", rng)
        for encode in ENCODINGS.values():
            assert not holds_token(encode(other, rng).encode(), TRUSTED)
        assert not holds_token(b"a prompt about eyJ shaped things and base64 " + base64.b64encode(b"hello world" * 3), TRUSTED)
    assert found == seen, {k: f"{found[k]}/{seen[k]}" for k in seen}
    print(f"forms: {len(ENCODINGS)}; found {sum(found.values())} of {sum(seen.values())}")


def test_a_token_cut_in_two_always_leaves_a_part_that_is_found() -> None:
    """A token cut at a seeded place, each part as is, in hex or in base64: the part
    holding the signing input is found by any trusted-issuer search, or the other one
    by the caller's fingerprint (it holds at least 2 * PIECE - 1 characters of the
    signature); other tokens of the same issuer and key, and random base64, are not
    taken for pieces of it."""
    rng = random.Random(11)
    cuts = found = 0
    for _ in range(300):
        token = _jwt("https://idp.example", rng)
        fingerprint = Fingerprint(token)
        cut = rng.randint(1, len(token) - 1)
        encode = rng.choice([lambda t: t, lambda t: t.encode().hex(), lambda t: _b64(t, rng)])
        parts = [encode(token[:cut]).encode(), encode(token[cut:]).encode()]
        cuts += 1
        found += any(holds_token(part, TRUSTED, fingerprint) for part in parts)
        other = _jwt("https://idp.example", rng)
        assert not fingerprint.found_in(other.encode())
        assert not fingerprint.found_in(base64.urlsafe_b64encode(rng.randbytes(4096)))
    assert found == cuts == 300
    print(f"cuts: {cuts}; a part found in {found}; piece length {PIECE}")


def test_readings_are_bounded() -> None:
    """A text of nested encodings (base64 of base64 of ...) is decoded at most MAX_DEPTH
    deep, and a header full of base64 runs costs at most READING_FACTOR times its size."""
    text = b"hello"
    for _ in range(8):
        text = base64.b64encode(text * 6)
    assert sum(1 for _ in readings(text)) < 20
    runs = b" ".join(base64.b64encode(bytes([i]) * 30) for i in range(200))
    assert holds_token(runs, TRUSTED) in (True, False)  # terminates; verdict is either


def test_encoded_forms_are_offset_free() -> None:
    rng = random.Random(3)
    token = _jwt("https://idp.example", rng)
    forms = encoded_forms(token)
    for pad in ("", "a", "ab"):
        encoded = base64.b64encode((pad + token).encode())
        assert any(form in encoded for form in forms)
