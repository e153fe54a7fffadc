"""Token verification against a local IdP (real RSA and EC keys, JWKS over loopback):
accepted tokens and their `Identity`, every refusal reason, key rotation with the
refetch cooldown, and the verified-token cache."""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import textwrap
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
from jose import jwt
from jose.exceptions import JWTError

from hoop_addon.identity.verifier import JWKS_MAX_AGE_S, REFETCH_COOLDOWN_S, Identity, JwksError, KeySet, TokenError, Verifier
from hoop_addon.policy.loader import ALGORITHMS
from hoop_addon.policy.loader import PolicyError, load_policy
from hoop_addon.policy.model import Credential, Issuer, Policy, Route
from tests.support.idp import LocalIdP, b64url, hand_made, hs256_with_rsa_public_key

AUDIENCE = "hoop-gateway"


@pytest.fixture(scope="module")
def idp() -> Iterator[LocalIdP]:
    with LocalIdP(audience=AUDIENCE) as provider:
        yield provider


def trust(idp: LocalIdP, **changes: Any) -> Issuer:
    """The issuer entry a policy would have for `idp`, with `changes` applied."""
    issuer = Issuer("local", idp.issuer, (AUDIENCE,), idp.jwks_url, ("RS256", "ES256"))
    return dataclasses.replace(issuer, **changes)


@pytest.fixture
def verifier(idp: LocalIdP) -> Verifier:
    return Verifier.load([trust(idp)])


class Clock:
    """A settable clock, starting at the current time."""

    def __init__(self) -> None:
        self.now = time.time()

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def clocked_verifier(
    issuer: Issuer, jwks_clock: Clock, clock: Callable[[], float] = time.time, **kwargs: Any
) -> Verifier:
    """A verifier whose JWKS refetch cooldown follows `jwks_clock` and cache expiry `clock`."""
    keyset = KeySet(issuer.jwks, clock=jwks_clock)
    asyncio.run(keyset.refresh())
    return Verifier([issuer], {issuer.issuer: keyset}, clock=clock, **kwargs)


def verify(verifier: Verifier, token: str) -> Identity:
    return asyncio.run(verifier.verify(token))


def refusal(verifier: Verifier, token: str) -> str:
    """The reason `verifier` refuses `token` with."""
    with pytest.raises(TokenError) as caught:
        verify(verifier, token)
    return caught.value.reason


def in_an_hour() -> int:
    return int(time.time()) + 3600


class TestAccepted:
    @pytest.mark.parametrize("kid", ["rsa-1", "ec-1"])
    def test_valid_token_gives_its_identity(self, idp: LocalIdP, verifier: Verifier, kid: str) -> None:
        token = idp.mint("agent-7", ("agents", "ops"), kid=kid)
        claims = jwt.get_unverified_claims(token)

        identity = verify(verifier, token)

        audiences = (claims["aud"],) if isinstance(claims["aud"], str) else tuple(claims["aud"])
        assert identity == Identity("agent-7", idp.issuer, ("agents", "ops"), claims["jti"], claims["exp"], audiences=audiences)
        assert identity.record() == {
            "subject": "agent-7", "issuer": idp.issuer, "groups": ["agents", "ops"], "client_id": None, "scopes": [],
            "token_id": claims["jti"],
        }

    @pytest.mark.parametrize(
        "make",
        [
            pytest.param(lambda idp: idp.mint(expires_in=-10), id="expired-within-leeway"),
            pytest.param(lambda idp: idp.mint(extra_claims={"nbf": int(time.time()) + 10}), id="nbf-within-leeway"),
            pytest.param(lambda idp: idp.mint(extra_claims={"iat": int(time.time()) + 10}), id="iat-within-leeway"),
            pytest.param(lambda idp: idp.mint(extra_claims={"aud": ["other", AUDIENCE]}), id="audience-list"),
            pytest.param(lambda idp: idp.mint(omit=["jti", "iat", "nbf"]), id="optional-claims-absent"),
        ],
    )
    def test_token_within_the_rules_is_accepted(self, idp: LocalIdP, verifier: Verifier, make: Callable[[LocalIdP], str]) -> None:
        assert verify(verifier, make(idp)).subject == "agent-1"

    def test_token_without_jti_has_no_token_id(self, idp: LocalIdP, verifier: Verifier) -> None:
        assert verify(verifier, idp.mint(omit=["jti"])).token_id is None

    @pytest.mark.parametrize(
        ("groups_claim", "claims", "expected"),
        [
            pytest.param(
                "realm_access.roles", {"realm_access": {"roles": ["admins", 7, "agents"]}}, ("admins", "agents"), id="nested-list"
            ),
            pytest.param("scope", {"scope": "read write"}, ("read", "write"), id="space-separated-scope"),
            pytest.param("roles", {"roles": "Domain Admins"}, ("Domain Admins",), id="a-string-is-one-group"),
            pytest.param("realm_access.roles", {"realm_access": ["not", "a", "mapping"]}, (), id="path-through-a-list"),
            pytest.param("missing.claim", {}, (), id="absent"),
        ],
    )
    def test_groups_come_from_the_configured_claim(
        self, idp: LocalIdP, groups_claim: str, claims: dict[str, Any], expected: tuple[str, ...]
    ) -> None:
        verifier = Verifier.load([trust(idp, groups_claim=groups_claim)])

        assert verify(verifier, idp.mint(groups=("ignored",), extra_claims=claims)).groups == expected

    def test_jwks_can_be_a_file(self, idp: LocalIdP, tmp_path: Path) -> None:
        idp.write_jwks(tmp_path / "jwks.json")
        verifier = Verifier.load([trust(idp, jwks=str(tmp_path / "jwks.json"))])

        assert verify(verifier, idp.mint("agent-2", kid="ec-1")).subject == "agent-2"


