"""Never an open proxy: every way in which the chain can fail to load or be unloaded
ends with the process exiting non-zero before it serves, or refusing every request;
the upstream receives nothing."""

from __future__ import annotations

import ssl
import time
from pathlib import Path

import httpx
import pytest

from hoop_addon.dev.gateway import ADDON, Gateway
from hoop_addon.dev.tls import CA
from hoop_addon.dev.upstream import FakeOpenAI
from tests.conftest import UPSTREAM_KEY, write_policy
from tests.support.agents import chat
from tests.support.idp import LocalIdP

ENV = {"HOOP_TEST_UPSTREAM_KEY": UPSTREAM_KEY}


def gateway(tmp_path: Path, idp: LocalIdP, pki: tuple[CA, Path, Path], **options: str) -> Gateway:
    return Gateway(write_policy(tmp_path / "rules", idp), tmp_path, pki[0].cert_path, env=ENV, options=options)


@pytest.mark.parametrize(
    "extra",
    [
        pytest.param(["--set", "hoop_rules={rules}"], id="an-option-given-twice"),
        pytest.param(["--set", "hoop_reload=soon"], id="an-option-value-that-does-not-parse"),
        pytest.param(["--set", "hoop_mask_max_body=huge"], id="a-size-that-does-not-parse"),
    ],
)
def test_a_chain_that_cannot_load_exits_before_serving(tmp_path: Path, idp: LocalIdP, pki: tuple[CA, Path, Path], extra: list[str]) -> None:
    gw = gateway(tmp_path, idp, pki)
    gw.argv += [arg.format(rules=gw.rules) for arg in extra]
    code, output = gw.run_to_exit()
    assert code == 1, output
    assert "hoop" in output


def test_a_chain_missing_a_stage_exits_before_serving(tmp_path: Path, idp: LocalIdP, pki: tuple[CA, Path, Path]) -> None:
    """A user's own composition that leaves out a stage (here: recording)."""
    script = tmp_path / "mine.py"
    script.write_text(ADDON.read_text().replace("Record(policy, audit), ", ""))
    gw = gateway(tmp_path, idp, pki)
    gw.argv[gw.argv.index(str(ADDON))] = str(script)
    code, output = gw.run_to_exit()
    assert code == 1 and "lacks stage(s) Record" in output, output


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
