"""`hoop serve`'s own arguments: what `--reverse` accepts, and the mitmdump command line."""

from __future__ import annotations


import pytest

from hoop_addon.cli.main import parser
from hoop_addon.cli.serve import mitmdump_args


def _serve(*argv: str) -> list[str]:
    args, extra = parser().parse_known_args(["serve", *argv])
    return mitmdump_args(args, extra)


def test_reverse_listeners_sit_beside_the_forward_proxy() -> None:
    line = _serve("--reverse", "https://api.openai.com/@8091", "--reverse", "http://127.0.0.1:9000@8090")
    modes = [line[i + 1] for i, arg in enumerate(line) if arg == "--mode"]
    assert modes == ["regular", "reverse:https://api.openai.com@8091", "reverse:http://127.0.0.1:9000@8090"]
    assert "--mode" not in _serve()  # without --reverse, mitmdump's default (regular) stands


@pytest.mark.parametrize("spec", [
    "https://api.openai.com", "https://api.openai.com@", "https://api.openai.com@0", "https://api.openai.com@65536",
    "https://api.openai.com@８０９０", "ftp://h@8090", "api.openai.com@8090", "https://@8090", "https://h/v1@8090",
    "https://h?x@8090", "https://u@h@8090", "https://h#f@8090", "https://h h@8090",
])
def test_a_bad_reverse_value_is_a_usage_error(spec: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        _serve("--reverse", spec)
    assert exited.value.code == 2 and "--reverse" in capsys.readouterr().err