class TestRefused:
    @pytest.mark.parametrize(
        ("make", "reason"),
        [
            pytest.param(lambda idp: idp.mint(expires_in=-3600), "expired", id="expired"),
            pytest.param(lambda idp: idp.mint(extra_claims={"nbf": in_an_hour()}), "not_yet_valid", id="nbf-in-future"),
            pytest.param(lambda idp: idp.mint(extra_claims={"iat": in_an_hour()}), "not_yet_valid", id="iat-in-future"),
            pytest.param(lambda idp: idp.mint(audience="another-service"), "wrong_audience", id="wrong-audience"),
            pytest.param(lambda idp: idp.mint(omit=["aud"]), "wrong_audience", id="missing-audience"),
            pytest.param(lambda idp: idp.mint(extra_claims={"aud": [{"x": 1}, ["y"]]}), "wrong_audience", id="audience-not-strings"),
            pytest.param(lambda idp: idp.mint(omit=["sub"]), "invalid_claims", id="missing-subject"),
            pytest.param(lambda idp: idp.mint(extra_claims={"exp": "soon"}), "invalid_claims", id="exp-not-a-number"),
            pytest.param(lambda idp: idp.mint(omit=["exp"]), "invalid_claims", id="missing-exp"),
            pytest.param(lambda idp: idp.mint(extra_claims={"exp": float("inf")}), "invalid_claims", id="non-finite-exp"),
            pytest.param(lambda idp: idp.mint(issuer="https://evil.example"), "untrusted_issuer", id="untrusted-issuer"),
            pytest.param(lambda idp: idp.mint(extra_claims={"iss": [idp.issuer]}), "untrusted_issuer", id="issuer-not-a-string"),
            pytest.param(lambda idp: idp.mint_with_foreign_key(), "bad_signature", id="foreign-rsa-key"),
            pytest.param(lambda idp: idp.mint_with_foreign_key(kid="ec-1"), "bad_signature", id="foreign-ec-key"),
            pytest.param(lambda idp: idp.mint(headers={"crit": ["exp"]}), "crit_not_understood", id="crit-header"),
            pytest.param(lambda idp: idp.mint(headers={"kid": "no-such-key"}), "unknown_key", id="unknown-kid"),
            pytest.param(lambda idp: idp.mint(kid="rsa-1", headers={"kid": "ec-1"}), "unknown_key", id="kid-of-another-key-type"),
            pytest.param(lambda idp: idp.mint(headers={"kid": "k" * 257}), "malformed", id="kid-over-256-chars"),
            pytest.param(lambda idp: idp.mint(headers={"kid": 7}), "malformed", id="kid-not-a-string"),
            pytest.param(lambda idp: idp.mint(extra_claims={"pad": "x" * 8192}), "too_large", id="over-8192-bytes"),
            pytest.param(lambda idp: idp.mint().rsplit(".", 1)[0], "malformed", id="two-segments"),
            pytest.param(lambda idp: idp.mint() + ".e30", "malformed", id="four-segments"),
            pytest.param(lambda idp: idp.mint() + "=", "malformed", id="base64-padding"),
            pytest.param(lambda idp: "+" + idp.mint()[1:], "malformed", id="non-base64url-char"),
            pytest.param(lambda idp: "e30.bm90IGpzb24.c2ln", "malformed", id="payload-not-json"),
            pytest.param(lambda idp: hand_made(idp, {"alg": "none"}, lambda _: b""), "malformed", id="alg-none-unsigned"),
            pytest.param(
                lambda idp: hand_made(idp, {"alg": "none"}, lambda _: b"x"), "algorithm_not_allowed", id="alg-none-with-signature"
            ),
            pytest.param(hs256_with_rsa_public_key, "algorithm_not_allowed", id="hs256-keyed-with-rsa-public-key"),
        ],
    )
    def test_refusal_reason(self, idp: LocalIdP, verifier: Verifier, make: Callable[[LocalIdP], str], reason: str) -> None:
        assert refusal(verifier, make(idp)) == reason

    @pytest.mark.parametrize(("allowed", "kid"), [(("ES256",), "rsa-1"), (("RS256",), "ec-1")])
    def test_algorithm_outside_the_issuer_allow_list_is_refused(self, idp: LocalIdP, allowed: tuple[str, ...], kid: str) -> None:
        verifier = Verifier.load([trust(idp, algorithms=allowed)])

        assert refusal(verifier, idp.mint(kid=kid)) == "algorithm_not_allowed"

    def test_key_confusion_is_refused_even_when_every_policy_algorithm_is_allowed(self, idp: LocalIdP) -> None:
        verifier = Verifier.load([trust(idp, algorithms=ALGORITHMS)])

        assert refusal(verifier, hs256_with_rsa_public_key(idp)) == "algorithm_not_allowed"

    def test_token_error_message_never_contains_the_token(self, idp: LocalIdP, verifier: Verifier) -> None:
        token = idp.mint(expires_in=-3600)

        with pytest.raises(TokenError) as caught:
            verify(verifier, token)

        assert token not in str(caught.value) and token.split(".")[2] not in str(caught.value)


