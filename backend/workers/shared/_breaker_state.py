"""A circuit breaker's state machine behind one small protocol, :class:`BreakerState`.

Three implementations: :class:`LocalBreakerState` (this process, in memory, timed by an
injectable clock), ``RedisBreakerStore`` in :mod:`_breaker_store` (shared by every process
through atomic Lua scripts), and :class:`FallbackBreakerState`, a shared state that runs on a
local one while the shared one is unreachable. :mod:`_breaker` talks only to the protocol.

The transitions, the same in each: CLOSED admits every call; ``failure_threshold``
consecutive failures open it. OPEN refuses, with the seconds left; once the open period has
passed, the next call is the probe (HALF_OPEN) and holds a lease of ``probe_timeout``; the
others are refused until the lease ends. Only the probe holding the lease decides: its
success closes, its failure re-opens for 1.5 times the last open period, at most
``recovery_timeout``. A closed breaker starts again from ``initial_recovery_timeout``.
"""

from __future__ import annotations

import enum
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol, TypeVar

R = TypeVar("R")


class CircuitState(enum.StrEnum):
    """A breaker's state; the values are what metrics and health report."""

    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


#: How much longer the breaker stays open after each failed probe (up to recovery_timeout).
RECOVERY_GROWTH = 1.5
#: A call's outcome: an answer of the dependency, its failure, or neither (interrupted).
SUCCESS, FAILURE, RELEASE = "success", "failure", "release"
#: An admission's decision.
CALL, PROBE, REJECT = "call", "probe", "reject"

Change = tuple[CircuitState, CircuitState]


class StoreUnavailable(Exception):
    """The shared state could not be reached or answered with an error."""


@dataclass(frozen=True, slots=True, eq=False)
class Verdict:
    """The answer to "may I call?": the state the call met, the decision (:data:`CALL`,
    :data:`PROBE` or :data:`REJECT`), the seconds until a probe may run when refused, and
    what recording the outcome needs (a shared verdict's lease token and failure count)."""

    state: CircuitState
    decision: str
    retry_after: float = 0.0
    failures: int = 0
    token: str = ""
    shared: bool = False

    @property
    def probe(self) -> bool:
        """Whether this call is the half-open probe."""
        return self.decision == PROBE

    def tells_shared_state_nothing(self, outcome: str) -> bool:
        """Whether recording ``outcome`` of this shared call would change nothing (the common
        case then costs no second round trip)."""
        return not self.probe and (
            outcome == RELEASE or (outcome == SUCCESS and self.failures == 0)
        )


class BreakerState(Protocol):
    """Where a breaker's state lives and changes; each method is one atomic transition."""

    def admit(self) -> Verdict:
        """Decide whether a call may run now (a probe decision holds the lease)."""
        ...

    def record(self, verdict: Verdict, outcome: str) -> CircuitState | None:
        """Report the outcome of a call admitted with ``verdict``; the state after it, or
        None when it is not known without asking."""
        ...

    def snapshot(self) -> CircuitState:
        """The state a call would meet now (open past its period reads as half-open)."""
        ...

    def reset(self) -> None:
        """Close and forget failures, probe and grown open period."""
        ...


LOCAL_CALL = Verdict(CircuitState.CLOSED, CALL)  # a closed local breaker's one admission


