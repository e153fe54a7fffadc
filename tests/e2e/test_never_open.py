"""Never an open proxy: every way in which the chain can fail to load or be unloaded
ends with the process exiting non-zero before it serves, or refusing every request;
the upstream receives nothing."""

from __future__ import annotations

import re
import ssl
import time
from pathlib import Path

import httpx
import pytest

from hoop_addon.dev.gateway import ADDON, Gateway
from hoop_addon.dev.tls import CA
from hoop_addon.dev.upstream import FakeOpenAI
from tests.conftest import POLICY, UPSTREAM_KEY, write_policy
from tests.support.agents import chat
from tests.support.idp import LocalIdP

ENV = {"HOOP_TEST_UPSTREAM_KEY": UPSTREAM_KEY}


def gateway(tmp_path: Path, idp: LocalIdP, pki: tuple[CA, Path, Path], serve: bool = False, **options: str) -> Gateway:
    return Gateway(write_policy(tmp_path / "rules", idp), tmp_path, pki[0].cert_path, env=ENV, options=options, serve=serve)


FRONT_DOORS = [pytest.param(False, id="mitmdump-s"), pytest.param(True, id="hoop-serve")]


@pytest.mark.parametrize("serve", FRONT_DOORS)
@pytest.mark.parametrize(
    "extra, says",
    [
        pytest.param(["--set", "hoop_rules={rules}"], "hoop_rules", id="an-option-given-twice"),
        pytest.param(["--set", "hoop_reload=soon"], "hoop_reload", id="an-option-value-that-does-not-parse"),
        pytest.param(["--set", "hoop_mask_max_body=huge"], "hoop_mask_max_body", id="a-size-that-does-not-parse"),
        pytest.param(["--set", "hoop_recordngs=/tmp/x"], r"unknown option\(s\) hoop_recordngs", id="a-misspelt-option"),
        # traffic relayed without an HTTP layer would pass every stage (found by attack testing)
        pytest.param(["--set", "ignore_hosts=.*"], "option ignore_hosts is set", id="hosts-passed-through"),
        pytest.param(["--set", "allow_hosts=nomatch"], "option allow_hosts is set", id="hosts-not-allowed-passed-through"),
        pytest.param(["--set", "tcp_hosts=.*"], "option tcp_hosts is set", id="hosts-relayed-as-tcp"),
        pytest.param(["--mode", "reverse:tcp://127.0.0.1:9"], "carries traffic that is not HTTP", id="a-raw-tcp-mode"),
        pytest.param(["--mode", "dns"], "carries traffic that is not HTTP", id="a-dns-mode"),
        # mitmdump refuses the same script twice, and mitmproxy two addons of one name
        # (hoop serve has the chain built in already)
        pytest.param(["-s", str(ADDON)], "Duplicate script|'chainguard' already exists", id="the-chain-loaded-twice"),
    ],
)
def test_a_chain_that_cannot_load_exits_before_serving(
    tmp_path: Path, idp: LocalIdP, pki: tuple[CA, Path, Path], extra: list[str], says: str, serve: bool
) -> None:
    gw = gateway(tmp_path, idp, pki, serve=serve)
    gw.argv += [arg.format(rules=gw.rules) for arg in extra]
    code, output = gw.run_to_exit()
    assert code == 1, output
    assert re.search(says, output) and "hoop: ready" not in output, output