class TestJwks:
    def test_unreadable_jwks_file_is_a_configuration_error(self, idp: LocalIdP, tmp_path: Path) -> None:
        with pytest.raises(JwksError, match="cannot read JWKS"):
            Verifier.load([trust(idp, jwks=str(tmp_path / "absent.json"))])

    def test_unreachable_jwks_url_loads_and_refuses_tokens(self, idp: LocalIdP) -> None:
        verifier = Verifier.load([trust(idp, jwks="http://127.0.0.1:9/jwks.json")])

        assert refusal(verifier, idp.mint()) == "unknown_key"

    def test_rotated_key_is_fetched_without_rebuilding_the_verifier(self, idp: LocalIdP) -> None:
        clock = Clock()
        verifier = clocked_verifier(trust(idp), clock)
        kid = idp.add_key("RSA", "rsa-2")
        clock.advance(REFETCH_COOLDOWN_S)
        fetches = idp.jwks_fetches

        identity = verify(verifier, idp.mint("rotated", kid=kid))

        assert identity.subject == "rotated"
        assert idp.jwks_fetches == fetches + 1

    def test_unknown_kid_does_not_refetch_within_the_cooldown(self, idp: LocalIdP) -> None:
        clock = Clock()
        verifier = clocked_verifier(trust(idp), clock)
        fetches = idp.jwks_fetches

        clock.advance(REFETCH_COOLDOWN_S - 1)

        assert refusal(verifier, idp.mint(headers={"kid": "ghost"})) == "unknown_key"
        assert idp.jwks_fetches == fetches

    def test_flood_of_unknown_kids_fetches_the_jwks_once(self, idp: LocalIdP) -> None:
        clock = Clock()
        verifier = clocked_verifier(trust(idp), clock)
        tokens = [hand_made(idp, {"alg": "RS256", "kid": f"ghost-{i}"}, lambda _: b"unchecked") for i in range(50)]
        clock.advance(REFETCH_COOLDOWN_S)
        fetches = idp.jwks_fetches

        async def flood() -> list[BaseException | Identity]:
            return await asyncio.gather(*(verifier.verify(t) for t in tokens), return_exceptions=True)

        results = asyncio.run(flood())

        assert [getattr(r, "reason", r) for r in results] == ["unknown_key"] * 50
        assert idp.jwks_fetches == fetches + 1


