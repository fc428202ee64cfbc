"""The Redis-shared CircuitBreaker across real processes, against the local Redis.

Every test uses its own key prefix. Redis "going away" is a real fault: a TCP proxy on
loopback in front of Redis that resets or stalls connections (Redis itself keeps running for
the other suites on this machine). The transitions themselves, the same as the local state's,
are the contract in test_breaker_state_contract.py.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import signal
import time
import uuid
from collections.abc import Iterator
from multiprocessing.synchronize import Barrier
from typing import Any

import pytest
import redis

from backend.workers.shared.retry_utils import (
    CircuitBreaker,
    CircuitBreakerOpenError,
    CircuitState,
    add_shared_state_listener,
    remove_shared_state_listener,
)
from tests.fault_server import TcpProxy

pytestmark = [pytest.mark.redis, pytest.mark.timeout(120)]

REDIS_URL = "redis://127.0.0.1:6379/0"
PROCESSES = 4
SPAWN = multiprocessing.get_context("spawn")


@pytest.fixture
def prefix() -> Iterator[str]:
    """A key prefix of this test's own; its keys are deleted afterwards."""
    value = f"test:breaker:{uuid.uuid4().hex}:"
    yield value
    client = redis.Redis.from_url(REDIS_URL)
    keys = list(client.scan_iter(match=value + "*"))
    if keys:
        client.delete(*keys)
    client.close()


def fail() -> None:
    raise ConnectionError("dependency down")


def ok() -> str:
    return "ok"


def shared(name: str, prefix: str, url: str = REDIS_URL, **kwargs: Any) -> CircuitBreaker:
    return CircuitBreaker(name, redis_url=url, key_prefix=prefix, **kwargs)


def run_members(target: Any, *args: Any) -> list[Any]:
    """Run ``target(index, *args, results)`` in PROCESSES spawned processes; their results."""
    results = SPAWN.Queue()
    members = [
        SPAWN.Process(target=target, args=(index, *args, results)) for index in range(PROCESSES)
    ]
    for member in members:
        member.start()
    collected = [results.get(timeout=60) for _ in members]
    for member in members:
        member.join(timeout=30)
        assert member.exitcode == 0
    return sorted(collected)


# --------------------------------------------------------------------------- process bodies


def member_in_turns(
    index: int, name: str, prefix: str, turn: Any, results: Any
) -> None:
    """Fail when it is this process's turn, until the shared breaker refuses."""
    breaker = shared(name, prefix, failure_threshold=5, recovery_timeout=60.0)
    executed = 0
    while True:
        while turn.value % PROCESSES != index:
            time.sleep(0.001)
        try:
            breaker.call(fail)
        except ConnectionError:
            executed += 1
        except CircuitBreakerOpenError:
            with turn.get_lock():
                turn.value += 1
            break
        with turn.get_lock():
            turn.value += 1
    results.put((index, executed, breaker.state.value, breaker.degraded))


def member_concurrent(index: int, name: str, prefix: str, barrier: Barrier, results: Any) -> None:
    """Fail as fast as possible, all processes at once, until the shared breaker refuses."""
    breaker = shared(name, prefix, failure_threshold=5, recovery_timeout=60.0)
    barrier.wait()
    executed = 0
    while True:
        try:
            breaker.call(fail)
        except ConnectionError:
            executed += 1
        except CircuitBreakerOpenError:
            break
    results.put((index, executed))


def member_probe(
    index: int, name: str, prefix: str, barrier: Barrier, rejected: Any, results: Any
) -> None:
    """Try a call at the same moment as the others; report whether it ran. A call that runs
    lasts until every other process has been rejected."""
    breaker = shared(name, prefix, failure_threshold=1, recovery_timeout=0.2, probe_timeout=30.0)

    def probe() -> None:
        deadline = time.monotonic() + 30
        while rejected.value < PROCESSES - 1 and time.monotonic() < deadline:
            time.sleep(0.005)

    barrier.wait()
    try:
        breaker.call(probe)
        outcome = "ran"
    except CircuitBreakerOpenError as exc:
        outcome = f"rejected:{exc.retry_after > 0}"
        with rejected.get_lock():
            rejected.value += 1
    barrier.wait()  # every process has its answer; the probe has finished
    results.put((outcome, breaker.state.value))


