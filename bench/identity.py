"""Micro-benchmark of token verification (`Verifier.verify`), per call: the cached path
(a token seen before: SHA-256 + LRU lookup) and the full path (RFC 8725 checks and the
RS256 / ES256 signature), against a local IdP on loopback.

Run from the repository root: `PYTHONPATH=. .venv/bin/python bench/identity.py`.
Prints microseconds per call; the best of 5 runs for the cached path.
"""

from __future__ import annotations

import asyncio
import time

from hoop_addon.identity.verifier import Verifier
from hoop_addon.policy.model import Issuer
from tests.support.idp import LocalIdP


async def seconds_per_call(verifier: Verifier, tokens: list[str], rounds: int) -> float:
    start = time.perf_counter()
    for _ in range(rounds):
        for token in tokens:
            await verifier.verify(token)
    return (time.perf_counter() - start) / (rounds * len(tokens))


def main() -> None:
    with LocalIdP() as idp:
        issuer = Issuer("bench", idp.issuer, (idp.audience,), idp.jwks_url, ("RS256", "ES256"))
        for kid, alg in (("rsa-1", "RS256"), ("ec-1", "ES256")):
            verifier = Verifier.load([issuer])
            seen = [idp.mint(kid=kid) for _ in range(100)]
            asyncio.run(seconds_per_call(verifier, seen, 1))  # verify once: cache them
            cached = min(asyncio.run(seconds_per_call(verifier, seen, 200)) for _ in range(5))
            full = asyncio.run(seconds_per_call(Verifier.load([issuer]), [idp.mint(kid=kid) for _ in range(300)], 1))
            print(f"{alg}: cached {cached * 1e6:.1f} us/call, full {full * 1e6:.0f} us/call")


if __name__ == "__main__":
    main()