def no_signature_checks(monkeypatch: pytest.MonkeyPatch) -> None:
    """From now on every signature check fails: only a cached identity still verifies."""

    def refuse(*args: Any, **kwargs: Any) -> None:
        raise JWTError("signature checks are off in this test")

    monkeypatch.setattr("hoop_addon.identity.verifier.jwt.decode", refuse)


class TestCache:
    def test_verified_token_is_served_from_the_cache(self, idp: LocalIdP, monkeypatch: pytest.MonkeyPatch) -> None:
        verifier = clocked_verifier(trust(idp), Clock())
        token = idp.mint()
        first = verify(verifier, token)
        no_signature_checks(monkeypatch)

        assert verify(verifier, token) is first
        assert refusal(verifier, idp.mint()) == "bad_signature"

    def test_cache_entry_ends_when_the_token_expires(self, idp: LocalIdP, monkeypatch: pytest.MonkeyPatch) -> None:
        clock = Clock()
        verifier = clocked_verifier(trust(idp), Clock(), clock)
        token = idp.mint(expires_in=300)
        verify(verifier, token)
        no_signature_checks(monkeypatch)

        clock.advance(300 + trust(idp).leeway)  # valid within the issuer's leeway, as when verified

        assert refusal(verifier, token) == "bad_signature"

    def test_least_recently_used_entry_is_evicted(self, idp: LocalIdP, monkeypatch: pytest.MonkeyPatch) -> None:
        verifier = clocked_verifier(trust(idp), Clock(), cache_size=2)
        first, second, third = idp.mint("first"), idp.mint("second"), idp.mint("third")
        for token in (first, second, first, third):  # `first` used again: `second` is now the oldest
            verify(verifier, token)
        no_signature_checks(monkeypatch)

        assert [verify(verifier, t).subject for t in (first, third)] == ["first", "third"]
        assert refusal(verifier, second) == "bad_signature"

    @pytest.mark.parametrize("change", ["removed", "replaced"])
    def test_a_cached_token_dies_with_its_key(self, idp: LocalIdP, change: str) -> None:
        """A refetch (here: triggered by a token of another kid) shows the key gone or
        replaced under the same kid: the token verified earlier is refused at once."""
        clock = Clock()
        verifier = clocked_verifier(trust(idp), clock)
        kid = idp.add_key("RSA", f"short-lived-{change}")
        clock.advance(REFETCH_COOLDOWN_S)
        token = idp.mint("cached", kid=kid)
        assert verify(verifier, token).subject == "cached"
        idp.remove_key(kid)
        if change == "replaced":
            idp.add_key("RSA", kid)
        other = idp.add_key("RSA", f"trigger-{change}")
        clock.advance(REFETCH_COOLDOWN_S)

        assert verify(verifier, idp.mint("other", kid=other)).subject == "other"  # the refetch
        assert refusal(verifier, token) == "unknown_key" if change == "removed" else "bad_signature"

    def test_an_unchanged_key_keeps_its_cached_tokens(self, idp: LocalIdP, monkeypatch: pytest.MonkeyPatch) -> None:
        clock = Clock()
        verifier = clocked_verifier(trust(idp), clock)
        token = idp.mint("kept")
        verify(verifier, token)
        clock.advance(REFETCH_COOLDOWN_S)
        refusal(verifier, idp.mint(headers={"kid": "ghost"}))  # a refetch; rsa-1 is unchanged
        no_signature_checks(monkeypatch)

        assert verify(verifier, token).subject == "kept"