def member_dies_while_probing(name: str, prefix: str) -> None:
    breaker = shared(name, prefix, failure_threshold=1, recovery_timeout=0.1, probe_timeout=1.0)

    def die() -> None:
        os.kill(os.getpid(), signal.SIGKILL)

    breaker.call(die)


def member_through_outage(
    index: int, name: str, prefix: str, url: str, barrier: Barrier, results: Any
) -> None:
    """Call through the proxy before, during and after the parent cuts it; then fail once."""
    breaker = shared(name, prefix, url=url, failure_threshold=PROCESSES, recovery_timeout=30.0,
                     reconnect_interval=0.2)
    events: list[bool] = []
    breaker.add_shared_state_listener(lambda _, ok_: events.append(ok_))
    breaker.call(ok)
    before = breaker.degraded
    barrier.wait()  # the parent cuts the line
    barrier.wait()
    breaker.call(ok)
    during = breaker.degraded
    barrier.wait()  # the parent restores the line
    barrier.wait()
    time.sleep(0.25)  # past reconnect_interval
    breaker.call(ok)
    after = breaker.degraded
    barrier.wait()
    with contextlib.suppress(ConnectionError):
        breaker.call(fail)
    barrier.wait()  # every process has failed once: PROCESSES failures in the shared count
    results.put((index, before, during, after, events, breaker.state.value))


# --------------------------------------------------------------------------- tests


def test_threshold_counts_failures_of_the_whole_fleet(prefix: str) -> None:
    """4 processes with threshold 5, failing in turn: 5 failures in total open the breaker for
    all of them (local breakers would have needed 20)."""
    name = "fleet-turns"
    turn = SPAWN.Value("i", 0)
    results = run_members(member_in_turns, name, prefix, turn)
    assert [executed for _, executed, _, _ in results] == [2, 1, 1, 1]
    assert {state for _, _, state, _ in results} == {"open"}
    assert not any(degraded for *_, degraded in results)
    stored = redis.Redis.from_url(REDIS_URL).hget(prefix + name, "state")
    assert stored == b"open"


def test_concurrent_failures_open_after_threshold_in_total(prefix: str) -> None:
    """All at once: each process can have at most one call in flight when the breaker opens,
    so between 5 and 5 + 3 failures run in total (never 5 per process)."""
    barrier = SPAWN.Barrier(PROCESSES)
    results = run_members(member_concurrent, "fleet-concurrent", prefix, barrier)
    total = sum(executed for _, executed in results)
    assert 5 <= total <= 5 + PROCESSES - 1


def test_half_open_admits_one_probe_across_processes(prefix: str) -> None:
    name = "fleet-probe"
    opener = shared(name, prefix, failure_threshold=1, recovery_timeout=0.2, probe_timeout=30.0)
    with pytest.raises(ConnectionError):
        opener.call(fail)
    assert opener.state is CircuitState.OPEN
    time.sleep(0.25)  # past the recovery timeout (Redis' clock)
    barrier = SPAWN.Barrier(PROCESSES)
    results = run_members(member_probe, name, prefix, barrier, SPAWN.Value("i", 0))
    assert [outcome for outcome, _ in results] == ["ran"] + ["rejected:True"] * (PROCESSES - 1)
    assert {state for _, state in results} == {"closed"}
    assert opener.state is CircuitState.CLOSED


def test_probe_lease_expires_when_the_prober_dies(prefix: str) -> None:
    name = "fleet-lease"
    breaker = shared(name, prefix, failure_threshold=1, recovery_timeout=0.1, probe_timeout=1.0)
    with pytest.raises(ConnectionError):
        breaker.call(fail)
    time.sleep(0.15)
    prober = SPAWN.Process(target=member_dies_while_probing, args=(name, prefix))
    prober.start()
    prober.join(timeout=30)
    assert prober.exitcode == -signal.SIGKILL  # it died holding the probe lease
    with pytest.raises(CircuitBreakerOpenError) as caught:
        breaker.call(ok)
    assert 0 < caught.value.retry_after <= 1.0  # rejected until the dead prober's lease ends
    assert breaker.state is CircuitState.HALF_OPEN
    time.sleep(caught.value.retry_after + 0.05)
    assert breaker.call(ok) == "ok"  # this process got the probe and closed the breaker
    assert breaker.state is CircuitState.CLOSED


