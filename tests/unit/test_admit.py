"""Route matching sees only canonical paths: what an upstream would normalise into
another path is refused before any route glob is matched against it."""

import pytest

from hoop_addon.stages.admit import canonical_path


@pytest.mark.parametrize("path", ["/", "*", "/v1/chat/completions", "/v1/", "/v1/a%20b", "/files/report.v2.json"])
def test_canonical_paths_pass(path: str) -> None:
    assert canonical_path(path)


@pytest.mark.parametrize(
    "path",
    ["/v1/files/../chat/completions", "/v1//chat", "/v1/./chat", "/v1/..", "/v1/%63hat", "/v1%2Fchat", "/v1%5cchat", "/v1/x%2E%2E", "v1/chat"],
)
def test_paths_an_upstream_would_normalise_are_refused(path: str) -> None:
    assert not canonical_path(path)