def tampered_jwks(idp: LocalIdP, path: Path, kid: str, **changes: Any) -> str:
    """Write `idp`'s JWKS to `path` with `changes` applied to key `kid`; returns the path."""
    doc = idp.jwks()
    for key in doc["keys"]:
        if key["kid"] == kid:
            key.update(changes)
    path.write_bytes(orjson.dumps(doc))
    return str(path)


@pytest.mark.parametrize("claim", ["exp", "nbf", "iat"])
@pytest.mark.parametrize("value", ["1", "9999999999", True, False, None, [1], {"n": 1}, "1e3"])
def test_time_claims_must_be_json_numbers(idp: LocalIdP, verifier: Verifier, claim: str, value: Any) -> None:
    """RFC 7519 §4.1.4-4.1.6: a NumericDate is a JSON number, wherever the claim is."""
    token = idp.mint(extra_claims={claim: value})
    assert refusal(verifier, token) in ("invalid_claims", "expired", "not_yet_valid")


class TestClaimsToIdentity:
    @pytest.mark.parametrize(
        ("claims", "client_id", "scopes"),
        [
            pytest.param({"client_id": "svc-a", "scope": "chat:write models:read"}, "svc-a", ("chat:write", "models:read"), id="rfc9068"),
            pytest.param({"azp": "web-app", "scp": ["chat:write"]}, "web-app", ("chat:write",), id="oidc-azp-okta-scp"),
            pytest.param({"azp": "x", "client_id": "y", "scp": "a b"}, "y", ("a", "b"), id="client_id-wins-azure-scp-string"),
            pytest.param({"client_id": 7, "scope": ["not", "a", "string"]}, None, ("not", "a", "string"), id="odd-types"),
            pytest.param({"scope": "read\u2003admin\tops  x"}, None, ("read\u2003admin\tops", "x"), id="split-on-space-only"),
        ],
    )
    def test_client_id_and_scopes(
        self, idp: LocalIdP, verifier: Verifier, claims: dict[str, Any], client_id: str | None, scopes: tuple[str, ...]
    ) -> None:
        identity = verify(verifier, idp.mint(extra_claims=claims))

        assert (identity.client_id, identity.scopes) == (client_id, scopes)
        assert identity.record()["client_id"] == client_id and identity.record()["scopes"] == list(scopes)

    def test_client_id_claim_is_configurable(self, idp: LocalIdP) -> None:
        verifier = Verifier.load([trust(idp, client_id_claim="cid")])

        assert verify(verifier, idp.mint(extra_claims={"cid": "0oa-okta-app", "azp": "ignored"})).client_id == "0oa-okta-app"


class TestTokenType:
    @pytest.mark.parametrize("typ", ["at+jwt", "application/at+JWT"])
    def test_access_token_type_is_accepted(self, idp: LocalIdP, typ: str) -> None:
        verifier = Verifier.load([trust(idp, token_type="at+jwt")])

        assert verify(verifier, idp.mint(headers={"typ": typ})).subject == "agent-1"

    @pytest.mark.parametrize("headers", [{"typ": "JWT"}, {}, {"typ": ["at+jwt"]}], ids=["id-token-JWT", "no-typ", "typ-not-a-string"])
    def test_other_token_types_are_refused(self, idp: LocalIdP, headers: dict[str, Any]) -> None:
        verifier = Verifier.load([trust(idp, token_type="at+jwt")])
        token = idp.mint(headers=headers)
        if "typ" not in headers:  # python-jose writes typ: JWT by default; drop it by hand
            header, rest = token.split(".", 1)
            fields = orjson.loads(base64.urlsafe_b64decode(header + "=="))
            fields.pop("typ")
            token = b64url(orjson.dumps(fields)) + "." + rest

        assert refusal(verifier, token) == "wrong_token_type"


