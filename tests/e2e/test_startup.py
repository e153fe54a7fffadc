"""Start-up fails closed: a bad policy or option makes mitmdump exit with status 1,
with a message naming the file, line and key, and never a traceback. (mitmproxy loads
`-s` scripts from a task, so its listener may be up for one event-loop turn before it
exits; a flow arriving then is refused with 503, as no policy is loaded.)"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from hoop_addon.dev.tls import CA
from tests.conftest import POLICY, write_policy
from hoop_addon.dev.gateway import Gateway
from tests.support.idp import LocalIdP

TYPO = POLICY.replace("      hosts: [localhost, 127.0.0.1]", "      hostz: [localhost, 127.0.0.1]")


def start(tmp_path: Path, idp: LocalIdP, pki: tuple[CA, Path, Path], policy: str, recordings: Path | None = None, options: dict[str, str] | None = None) -> tuple[int, str]:
    rules = write_policy(tmp_path / "rules", idp, policy)
    gateway = Gateway(rules, tmp_path, pki[0].cert_path, env={"HOOP_TEST_UPSTREAM_KEY": "k"}, recordings=recordings, options=options)
    return gateway.run_to_exit()


def assert_clean_failure(code: int, output: str, *expected: str) -> None:
    assert code == 1
    for text in expected:
        assert text in output, output
    assert "Traceback" not in output, output


def test_policy_typo_stops_startup_with_file_line_key(tmp_path: Path, idp: LocalIdP, pki: tuple[CA, Path, Path]) -> None:
    line = TYPO.splitlines().index("      hostz: [localhost, 127.0.0.1]") + 1
    code, output = start(tmp_path, idp, pki, TYPO)
    assert_clean_failure(code, output, f"policy.yaml:{line}: routes[1].match.hostz: unknown key (did you mean 'hosts'?)")


def test_unset_credential_variable_stops_startup(tmp_path: Path, idp: LocalIdP, pki: tuple[CA, Path, Path]) -> None:
    code, output = start(tmp_path, idp, pki, POLICY.replace("HOOP_TEST_UPSTREAM_KEY", "HOOP_TEST_NOT_SET"))
    assert_clean_failure(code, output, "routes[1].credential.value: environment variable HOOP_TEST_NOT_SET is not set")


def test_missing_jwks_file_stops_startup(tmp_path: Path, idp: LocalIdP, pki: tuple[CA, Path, Path]) -> None:
    code, output = start(tmp_path, idp, pki, POLICY.replace("jwks: {jwks}", "jwks: missing-jwks.json"))
    assert_clean_failure(code, output, "cannot read JWKS", "missing-jwks.json")


def test_unwritable_recordings_option_stops_startup(tmp_path: Path, idp: LocalIdP, pki: tuple[CA, Path, Path]) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    code, output = start(tmp_path, idp, pki, POLICY, recordings=blocker / "recordings")
    assert_clean_failure(code, output, "hoop_recordings: cannot create")


def test_bad_reload_interval_stops_startup(tmp_path: Path, idp: LocalIdP, pki: tuple[CA, Path, Path]) -> None:
    code, output = start(tmp_path, idp, pki, POLICY, options={"hoop_reload": "soon"})
    assert_clean_failure(code, output, "hoop_reload: 'soon' is not a number of seconds")


def test_tiny_reload_interval_stops_startup(tmp_path: Path, idp: LocalIdP, pki: tuple[CA, Path, Path]) -> None:
    """1e-9 s would make the policy watcher a busy loop: 0 (off) or 0.1..3600 only."""
    code, output = start(tmp_path, idp, pki, POLICY, options={"hoop_reload": "1e-9"})
    assert_clean_failure(code, output, "hoop_reload: '1e-9' is not a number of seconds: 0 (off) or 0.1..3600")


@pytest.mark.parametrize("policy", [POLICY, TYPO], ids=["valid", "typo"])
def test_policy_check_command(tmp_path: Path, idp: LocalIdP, policy: str) -> None:
    rules = write_policy(tmp_path / "rules", idp, policy)
    done = subprocess.run([sys.executable, "-m", "hoop_addon", "policy", "check", str(rules)], capture_output=True, text=True)
    if policy is POLICY:
        assert done.returncode == 0 and done.stdout.startswith("OK "), done.stdout
    else:
        assert done.returncode == 1
        assert "routes[1].match.hostz: unknown key (did you mean 'hosts'?)" in done.stdout
    assert "Traceback" not in done.stdout + done.stderr