def test_state_is_read_from_redis(prefix: str) -> None:
    first = shared("reader", prefix, failure_threshold=2, recovery_timeout=30.0)
    client = redis.Redis.from_url(REDIS_URL)
    client.hset(prefix + "reader", mapping={"state": "open", "opened_at": int(time.time() * 1000)})
    seen: list[tuple[str, str]] = []
    first.add_listener(lambda b, old, new: seen.append((old.value, new.value)))
    assert first.state is CircuitState.OPEN
    with pytest.raises(CircuitBreakerOpenError):
        first.call(ok)
    assert seen == [("closed", "open")]  # the change made elsewhere is announced here
    first.reset()
    assert client.exists(prefix + "reader") == 0
    assert first.call(ok) == "ok"


# --------------------------------------------------------------------------- Redis going away


@pytest.fixture
def proxy() -> Iterator[TcpProxy]:
    with TcpProxy("127.0.0.1", 6379, scheme="redis") as line:
        yield line


@pytest.mark.parametrize("fault", ["reset", "stall"])
def test_falls_back_to_local_state_and_recovers(
    prefix: str, proxy: TcpProxy, fault: str
) -> None:
    name = f"outage-{fault}"
    events: list[tuple[str, bool]] = []

    def on_shared(breaker: CircuitBreaker, ok_: bool) -> None:
        events.append((breaker.name, ok_))

    add_shared_state_listener(on_shared)
    try:
        breaker = shared(
            name,
            prefix,
            url=proxy.url,
            failure_threshold=2,
            recovery_timeout=30.0,
            reconnect_interval=0.2,
        )
        assert breaker.call(ok) == "ok"
        assert (breaker.shared, breaker.degraded, breaker.shared_state_ok) == (True, False, True)

        proxy.mode = fault
        assert breaker.call(ok) == "ok"  # the call still runs, on local state
        assert breaker.degraded and not breaker.shared_state_ok
        assert events == [(name, False)]
        for _ in range(2):  # the local state machine still protects the dependency
            with pytest.raises(ConnectionError):
                breaker.call(fail)
        with pytest.raises(CircuitBreakerOpenError):
            breaker.call(ok)
        assert breaker.state is CircuitState.OPEN
        assert events == [(name, False)]  # announced once, not on every call

        proxy.mode = "forward"
        time.sleep(0.25)  # past reconnect_interval: the next call asks Redis again
        assert breaker.call(ok) == "ok"  # Redis' state (closed) is the fleet's truth again
        assert (breaker.degraded, breaker.shared_state_ok) == (False, True)
        assert events == [(name, False), (name, True)]
        assert breaker.state is CircuitState.CLOSED
    finally:
        remove_shared_state_listener(on_shared)


def test_reading_the_state_notices_that_redis_is_back(prefix: str, proxy: TcpProxy) -> None:
    """Health reads ``state`` and ``shared_state_ok`` without making calls: a read that
    reaches Redis again ends the degraded mode (and says so)."""
    breaker = shared("outage-read", prefix, url=proxy.url, reconnect_interval=0.2)
    events: list[bool] = []
    breaker.add_shared_state_listener(lambda _, ok_: events.append(ok_))
    proxy.mode = "reset"
    assert breaker.call(ok) == "ok"
    assert breaker.degraded
    proxy.mode = "forward"
    time.sleep(0.25)  # past reconnect_interval
    assert breaker.state is CircuitState.CLOSED
    assert (breaker.degraded, breaker.shared_state_ok) == (False, True)
    assert events == [False, True]