class TestKeyBinding:
    """RFC 8725 §3.1: a key verifies only the algorithm and use it is published for."""

    @pytest.mark.parametrize(
        ("kid", "changes"),
        [
            pytest.param("rsa-1", {"use": "enc"}, id="rsa-use-enc"),
            pytest.param("ec-1", {"use": "enc"}, id="ec-use-enc"),
            pytest.param("rsa-1", {"key_ops": ["encrypt"]}, id="key_ops-without-verify"),
            pytest.param("rsa-1", {"alg": "RS512"}, id="key-alg-differs"),
            pytest.param("ec-1", {"crv": "P-384"}, id="curve-not-for-ES256"),
        ],
    )
    def test_key_published_for_something_else_is_not_used(
        self, idp: LocalIdP, tmp_path: Path, kid: str, changes: dict[str, Any]
    ) -> None:
        verifier = Verifier.load([trust(idp, jwks=tampered_jwks(idp, tmp_path / "jwks.json", kid, **changes))])

        assert refusal(verifier, idp.mint(kid=kid)) == "unknown_key"

    def test_key_ops_with_verify_is_used(self, idp: LocalIdP, tmp_path: Path) -> None:
        verifier = Verifier.load([trust(idp, jwks=tampered_jwks(idp, tmp_path / "jwks.json", "rsa-1", key_ops=["verify"]))])

        assert verify(verifier, idp.mint()).subject == "agent-1"

    @pytest.mark.parametrize("alg", ["HS256", "HS384", "HS512", "none"])
    def test_symmetric_or_none_algorithm_is_refused_even_if_an_issuer_lists_it(self, idp: LocalIdP, alg: str) -> None:
        verifier = Verifier.load([trust(idp, algorithms=("RS256", alg))])

        token = hand_made(idp, {"alg": alg, "kid": "rsa-1"}, lambda _: b"signed-with-anything")

        assert refusal(verifier, token) == "algorithm_not_allowed"


@pytest.fixture(scope="module")
def attacker() -> Iterator[LocalIdP]:
    """Another IdP, with keys the gateway does not trust, whose JWKS counts fetches."""
    with LocalIdP(audience=AUDIENCE) as provider:
        yield provider


class TestHeaderKeysIgnored:
    """RFC 8725 §3.10 / RFC 7515 §4.1.2-4.1.6: keys come only from the configured JWKS."""

    @pytest.mark.parametrize("field", ["jku", "x5u"])
    def test_key_url_in_the_header_is_never_fetched(self, idp: LocalIdP, attacker: LocalIdP, verifier: Verifier, field: str) -> None:
        token = attacker.mint(issuer=idp.issuer, kid="rsa-1", headers={"kid": "attacker-key", field: attacker.jwks_url})
        fetches = attacker.jwks_fetches

        assert refusal(verifier, token) == "unknown_key"
        assert attacker.jwks_fetches == fetches

    def test_embedded_jwk_is_not_trusted(self, idp: LocalIdP, attacker: LocalIdP, verifier: Verifier) -> None:
        public = next(k for k in attacker.jwks()["keys"] if k["kid"] == "rsa-1")
        token = attacker.mint(issuer=idp.issuer, kid="rsa-1", headers={"jwk": public})

        assert refusal(verifier, token) == "bad_signature"

    def test_embedded_certificate_chain_is_not_trusted(self, idp: LocalIdP, attacker: LocalIdP, verifier: Verifier) -> None:
        token = attacker.mint(issuer=idp.issuer, kid="rsa-1", headers={"x5c": ["MIIBfake"]})

        assert refusal(verifier, token) == "bad_signature"


