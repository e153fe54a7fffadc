"""`hoop serve`'s own arguments: what `--reverse` and `--workers` accept, the mitmdump
command line, and each worker's command line."""

from __future__ import annotations


import pytest

from hoop_addon.cli.main import main, parser
from hoop_addon.cli.serve import mitmdump_args
from hoop_addon.cli.workers import set_option, worker_argv


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


def _workers(*argv: str) -> tuple[object, list[str]]:
    return parser().parse_known_args(["serve", "--workers", "2", *argv])


def test_each_worker_runs_serve_with_its_place_and_the_default_shared_store(tmp_path) -> None:
    args, extra = _workers("--home", str(tmp_path), "--reverse", "http://127.0.0.1:9000@8090", "--set", "hoop_reload=0")
    line = worker_argv(args, extra, 1)
    assert line[line.index("--worker") + 1] == "1/2" and line[line.index("--home") + 1] == str(tmp_path)
    assert line[line.index("--reverse") + 1] == "http://127.0.0.1:9000@8090"
    assert f"hoop_state=sqlite:///{tmp_path.resolve() / 'state.db'}" in line and line[-2:] == ["--set", "hoop_reload=0"]
    worker_args, worker_extra = parser().parse_known_args(line[3:])  # it parses as `hoop serve`
    assert worker_args.worker == (1, 2) and "--set" in mitmdump_args(worker_args, worker_extra)
    assert "hoop_worker=1/2" in mitmdump_args(worker_args, worker_extra)
    given = worker_argv(*_workers("--set=hoop_state=postgresql://db/hoop"), 0)
    assert not any(a.startswith("hoop_state=sqlite") for a in given)  # a store given is kept


@pytest.mark.parametrize("argv, says", [
    (["--set", "hoop_state=memory"], "hoop_state=memory"),
    (["--set=hoop_state=memory"], "hoop_state=memory"),
    (["--set", "hoop_audit_log=/tmp/a.jsonl"], "hoop_audit_log"),
    (["--control", ""], "--control"),
    (["--listen-port", "0"], "--listen-port"),
    (["--control", "127.0.0.1:8079", "--listen-port", "8080"], "overlap"),
])
def test_what_workers_cannot_run_with_is_a_usage_error(argv: list[str], says: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["serve", "--workers", "2", *argv]) == 2
    assert says in capsys.readouterr().err


@pytest.mark.parametrize("argv", [["--workers", "0"], ["--workers", "65"], ["--workers", "two"], ["--worker", "2/2"],
                                  ["--worker", "1"], ["--worker", "-1/2"]])
def test_a_bad_workers_value_is_a_usage_error(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        _serve(*argv)
    assert exited.value.code == 2 and argv[0] in capsys.readouterr().err


def test_set_option_reads_both_spellings_the_last_winning() -> None:
    assert set_option(["--set", "a=1", "--set=a=2", "--set", "b=3"], "a") == "2"
    assert set_option(["--set", "ab=1", "--set"], "a") is None
