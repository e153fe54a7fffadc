"""The Record stage's retention sweep when workers share a recordings directory: each
expired recording is deleted, and audited, by exactly one worker."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import orjson

from hoop_addon.stages.policy import PolicyStage
from hoop_addon.stages.record import Record


class Events:
    """Stands in for the Audit stage of worker `worker` (I, N): keeps the events."""

    def __init__(self, worker: tuple[int, int] | None) -> None:
        self.worker = worker
        self.events: list[tuple[str, dict[str, Any]]] = []

    def event(self, name: str, flow: Any = None, **fields: Any) -> dict[str, Any]:
        self.events.append((name, fields))
        return fields


def expired(directory: Path, count: int) -> set[str]:
    names = set()
    for i in range(count):
        name = f"session-{i}-p1.mitm"
        (directory / name).write_bytes(b"")
        (directory / f"session-{i}-p1.manifest.json").write_bytes(orjson.dumps(
            {"recording": name, "session": f"session-{i}", "retention": 60, "updated": "2020-01-01T00:00:00Z"}))
        names.add(name)
    return names


def sweep(directory: Path, worker: tuple[int, int] | None) -> list[str]:
    audit = Events(worker)
    stage = Record(PolicyStage(), audit)  # type: ignore[arg-type]
    stage.directory = directory
    stage.sweep(2e9)
    return [fields["recording"] for name, fields in audit.events if name == "retention_deleted"]


def test_workers_split_the_expired_recordings_between_them(tmp_path: Path) -> None:
    names = expired(tmp_path, 40)
    by_worker = [sweep(tmp_path, (i, 3)) for i in range(3)]
    deleted = [name for names_ in by_worker for name in names_]
    assert sorted(deleted) == sorted(names) and all(by_worker)  # each once, every worker took some
    assert not list(tmp_path.iterdir())


def test_a_single_gateway_sweeps_them_all(tmp_path: Path) -> None:
    names = expired(tmp_path, 5)
    assert sorted(sweep(tmp_path, None)) == sorted(names)