class TestIssuers:
    def test_several_issuers_each_with_their_own_keys(self, idp: LocalIdP, attacker: LocalIdP) -> None:
        verifier = Verifier.load([trust(idp), dataclasses.replace(trust(attacker), name="agents-idp")])

        assert verify(verifier, idp.mint("human")).issuer == idp.issuer
        assert verify(verifier, attacker.mint("robot", kid="ec-1")).issuer == attacker.issuer
        # the same kid at another issuer is another key
        assert refusal(verifier, attacker.mint(issuer=idp.issuer, kid="rsa-1")) == "bad_signature"

    def test_keys_by_oidc_discovery(self, idp: LocalIdP) -> None:
        verifier = Verifier.load([trust(idp, jwks=None)])

        assert verify(verifier, idp.mint("discovered", kid="ec-1")).subject == "discovered"

    def test_discovery_document_of_another_issuer_is_refused(self, idp: LocalIdP) -> None:
        keyset = KeySet(None, issuer=idp.issuer + "/")  # the document names idp.issuer, not this

        with pytest.raises(JwksError, match="names another issuer"):
            asyncio.run(keyset.refresh())

    def test_idp_down_keeps_the_last_good_keys_and_says_so(self) -> None:
        with LocalIdP(audience=AUDIENCE) as down:
            clock = Clock()
            verifier = clocked_verifier(trust(down), clock)
            token = down.mint("still-works")
            down.stop()
            clock.advance(REFETCH_COOLDOWN_S)

            assert refusal(verifier, down.mint(headers={"kid": "ghost"})) == "unknown_key"  # refetch fails
            assert verifier.keys_stale(down.issuer)
            assert verify(verifier, token).subject == "still-works"

            down.start()
            clock.advance(REFETCH_COOLDOWN_S)
            assert refusal(verifier, down.mint(headers={"kid": "ghost"})) == "unknown_key"
            assert not verifier.keys_stale(down.issuer)

    def test_old_keys_are_refreshed_so_revoked_keys_drop_out(self, idp: LocalIdP) -> None:
        clock = Clock()
        verifier = clocked_verifier(trust(idp), clock)
        kid = idp.add_key("RSA", "to-revoke")
        clock.advance(REFETCH_COOLDOWN_S)
        verify(verifier, idp.mint(kid=kid))
        token = idp.mint("after-revocation", kid=kid)
        idp.remove_key(kid)

        clock.advance(JWKS_MAX_AGE_S)

        assert refusal(verifier, token) == "unknown_key"


def load(tmp_path: Path, text: str, resolve_env: bool = True) -> Policy:
    (tmp_path / "policy.yaml").write_text(text)
    return load_policy(tmp_path / "policy.yaml", resolve_env=resolve_env)


POLICY_ISSUER = """\
version: 1
issuers:
  - name: okta
    issuer: https://corp.okta.com/oauth2/default
    audience: api://hoop
"""


