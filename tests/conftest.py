"""Shared fixtures: a test CA and HTTPS upstream, a local IdP, and the real gateway.

Everything listens on 127.0.0.1 and is started and stopped by the tests.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from hoop_addon.dev.tls import CA, issue_server_cert, make_ca
from hoop_addon.dev.upstream import FakeOpenAI
from hoop_addon.dev.gateway import Gateway
from tests.support.idp import LocalIdP
from tests.support.postgres import binaries, running_postgres

UPSTREAM_KEY = "sk-upstream-real-key-0123456789abcdef"

POLICY = """\
version: 1
issuers:
  - name: test-idp
    issuer: {issuer}
    audience: hoop-gateway
    jwks: {jwks}
    algorithms: [RS256, ES256]
identity:
  token_sources: [authorization, proxy_password]
masking:
  - name: pii-in
    direction: request
    paths:
      - $.messages[*].content
    detectors: [email, payment_card]
  - name: pii-out
    direction: response
    paths:
      - $.choices[*].message.content
      - $.choices[*].delta.content
    detectors: [email, payment_card]
routes:
  - name: admin
    match:
      hosts: [localhost]
      paths: [/v1/admin/*]
    allow:
      groups: [admins]
  - name: llm
    match:
      hosts: [localhost, 127.0.0.1]
      paths: [/v1/*]
      methods: [POST]
    allow:
      groups: [agents]
    masking: [pii-in, pii-out]
    credential:
      header: Authorization
      value: Bearer ${{HOOP_TEST_UPSTREAM_KEY}}
  - name: remote
    match:
      hosts: [llm.remote.test]
      paths: [/v1/*]
    allow:
      groups: [agents]
    credential:
      header: Authorization
      value: Bearer ${{HOOP_TEST_UPSTREAM_KEY}}
"""


@pytest.fixture(scope="session")
def pki(tmp_path_factory: pytest.TempPathFactory) -> tuple[CA, Path, Path]:
    """The upstream's CA, and its server certificate and key for localhost/127.0.0.1."""
    directory = tmp_path_factory.mktemp("pki")
    ca = make_ca(directory)
    cert, key = issue_server_cert(ca, ["localhost", "127.0.0.1"], directory)
    return ca, cert, key


@pytest.fixture(scope="session")
def upstream_server(pki: tuple[CA, Path, Path]) -> Iterator[FakeOpenAI]:
    _, cert, key = pki
    with FakeOpenAI(cert, key) as server:
        yield server


@pytest.fixture
def upstream(upstream_server: FakeOpenAI) -> FakeOpenAI:
    """The HTTPS upstream, with its record of received requests cleared."""
    upstream_server.clear()
    return upstream_server


@pytest.fixture(scope="session")
def idp() -> Iterator[LocalIdP]:
    with LocalIdP() as provider:
        yield provider


def write_policy(directory: Path, idp: LocalIdP, text: str = POLICY) -> Path:
    """Write the test policy (trusting `idp`) as `directory/policy.yaml`."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "policy.yaml").write_text(text.format(issuer=idp.issuer, jwks=idp.jwks_url))
    return directory


@pytest.fixture(scope="session")
def gateway(tmp_path_factory: pytest.TempPathFactory, idp: LocalIdP, pki: tuple[CA, Path, Path], upstream_server: FakeOpenAI) -> Iterator[Gateway]:
    """One running gateway shared by the end-to-end tests, started as users start it:
    `hoop serve`."""
    work = tmp_path_factory.mktemp("gateway")
    rules = write_policy(work / "rules", idp)
    gw = Gateway(rules, work, pki[0].cert_path, env={"HOOP_TEST_UPSTREAM_KEY": UPSTREAM_KEY}, serve=True)
    gw.start()
    yield gw
    gw.stop()


@pytest.fixture(scope="session")
def postgres_url() -> Iterator[str]:
    """A real PostgreSQL server for the session (see `tests.support.postgres`)."""
    if binaries() is None:
        pytest.skip("PostgreSQL is not installed (apt-get install postgresql; .ci/run does it)")
    with running_postgres() as server:
        yield server.url