def test_fleet_degrades_and_recovers_together(prefix: str, proxy: TcpProxy) -> None:
    """4 processes reach Redis through the proxy; each falls back to local state while the
    line is cut, recovers when it returns, and then they share one failure count again."""
    barrier = SPAWN.Barrier(PROCESSES + 1)
    results = SPAWN.Queue()
    members = [
        SPAWN.Process(
            target=member_through_outage,
            args=(index, "fleet-outage", prefix, proxy.url, barrier, results),
        )
        for index in range(PROCESSES)
    ]
    for member in members:
        member.start()
    try:
        barrier.wait(timeout=60)
        proxy.mode = "reset"
        barrier.wait(timeout=60)
        barrier.wait(timeout=60)
        proxy.mode = "forward"
        for _ in range(3):
            barrier.wait(timeout=60)
        collected = sorted(results.get(timeout=60) for _ in members)
    finally:
        for member in members:
            member.join(timeout=30)
    assert [member.exitcode for member in members] == [0] * PROCESSES
    for _, before, during, after, events, state in collected:
        assert (before, during, after) == (False, True, False)
        assert events == [False, True]
        assert state == "open"  # one failure in each process opened the shared breaker


def test_executor_with_a_shared_breaker(prefix: str) -> None:
    """Retries go through the shared breaker on every attempt; once it opens, the fallback
    answers, and Redis holds the open state for every other process."""
    from backend.workers.shared.retry_utils import ResilientExecutor, set_testing

    breaker = shared("composed", prefix, failure_threshold=3, recovery_timeout=30.0)
    calls = 0

    def dependency() -> str:
        nonlocal calls
        calls += 1
        raise ConnectionError("down")

    executor = ResilientExecutor({"max_attempts": 10}, circuit_breaker=breaker,
                                 fallback=lambda exc: type(exc).__name__)
    set_testing(True)
    try:
        assert executor.execute(dependency) == "CircuitBreakerOpenError"
    finally:
        set_testing(False)
    assert calls == 3
    client = redis.Redis.from_url(REDIS_URL)
    assert client.hget(prefix + "composed", "state") == b"open"


def test_async_calls_through_a_shared_breaker(prefix: str) -> None:
    import asyncio

    breaker = shared("async-shared", prefix, failure_threshold=2, recovery_timeout=0.2)

    @breaker
    async def fetch(fail_it: bool) -> str:
        await asyncio.sleep(0)
        if fail_it:
            raise ConnectionError("down")
        return "fetched"

    async def scenario() -> list[str]:
        out = [await fetch(False)]
        for _ in range(2):
            with pytest.raises(ConnectionError):
                await fetch(True)
        with pytest.raises(CircuitBreakerOpenError) as caught:
            await fetch(False)
        await asyncio.sleep(caught.value.retry_after + 0.05)
        out.append(await fetch(False))  # the probe
        return out

    assert asyncio.run(scenario()) == ["fetched", "fetched"]
    assert breaker.state is CircuitState.CLOSED
    assert redis.Redis.from_url(REDIS_URL).hget(prefix + "async-shared", "state") == b"closed"


def test_a_cancelled_async_caller_gives_the_probe_lease_back(prefix: str) -> None:
    """A task cancelled while Redis grants it the probe must give the lease back; otherwise
    the whole fleet waits out ``probe_timeout`` with nobody probing."""
    import asyncio

    name = "async-cancelled-probe"
    breaker = shared(name, prefix, failure_threshold=1, recovery_timeout=0.05,
                     probe_timeout=60.0)
    with pytest.raises(ConnectionError):
        breaker.call(fail)
    time.sleep(0.1)
    client = redis.Redis.from_url(REDIS_URL)
    lease = prefix + name + ":probe"
    ran: list[str] = []

    async def probe() -> None:
        ran.append("probe")

    async def cancelled_while_admitted() -> None:
        # Holding the local state's lock pauses the admitting thread right after Redis
        # granted the lease (the local state then takes it to follow Redis' answer).
        with breaker._local._lock:
            task = asyncio.ensure_future(breaker.acall(probe))
            deadline = time.monotonic() + 10
            while not client.exists(lease) and time.monotonic() < deadline:
                await asyncio.sleep(0.005)
            assert client.exists(lease)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task

    asyncio.run(cancelled_while_admitted())
    assert ran == []
    deadline = time.monotonic() + 10
    while client.exists(lease) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not client.exists(lease)  # given back, not held for 60 s
    assert breaker.call(ok) == "ok"  # so this call could probe, and closed the breaker
    assert breaker.state is CircuitState.CLOSED