@pytest.mark.parametrize(
    "script, says",
    [
        pytest.param(
            "from hoop_addon.stages.chain import build\nfrom hoop_addon.stages.sentinel import guarded\n"
            "addons = guarded([a for a in build()[1:] if type(a).__name__ != 'Record'])\n",
            "lacks stage(s) Record", id="a-stage-left-out",
        ),
        pytest.param(ADDON.read_text() + "\nimport hoop_addon.no_such_module\n", "no_such_module", id="an-import-error"),
        pytest.param(ADDON.read_text() + "\nraise RuntimeError('broken at load')\n", "broken at load", id="an-exception-at-load"),
    ],
)
def test_a_script_of_ones_own_that_breaks_the_chain_exits_before_serving(
    tmp_path: Path, idp: LocalIdP, pki: tuple[CA, Path, Path], script: str, says: str
) -> None:
    """A user's own composition (`mitmdump -s mine.py`) that leaves out a stage, or
    that raises while mitmproxy loads it (mitmproxy logs that and carries on without it)."""
    mine = tmp_path / "mine.py"
    mine.write_text(script)
    gw = gateway(tmp_path, idp, pki)
    gw.argv[gw.argv.index(str(ADDON))] = str(mine)
    code, output = gw.run_to_exit()
    assert code == 1 and says in output, output


def test_hoop_serve_that_cannot_become_ready_exits(tmp_path: Path, pki: tuple[CA, Path, Path]) -> None:
    """An issuer whose JWKS never answers: /healthz stays 503, so `hoop serve` says
    what is wrong and exits 1 instead of reporting ready."""
    policy = tmp_path / "rules" / "policy.yaml"
    policy.parent.mkdir()
    policy.write_text(POLICY.format(issuer="https://idp.invalid", jwks="http://127.0.0.1:9/jwks.json"))
    gw = Gateway(policy.parent, tmp_path, pki[0].cert_path, env=ENV, serve=True)
    gw.argv += ["--ready-timeout", "1"]
    code, output = gw.run_to_exit()
    assert code == 1 and "not ready after 1 s" in output and "JWKS never fetched" in output, output


def refused(client: httpx.Client, url: str) -> bool:
    """True when the gateway refuses the request with 503: on CONNECT (httpx raises) or
    on the request itself (`gateway_incomplete`)."""
    try:
        answer = client.post(url, json=chat("hi"))
    except httpx.ProxyError as exc:
        return "503" in str(exc)
    return answer.status_code == 503 and answer.json()["error"] == "gateway_incomplete"


def test_a_script_reload_that_fails_leaves_a_gateway_that_refuses_everything(
    tmp_path: Path, idp: LocalIdP, pki: tuple[CA, Path, Path], upstream: FakeOpenAI
) -> None:
    """The gateway runs from a script of one's own; an edit that breaks it is reloaded
    by mitmproxy, which unloads the chain: every request is then refused."""
    script = tmp_path / "gateway.py"
    script.write_text(ADDON.read_text())
    gw = gateway(tmp_path, idp, pki)
    gw.argv[gw.argv.index(str(ADDON))] = str(script)
    gw.start()
    try:
        ca = ssl.create_default_context(cafile=str(gw.ca_cert))
        with httpx.Client(proxy=gw.proxy(idp.mint(groups=["agents"])), verify=ca, trust_env=False, timeout=10) as client:
            assert client.post(f"{upstream.url}/v1/chat/completions", json=chat("hi")).status_code == 200
            script.write_text(script.read_text() + "\nraise RuntimeError('a broken edit')\n")
            deadline = time.monotonic() + 15
            while gw.output.count("Loading script") < 2 and time.monotonic() < deadline:
                time.sleep(0.1)
            time.sleep(1)  # mitmproxy has unloaded the chain and failed to load the edit
            upstream.clear()
            for _ in range(3):
                assert refused(client, f"{upstream.url}/v1/chat/completions")
        with httpx.Client(proxy=gw.proxy(), verify=ca, trust_env=False, timeout=10) as anonymous:  # no token at all
            assert refused(anonymous, f"{upstream.url}/v1/chat/completions")
        with httpx.Client(proxy=gw.proxy(), trust_env=False, timeout=10) as plain:  # plain-HTTP proxying
            assert refused(plain, f"http://127.0.0.1:{upstream.port}/v1/chat/completions")
        assert upstream.received == []
        assert "gateway_incomplete" in "".join(gw.output.splitlines()[-50:]) or "chain is not loaded" in gw.output
    finally:
        gw.stop()
