"""Hot reload: a changed policy is validated and swapped in without a restart; a broken
one is refused with file:line:key and the policy in force keeps enforcing."""

from __future__ import annotations

import ssl
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest

from hoop_addon.dev.gateway import Gateway
from hoop_addon.dev.tls import CA
from hoop_addon.dev.upstream import FakeOpenAI
from tests.conftest import UPSTREAM_KEY, write_policy
from tests.support.idp import LocalIdP


@pytest.fixture
def reloading_gateway(tmp_path: Path, idp: LocalIdP, pki: tuple[CA, Path, Path]) -> Iterator[Gateway]:
    rules = write_policy(tmp_path / "rules", idp)
    gateway = Gateway(rules, tmp_path, pki[0].cert_path, env={"HOOP_TEST_UPSTREAM_KEY": UPSTREAM_KEY}, options={"hoop_reload": "0.1"})
    yield gateway.start()
    gateway.stop()


def eventually(check: Callable[[], bool], timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def client(gateway: Gateway, token: str) -> httpx.Client:
    """An agent's client with `token` as its proxy password."""
    return httpx.Client(proxy=gateway.proxy(token), verify=ssl.create_default_context(cafile=str(gateway.ca_cert)), trust_env=False)


def chat_status(c: httpx.Client, upstream: FakeOpenAI) -> int:
    return c.post(f"{upstream.url}/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}]}).status_code


def fresh_status(gateway: Gateway, token: str, upstream: FakeOpenAI) -> int:
    """The status of one chat request on a new connection (a new tunnel)."""
    with client(gateway, token) as c:
        return chat_status(c, upstream)


def test_policy_change_applies_and_broken_policy_is_refused(reloading_gateway: Gateway, upstream: FakeOpenAI, idp: LocalIdP) -> None:
    gateway = reloading_gateway
    policy_file = gateway.rules / "policy.yaml"
    token = idp.mint(groups=["agents"])

    def status() -> int:
        return fresh_status(gateway, token, upstream)

    assert status() == 200
    # Admit only `admins` on the llm route: agents are now refused, without a restart.
    text = policy_file.read_text()
    policy_file.write_text(text.replace("      groups: [agents]", "      groups: [admins]"))
    assert eventually(lambda: status() == 403), gateway.output
    forwarded = len(upstream.received)
    loaded = [e["policy_hash"] for e in gateway.audit(events=("policy_loaded",))]
    assert len(loaded) == 2 and loaded[0] != loaded[1]  # start-up, then the reload

    # A typo is refused with file:line:key; the policy in force (admins only) stays.
    broken = policy_file.read_text().replace("      paths: [/v1/*]", "      pathz: [/v1/*]")
    line = broken.splitlines().index("      pathz: [/v1/*]") + 1
    policy_file.write_text(broken)
    assert eventually(lambda: "policy reload refused" in gateway.output), gateway.output
    assert f"policy.yaml:{line}: routes[1].match.pathz: unknown key (did you mean 'paths'?)" in gateway.output
    assert status() == 403
    assert len(upstream.received) == forwarded  # nothing passed once agents were refused


def test_value_not_fitting_its_tag_is_refused_and_a_later_save_still_applies(reloading_gateway: Gateway, upstream: FakeOpenAI, idp: LocalIdP) -> None:
    """`!!int abc` made the YAML constructor raise ValueError, which used to end the
    watcher: this save is refused with file:line:key, and the next valid one applies."""
    gateway = reloading_gateway
    policy_file = gateway.rules / "policy.yaml"
    token = idp.mint(groups=["agents"])

    def status() -> int:
        return fresh_status(gateway, token, upstream)

    assert status() == 200
    text = policy_file.read_text()
    broken = text + "defaults:\n  max_pending: !!int abc\n"
    line = len(broken.splitlines())
    policy_file.write_text(broken)
    assert eventually(lambda: "policy reload refused" in gateway.output), gateway.output
    assert f"policy.yaml:{line}: defaults.max_pending: invalid int value 'abc'" in gateway.output
    assert "Traceback" not in gateway.output
    assert status() == 200  # the policy in force keeps enforcing

    policy_file.write_text(text.replace("      groups: [agents]", "      groups: [admins]"))
    assert eventually(lambda: status() == 403), gateway.output


def test_open_tunnel_is_verified_again_under_a_new_policy(reloading_gateway: Gateway, upstream: FakeOpenAI, idp: LocalIdP) -> None:
    """A CONNECT tunnel's identity is not grandfathered: when a reload stops trusting
    its token (here: another audience), the next request in the same tunnel is refused."""
    gateway = reloading_gateway
    with client(gateway, idp.mint(groups=["agents"])) as c:
        def status() -> int:
            return chat_status(c, upstream)

        assert status() == 200
        policy_file = gateway.rules / "policy.yaml"
        policy_file.write_text(policy_file.read_text().replace("audience: hoop-gateway", "audience: another-gateway"))
        assert eventually(lambda: status() == 407), gateway.output
