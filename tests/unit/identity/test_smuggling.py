"""Finding a gateway token in any form (hoop_addon.identity.smuggling): seeded forms of
a token of a trusted issuer are found; a token of another issuer, and text without a
token, are not."""

from __future__ import annotations

import base64
import json
import random
from urllib.parse import quote

from hoop_addon.identity.smuggling import encoded_forms, holds_encoded, holds_token


def _jwt(issuer: str, rng: random.Random) -> str:
    def part(doc: dict) -> str:
        return base64.urlsafe_b64encode(json.dumps(doc).encode()).rstrip(b"=").decode()

    signature = base64.urlsafe_b64encode(rng.randbytes(64)).rstrip(b"=").decode()
    return f"{part({'alg': 'RS256', 'kid': 'k1'})}.{part({'iss': issuer, 'sub': 'a', 'n': rng.random()})}.{signature}"


TRUSTED = {"https://idp.example"}.__contains__


def test_every_form_of_a_trusted_token_is_found_and_no_other() -> None:
    rng = random.Random(7)
    found = total = 0
    for _ in range(200):
        token = _jwt("https://idp.example", rng)
        other = _jwt("https://elsewhere.example", rng)
        pad = rng.choice(["", "x", "ab:", "id="])
        forms = [
            token, pad + token + rng.choice(["", "xyz", "==", "_", " x"]),
            quote(token[:10], safe="") + token[10:], quote(token, safe=""),
            json.dumps({"k": token}).replace("e", "\\u0065", 1),
        ]
        for text in forms:
            total += 1
            found += holds_token(text.encode(), TRUSTED)
        for text in (base64.b64encode((pad + token).encode()), base64.urlsafe_b64encode((pad + token).encode())):
            total += 1
            found += holds_token(b"Basic " + text, TRUSTED) and holds_encoded(b"{\"x\": \"" + text + b"\"}", encoded_forms(token))
        assert not holds_token(other.encode(), TRUSTED)
        assert not holds_token(b"a prompt about eyJ shaped things and base64 " + base64.b64encode(b"hello world" * 3), TRUSTED)
    assert found == total == 1400
