"""Forged and malformed tokens, generated (seeded), sent end to end through every token
source: `Authorization: Bearer` inside an HTTPS tunnel, the proxy password and
`Proxy-Authorization: Bearer` on CONNECT. Every one is refused (401 / 407), the upstream
receives nothing and no identity is attached; the coverage per family is printed.

Families: claims signed by the real key but wrong (types of exp/nbf/iat, times beyond
the leeway, issuer and audience spellings, subject), headers signed by the real key but
refused (unknown or odd kid, crit, an algorithm not allowed), keys the token offers
(jku, x5u, jwk) with an attacker's signature,
signatures that do not verify (a foreign key of the same kind, a changed character,
truncated, empty, another token's), and broken structure (segments added, dropped,
characters outside base64url, over the size cap).
"""

from __future__ import annotations

import base64
import collections
import random
import ssl
import string
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest

from hoop_addon.dev.gateway import Gateway
from hoop_addon.dev.tls import CA
from hoop_addon.dev.upstream import FakeOpenAI
from tests.conftest import POLICY, UPSTREAM_KEY
from tests.support.agents import chat
from tests.support.idp import LocalIdP

SEED, COUNT = 15, 60
B64URL = string.ascii_letters + string.digits + "-_"


@pytest.fixture(scope="module")
def issuer() -> Iterator[LocalIdP]:
    with LocalIdP() as provider:
        yield provider


@pytest.fixture(scope="module")
def gw(tmp_path_factory: pytest.TempPathFactory, issuer: LocalIdP, pki: tuple[CA, Path, Path]) -> Iterator[Gateway]:
    work = tmp_path_factory.mktemp("forgeries")
    (work / "rules").mkdir()
    text = POLICY.replace("token_sources: [authorization, proxy_password]", "token_sources: [authorization, proxy_password, proxy_bearer]")
    (work / "rules" / "policy.yaml").write_text(text.format(issuer=issuer.issuer, jwks=issuer.jwks_url))
    gateway = Gateway(work / "rules", work, pki[0].cert_path, env={"HOOP_TEST_UPSTREAM_KEY": UPSTREAM_KEY}, serve=True)
    gateway.start()
    yield gateway
    gateway.stop()


def forgeries(idp: LocalIdP, rng: random.Random) -> list[tuple[str, str]]:
    """`COUNT` (family, token) pairs, drawn with `rng` from the families above."""
    now = int(time.time())

    def claims() -> str:
        bad = rng.choice([
            {"exp": str(now + 300)}, {"exp": True}, {"exp": None}, {"exp": [now + 300]}, {"exp": now - 3600},
            {"nbf": now + 3600}, {"nbf": str(now)}, {"iat": now + 3600}, {"iat": False},
            {"iss": idp.issuer + "/"}, {"iss": idp.issuer.upper()}, {"iss": [idp.issuer]}, {"iss": None},
            {"aud": "other-api"}, {"aud": ["other-api"]}, {"aud": 1}, {"sub": ""}, {"sub": 7}, {"sub": None},
        ])
        omit = [k for k, v in bad.items() if v is None]
        return idp.mint(kid=rng.choice(["rsa-1", "ec-1"]), extra_claims={k: v for k, v in bad.items() if v is not None}, omit=omit)

    def headers() -> str:
        bad = rng.choice([
            {"kid": "ghost"}, {"kid": "k" * 300}, {"kid": 1}, {"kid": ["rsa-1"]}, {"kid": "ec-1"},
            {"crit": ["exp"]}, {"alg": "RS512"}, {"alg": "none"}, {"alg": "HS256"}, {"alg": "PS256"},
            {"jku": "https://attacker.example/jwks"}, {"x5u": "https://attacker.example/c"}, {"jwk": {"kty": "RSA"}},
        ])
        if bad.keys() & {"jku", "x5u", "jwk"}:  # keys the token offers: signed by the attacker's own key
            return idp.mint_with_foreign_key(kid="rsa-1", headers=bad)
        return idp.mint(kid="rsa-1", headers=bad)

    def signatures() -> str:
        token = idp.mint(kid=rng.choice(["rsa-1", "ec-1"]))
        head, body, sig = token.split(".")
        how = rng.choice(["foreign", "changed", "truncated", "empty", "swapped"])
        if how == "foreign":
            return idp.mint_with_foreign_key(kid=rng.choice(["rsa-1", "ec-1"]))
        if how == "changed":  # not the last character: its low bits may be padding
            i = rng.randrange(len(sig) - 1)
            sig = sig[:i] + rng.choice(B64URL.replace(sig[i], "")) + sig[i + 1:]
        elif how == "truncated":
            sig = sig[: rng.randrange(1, len(sig) - 1)]
        elif how == "empty":
            sig = ""
        else:
            sig = idp.mint("someone-else", kid="rsa-1").split(".")[2]
        return f"{head}.{body}.{sig}"

    def structure() -> str:
        token = idp.mint()
        how = rng.choice(["extra", "dropped", "alphabet", "padded", "oversize", "json-header"])
        if how == "extra":
            return token + "." + token.split(".")[1]
        if how == "dropped":
            return ".".join(token.split(".")[:2])
        if how == "alphabet":
            i = rng.randrange(len(token))
            return token[:i] + rng.choice("+/=!~ ") + token[i + 1:]
        if how == "padded":
            return token + "=="
        if how == "oversize":
            return idp.mint(extra_claims={"pad": "x" * 9000})
        return base64.urlsafe_b64encode(b'{"alg":"RS256"').decode() + token[token.index("."):]

    families: dict[str, Callable[[], str]] = {"claims": claims, "headers": headers, "signatures": signatures, "structure": structure}
    return [(name, families[name]()) for name in (rng.choice(list(families)) for _ in range(COUNT))]


