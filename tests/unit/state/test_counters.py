"""Rate-limit counters in the shared store, against SQLite and a real PostgreSQL: a
limit holds across "processes" (one store object each) whose threads race; a seeded
random sequence of takes and settlements answers exactly as the in-memory counters
do; a stopped server raises `StateError`."""

from __future__ import annotations

import random
import secrets
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import psycopg
import pytest

from hoop_addon.limits.counter import Counters
from hoop_addon.state.approvals import StateError
from hoop_addon.state.counters import SharedCounters
from hoop_addon.state.sql import SQLStore
from hoop_addon.state.url import open_store
from tests.support.postgres import running_postgres

KEY = ("https://idp", "agent-7")


@pytest.fixture(params=["sqlite", "postgresql"])
def stores(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Callable[[], SQLStore]]:
    """A factory of stores on one fresh database: each call is another process."""
    if request.param == "sqlite":
        url = f"sqlite://{tmp_path / 'state.db'}"
    else:
        base = request.getfixturevalue("postgres_url")
        name = f"c_{secrets.token_hex(6)}"
        with psycopg.connect(base, autocommit=True) as conn:
            conn.execute(f"CREATE DATABASE {name}")
        url = base.rsplit("/", 1)[0] + "/" + name
    made: list[SQLStore] = []

    def make() -> SQLStore:
        made.append(store := open_store(url, lambda name: None))  # type: ignore[arg-type]
        return store

    yield make
    for store in made:
        store.close()


def test_ten_a_minute_holds_across_two_processes_racing(stores) -> None:
    processes = [SharedCounters(stores()), SharedCounters(stores())]
    passed: list[int] = []
    errors: list[BaseException] = []

    def agent(counters: SharedCounters) -> None:
        try:
            for _ in range(10):
                if not counters.take([("rpm", KEY, "requests_per_minute", 1, 10, True)])[0]:
                    passed.append(1)
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=agent, args=(processes[i % 2],)) for i in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors
    assert len(passed) == 10  # of 60 attempts, from 6 threads of 2 processes
    wait = processes[1].take([("rpm", KEY, "requests_per_minute", 1, 10, True)])[0]
    assert 0 < wait <= 60
    # a shadow limit over its count refuses nothing: the need is charged, its wait reported
    assert processes[0].take([("rpm", KEY, "requests_per_minute", 1, 10, False)])[0] > 0


def test_a_refused_need_charges_none_of_the_others(stores) -> None:
    counters = SharedCounters(stores())
    both = [("a", KEY, "tokens_per_minute", 600, 1000, True), ("b", KEY, "tokens_per_day", 600, 800, True)]
    assert counters.take(both) == [0.0, 0.0]
    waits = counters.take(both)
    assert waits[0] > 0 and waits[1] > 0
    assert counters.take([("a", KEY, "tokens_per_minute", 400, 1000, True)]) == [0.0]  # a took 600 only


def test_a_seeded_sequence_answers_as_memory_does(stores) -> None:
    """300 takes and settlements over 3 limits, 2 keys and 3 kinds, on a clock that
    moves 0-20 s a step (windows roll, slots leave them): every wait is the memory
    counters' wait."""
    rng = random.Random(20)
    now = [1_700_000_000.0]
    clock = lambda: now[0]  # noqa: E731
    memory, shared = Counters(clock), SharedCounters(stores(), clock)
    kinds = ["requests_per_minute", "tokens_per_minute", "tokens_per_day"]
    reserved: list[tuple] = []
    refused = 0
    for _ in range(300):
        now[0] += rng.choice([0, 0, 0.5, 1, 7, 20])
        if reserved and rng.random() < 0.3:
            name, key, kind, at, amount = reserved.pop(rng.randrange(len(reserved)))
            settlement = [(name, key, kind, at, amount, rng.randint(0, amount))]
            memory.settle(settlement)
            shared.settle(settlement)
            continue
        needs = [(rng.choice("xyz"), (rng.choice("pq"),), kind, rng.randint(1, 40), rng.choice([30, 100, 300]),
                  rng.random() < 0.8) for kind in rng.sample(kinds, rng.randint(1, 2))]
        expected = memory.take(needs)
        assert shared.take(needs) == pytest.approx(expected)
        if any(w and n[5] for w, n in zip(expected, needs)):
            refused += 1
        else:
            reserved += [(n[0], n[1], n[2], now[0], n[3]) for n in needs]
    assert 30 < refused < 250  # the sequence exercised both answers


def test_a_stopped_server_raises_state_error() -> None:
    with running_postgres() as server:
        store = open_store(server.url, lambda name: None)  # type: ignore[arg-type]
        counters = SharedCounters(store)  # type: ignore[arg-type]
        server.stop()
        with pytest.raises(StateError):
            counters.take([("rpm", KEY, "requests_per_minute", 1, 10, True)])
        store.close()