class LocalBreakerState:
    """The state machine in this process's memory, timed by ``clock`` (seconds); thread-safe.

    ``on_change(old, new)`` is told of every transition, outside the lock.
    """

    def __init__(
        self,
        *,
        failure_threshold: int,
        recovery_timeout: float,
        initial_recovery_timeout: float,
        probe_timeout: float,
        clock: Callable[[], float],
        on_change: Callable[[CircuitState, CircuitState], object] = lambda old, new: None,
    ) -> None:
        self._threshold = failure_threshold
        self._recovery = recovery_timeout
        self._initial = initial_recovery_timeout
        self._lease = probe_timeout
        self._clock = clock
        self._on_change = on_change
        self._lock = threading.Lock()
        self.state = CircuitState.CLOSED  # read without the lock by the breaker's fast path
        self.failures = 0  # consecutive failures while closed (read the same way)
        self._opened_at = 0.0
        self._open_for = initial_recovery_timeout  # the current open period
        self._probe: Verdict | None = None  # the probe holding the lease
        self._probe_until = 0.0

    def admit(self) -> Verdict:
        """See :meth:`BreakerState.admit`."""
        change = None
        try:
            with self._lock:
                if self.state is CircuitState.CLOSED:
                    return LOCAL_CALL
                now = self._clock()
                if self.state is CircuitState.OPEN:
                    wait = self._opened_at + self._open_for - now
                    if wait > 0:
                        return Verdict(CircuitState.OPEN, REJECT, wait)
                    change = self._set(CircuitState.HALF_OPEN)
                if self._probe is not None and now < self._probe_until:
                    return Verdict(CircuitState.HALF_OPEN, REJECT, self._probe_until - now)
                self._probe = Verdict(CircuitState.HALF_OPEN, PROBE)
                self._probe_until = now + self._lease
                return self._probe
        finally:
            self._report(change)

    def record(self, verdict: Verdict, outcome: str) -> CircuitState:
        """See :meth:`BreakerState.record`."""
        change = None
        with self._lock:
            if self.state is CircuitState.HALF_OPEN:
                # Only the probe holding the lease decides; calls admitted earlier and a
                # probe whose lease ran out say nothing.
                if verdict is self._probe and self._clock() < self._probe_until:
                    self._probe = None
                    if outcome == SUCCESS:
                        change = self._close()
                    elif outcome == FAILURE:
                        self._open_for = min(self._open_for * RECOVERY_GROWTH, self._recovery)
                        change = self._set(CircuitState.OPEN)
            elif self.state is CircuitState.CLOSED:
                if outcome == SUCCESS:
                    self.failures = 0
                elif outcome == FAILURE:
                    self.failures += 1
                    if self.failures >= self._threshold:
                        self._open_for = self._initial
                        change = self._set(CircuitState.OPEN)
                        self.failures = 0
            # OPEN: a call admitted before the breaker opened says nothing new
            state = self.state
        self._report(change)
        return state

    def snapshot(self) -> CircuitState:
        """See :meth:`BreakerState.snapshot`."""
        with self._lock:
            if (
                self.state is CircuitState.OPEN
                and self._clock() - self._opened_at >= self._open_for
            ):
                return CircuitState.HALF_OPEN  # the next call will be the probe
            return self.state

    def reset(self) -> None:
        """See :meth:`BreakerState.reset`."""
        with self._lock:
            change = self._close()
            self._probe = None
        self._report(change)

    def adopt(self, observed: CircuitState) -> None:
        """Follow a state decided elsewhere (the shared state's answer), reporting a change;
        on it the local state goes on if the shared one becomes unreachable."""
        with self._lock:
            change = self._set(observed)
            if observed is CircuitState.CLOSED:
                self.failures = 0
                self._open_for = self._initial
        self._report(change)

    def start_afresh(self) -> None:
        """Keep the state, forget failures and the probe (local state taking over from a
        shared one)."""
        with self._lock:
            self.failures = 0
            self._probe = None

    def after_fork(self) -> None:
        """A fresh lock and no probe in a forked child (a lock another thread of the parent
        held at the fork would stay locked in the child, its probe would hold the lease)."""
        self._lock = threading.Lock()
        self._probe = None

    def _close(self) -> Change | None:
        """Close (lock held); the transition to report, if any."""
        self.failures = 0
        self._open_for = self._initial
        return self._set(CircuitState.CLOSED)

    def _set(self, new: CircuitState) -> Change | None:
        """Change state (lock held); the transition to report, if any."""
        old = self.state
        if old is new:
            return None
        self.state = new
        if new is CircuitState.OPEN:
            self._opened_at = self._clock()
        return old, new

    def _report(self, change: Change | None) -> None:
        if change is not None:
            self._on_change(*change)


class FallbackBreakerState:
    """A shared state, with ``local`` standing in while the shared one raises
    :class:`StoreUnavailable` (``degraded``); the shared one is tried again once per
    ``reconnect_interval`` of ``clock``.

    While the shared state answers, ``local`` follows it (so it reports the transitions, and
    carries on from the last one seen when the shared state goes away). ``on_reachable(ok,
    reason)`` is told when the shared state is lost (False, with the error) or regained.
    """

    def __init__(
        self,
        shared: BreakerState,
        local: LocalBreakerState,
        *,
        reconnect_interval: float,
        clock: Callable[[], float],
        on_reachable: Callable[[bool, BaseException | None], object] = lambda ok, why: None,
    ) -> None:
        self.shared = shared
        self.local = local
        self.degraded = False
        self._reconnect_interval = reconnect_interval
        self._clock = clock
        self._on_reachable = on_reachable
        self._lock = threading.Lock()
        self._next_reconnect = 0.0

    def admit(self) -> Verdict:
        """See :meth:`BreakerState.admit`."""
        verdict = self._ask(self.shared.admit)
        if verdict is None:
            return self.local.admit()
        self.local.adopt(verdict.state)
        return verdict

    def record(self, verdict: Verdict, outcome: str) -> CircuitState | None:
        """See :meth:`BreakerState.record`; a call admitted by the shared state reports to
        it, unless that would change nothing there."""
        if verdict.shared:
            if verdict.tells_shared_state_nothing(outcome):
                return None
            new = self._ask(self.shared.record, verdict, outcome)
            if new is not None:
                self.local.adopt(new)
                return new
        return self.local.record(verdict, outcome)

    def snapshot(self) -> CircuitState:
        """See :meth:`BreakerState.snapshot`."""
        observed = self._ask(self.shared.snapshot)
        if observed is None:
            return self.local.snapshot()
        self.local.adopt(observed)
        return observed

    def reset(self) -> None:
        """See :meth:`BreakerState.reset` (the shared state too, when it answers)."""
        self._ask(self.shared.reset)
        self.local.reset()

    def after_fork(self) -> None:
        """A fresh lock in a forked child (see :meth:`LocalBreakerState.after_fork`)."""
        self._lock = threading.Lock()
        self.local.after_fork()

    def _ask(self, operation: Callable[..., R], *args: object) -> R | None:
        """``operation(*args)`` on the shared state; None when it is unreachable (degraded
        then, and asked again only once per ``reconnect_interval``)."""
        if self.degraded:
            now = self._clock()
            with self._lock:
                if now < self._next_reconnect:
                    return None
                self._next_reconnect = now + self._reconnect_interval
        try:
            answer = operation(*args)
        except StoreUnavailable as exc:
            self._set_degraded(True, exc)
            return None
        if self.degraded:
            self._set_degraded(False)
        return answer

    def _set_degraded(self, degraded: bool, reason: BaseException | None = None) -> None:
        with self._lock:
            changed = self.degraded is not degraded
            self.degraded = degraded
            if degraded:
                self._next_reconnect = self._clock() + self._reconnect_interval
                if changed:  # local state takes over afresh
                    self.local.start_afresh()
        if changed:
            self._on_reachable(not degraded, reason)