def send(gw: Gateway, upstream: FakeOpenAI, source: str, token: str) -> int:
    """The status the agent gets sending `token` by `source`."""
    ca = ssl.create_default_context(cafile=str(gw.ca_cert))
    url = f"{upstream.url}/v1/chat/completions"
    if source == "authorization":
        with httpx.Client(proxy=gw.proxy(), verify=ca, trust_env=False, timeout=10) as c:
            return c.post(url, json=chat("hi"), headers={"Authorization": f"Bearer {token}"}).status_code
    proxy = httpx.Proxy(gw.proxy(), headers={"Proxy-Authorization": f"Bearer {token}"}) if source == "proxy_bearer" else gw.proxy(token)
    try:
        with httpx.Client(proxy=proxy, verify=ca, trust_env=False, timeout=10) as c:
            return c.post(url, json=chat("hi")).status_code
    except httpx.ProxyError as exc:
        return 407 if "407" in str(exc) else -1
    except (httpx.InvalidURL, UnicodeEncodeError, ValueError):
        return 0  # the client itself cannot send it (a space in a URL's userinfo): nothing forwarded either


@pytest.mark.parametrize("source", ["authorization", "proxy_password", "proxy_bearer"])
def test_generated_forgeries_are_refused_by_every_token_source(
    gw: Gateway, issuer: LocalIdP, upstream: FakeOpenAI, source: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert send(gw, upstream, source, issuer.mint()) == 200  # the source works with a valid token
    upstream.clear()
    before = len(gw.audit())
    coverage: collections.Counter[str] = collections.Counter()
    for family, token in forgeries(issuer, random.Random(f"{SEED}-{source}")):
        status = send(gw, upstream, source, token)
        assert status in ((401,) if source == "authorization" else (407, 0)), (family, token, status)
        coverage[family] += 1
    assert upstream.received == []
    entries = gw.audit()[before:]
    assert entries and all(e["identity"] is None and e["decision"]["outcome"] == "deny" for e in entries)
    with capsys.disabled():
        print(f"\n{source}: {sum(coverage.values())} forgeries refused, by family {dict(sorted(coverage.items()))}, "
              f"reasons {dict(collections.Counter(e['decision']['reason'] for e in entries))}")