class TestPolicySections:
    """The `issuers`, `identity`, `allow` and `credential` sections of the policy."""

    def test_issuer_without_jwks_uses_discovery_and_reads_its_options(self, tmp_path: Path) -> None:
        policy = load(tmp_path, POLICY_ISSUER + "    typ: at+jwt\n    refetch_cooldown: 120\n    client_id_claim: cid\n")

        (issuer,) = policy.issuers
        assert (issuer.jwks, issuer.token_type, issuer.refetch_cooldown, issuer.client_id_claim) == (None, "at+jwt", 120, "cid")

    @pytest.mark.parametrize(
        ("extra", "key", "message"),
        [
            ("    refetch_cooldown: 0\n", "issuers[0].refetch_cooldown", "must be 1..3600 seconds"),
            ("    jwks: http://keys.example/jwks.json\n", "issuers[0].jwks", "JWKS over plain http is only allowed on loopback"),
        ],
    )
    def test_issuer_errors(self, tmp_path: Path, extra: str, key: str, message: str) -> None:
        with pytest.raises(PolicyError) as caught:
            load(tmp_path, POLICY_ISSUER + extra)
        assert (caught.value.key, caught.value.message) == (key, message)

    def test_non_url_issuer_needs_a_jwks(self, tmp_path: Path) -> None:
        with pytest.raises(PolicyError, match=r"issuers\[0\].jwks: required unless the issuer is a URL"):
            load(tmp_path, POLICY_ISSUER.replace("https://corp.okta.com/oauth2/default", "hoop-dev"))

    def test_proxy_bearer_is_a_token_source(self, tmp_path: Path) -> None:
        policy = load(tmp_path, POLICY_ISSUER + "identity:\n  token_sources: [proxy_bearer]\n")

        assert policy.token_sources == {"proxy_bearer"}

    def route(self, tmp_path: Path, body: str, resolve_env: bool = True) -> Route:
        text = POLICY_ISSUER + "routes:\n  - name: r\n    match: {hosts: [a.example]}\n" + textwrap.indent(textwrap.dedent(body), "    ")
        return load(tmp_path, text, resolve_env).routes[0]

    def test_allow_by_client_ids_and_scopes(self, tmp_path: Path) -> None:
        route = self.route(tmp_path, "allow: {client_ids: [svc-batch], scopes: [chat:write]}\n")

        assert route.admits("https://corp.okta.com/oauth2/default", "x", (), "svc-batch", ("chat:write", "other"))
        assert not route.admits("https://corp.okta.com/oauth2/default", "x", (), "svc-batch", ("other",))  # a required scope is missing
        assert not route.admits("https://corp.okta.com/oauth2/default", "x", (), "svc-other", ("chat:write",))  # not a named client
        assert not route.admits("https://corp.okta.com/oauth2/default", "x", ("agents",), None, ("chat:write",))

    def test_scopes_alone_admit_any_caller_holding_them(self, tmp_path: Path) -> None:
        route = self.route(tmp_path, "allow: {scopes: [models:read]}\n")

        assert route.admits("https://corp.okta.com/oauth2/default", "anyone", (), None, ("models:read",))
        assert not route.admits("https://corp.okta.com/oauth2/default", "anyone", ("admins",), "svc", ())

    @pytest.mark.parametrize(
        ("body", "header", "value", "param", "secrets"),
        [
            ("credential: {header: x-api-key, value: '${HOOP_UNIT_SECRET}'}\n", "x-api-key", "s3cr3t", None, ("s3cr3t",)),
            ("credential: {bearer: '${HOOP_UNIT_SECRET}'}\n", "Authorization", "Bearer s3cr3t", None, ("s3cr3t",)),
            ("credential: {basic: {username: svc, password: '${HOOP_UNIT_SECRET}'}}\n", "Authorization", "Basic c3ZjOnMzY3IzdA==", None,
             ("s3cr3t", "c3ZjOnMzY3IzdA==")),
            ("credential: {query: key, value: '${HOOP_UNIT_SECRET}'}\n", "Authorization", "s3cr3t", "key", ("s3cr3t",)),
            ("credential: {bearer: '${file:secret.txt}'}\n", "Authorization", "Bearer from-file", None, ("from-file",)),
        ],
        ids=["header", "bearer", "basic", "query", "file"],
    )
    def test_credential_kinds(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, body: str, header: str, value: str, param: str | None,
        secrets: tuple[str, ...],
    ) -> None:
        monkeypatch.setenv("HOOP_UNIT_SECRET", "s3cr3t")
        (tmp_path / "secret.txt").write_text("from-file\n")

        credential = self.route(tmp_path, "allow: {groups: [agents]}\n" + body).credential

        assert credential == Credential(header, value, param, secrets)  # secrets: what a response must not carry back

    @pytest.mark.parametrize(
        ("body", "message"),
        [
            ("credential: {bearer: '${file:absent.txt}'}\n", "cannot read secret file"),
            ("credential: {bearer: '${file:two-lines.txt}'}\n", "must hold one line of text"),
            ("credential: {bearer: '${HOOP_UNIT_CRLF}'}\n", "environment variable HOOP_UNIT_CRLF must hold one line"),
            ("credential: {bearer: sk-literal}\n", "write secrets as ${ENV_VAR} references"),
            ("credential: {bearer: '${HOOP_UNIT_SECRET}', query: k}\n", "name exactly one of: header, bearer, basic, query"),
            ("credential: {basic: {username: 'a:b', password: '${HOOP_UNIT_SECRET}'}}\n", "must not contain ':'"),
        ],
        ids=["missing-file", "multi-line-file", "crlf-in-env", "literal", "two-kinds", "colon-in-username"],
    )
    def test_credential_errors_never_show_the_secret(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, body: str, message: str
    ) -> None:
        monkeypatch.setenv("HOOP_UNIT_SECRET", "s3cr3t")
        monkeypatch.setenv("HOOP_UNIT_CRLF", "s3cr3t\r\nX-Injected: 1")
        (tmp_path / "two-lines.txt").write_text("s3cr3t\nsecond\n")

        with pytest.raises(PolicyError) as caught:
            self.route(tmp_path, "allow: {groups: [agents]}\n" + body)

        assert message in caught.value.message and "s3cr3t" not in str(caught.value)

    def test_credential_references_stay_unresolved_for_policy_check(self, tmp_path: Path) -> None:
        credential = self.route(tmp_path, "allow: {groups: [a]}\ncredential: {bearer: '${file:absent}'}\n", resolve_env=False).credential

        assert credential == Credential("Authorization", "Bearer ${file:absent}")
