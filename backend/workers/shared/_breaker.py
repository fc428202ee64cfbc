"""The circuit breaker: closed, open, half-open with one probe; local or shared through Redis.

The transitions live behind :class:`_breaker_state.BreakerState`; this module admits calls,
tells which outcomes count, announces changes and keeps the registry. Public names are
re-exported by :mod:`retry_utils`, whose docstring lists them.
"""

from __future__ import annotations

import contextvars
import inspect
import logging
import threading
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from . import _runtime
from ._breaker_state import (
    FAILURE,
    LOCAL_CALL,
    REJECT,
    RELEASE,
    SUCCESS,
    BreakerState,
    CircuitState,
    FallbackBreakerState,
    LocalBreakerState,
    Verdict,
)
from ._resilience import (
    ExceptionTypes,
    P,
    R,
    check_callable,
    check_exceptions,
    check_int,
    check_number,
    decorate,
    logger,
    notify,
    qualname,
)

if TYPE_CHECKING:
    import asyncio


class CircuitBreakerOpenError(Exception):
    """A breaker refused the call; ``retry_after`` is the seconds until a probe may run."""

    def __init__(self, name: str, retry_after: float) -> None:
        super().__init__(name, retry_after)
        self.breaker_name = name
        self.retry_after = float(retry_after)

    def __str__(self) -> str:
        return f"circuit breaker {self.breaker_name!r} is open; retry after {self.retry_after:.3f}s"


StateListener = Callable[["CircuitBreaker", CircuitState, CircuitState], object]
SharedStateListener = Callable[["CircuitBreaker", bool], object]
_state_listeners: list[StateListener] = []
_shared_state_listeners: list[SharedStateListener] = []


def add_state_listener(listener: StateListener) -> None:
    """Call ``listener(breaker, old, new)`` on every state change of every breaker."""
    check_callable("listener", listener)
    _state_listeners.append(listener)


def remove_state_listener(listener: StateListener) -> None:
    """Stop calling a listener added with :func:`add_state_listener`."""
    _state_listeners.remove(listener)


def add_shared_state_listener(listener: SharedStateListener) -> None:
    """Call ``listener(breaker, ok)`` when a Redis-shared breaker loses (False) or regains
    (True) its shared state."""
    check_callable("listener", listener)
    _shared_state_listeners.append(listener)


def remove_shared_state_listener(listener: SharedStateListener) -> None:
    """Stop calling a listener added with :func:`add_shared_state_listener`."""
    _shared_state_listeners.remove(listener)


class _Registry:
    """The breakers of this process by name, in registration order."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.breakers: dict[str, CircuitBreaker] = {}

    def after_fork(self) -> None:
        """Give a forked child (Celery's prefork pool) fresh locks and no probe in flight: a
        lock that another thread of the parent held at the moment of the fork would otherwise
        stay locked in the child, and that thread's probe would hold the lease there until it
        ran out. The breakers and their states are kept."""
        self.lock = threading.Lock()
        for breaker in self.breakers.values():
            (breaker._fallback or breaker._local).after_fork()


REGISTRY = _runtime.part("circuit breakers", _Registry, _Registry.after_fork)


class CircuitBreaker:
    """Stops calling a failing dependency, then lets one probe test it again.

    CLOSED: calls pass; ``failure_threshold`` consecutive failures open the breaker.
    OPEN: calls are refused at once with :class:`CircuitBreakerOpenError`; after the open
    period the next call becomes the probe (HALF_OPEN). The first open period is
    ``initial_recovery_timeout`` (default: ``recovery_timeout``, a fixed period); each failed
    probe makes the next one 1.5 times longer, up to ``recovery_timeout``; a closed breaker
    starts again from the first.
    HALF_OPEN: exactly one probe runs (others are refused); its success closes the breaker,
    its failure opens it again. The probe holds a lease of ``probe_timeout`` seconds
    (default: ``recovery_timeout``); a probe still running when its lease ends decides
    nothing, and another call may probe.

    An exception counts as a failure when it is an ``expected_exception`` and ``is_failure``
    (if given) returns True; any other exception passes through and counts as an answer of
    the dependency (a success). ``KeyboardInterrupt``-like exceptions count as neither.

    With ``redis_url`` the state lives in Redis under ``key_prefix + name``, shared by every
    process using the same name: transitions are atomic Lua scripts using Redis' clock, and
    the probe is an expiring lease. If Redis cannot be reached the breaker keeps working on
    local state, sets ``degraded`` (``shared_state_ok`` False), tells the shared-state
    listeners, and tries Redis again every ``reconnect_interval`` seconds.

    ``clock`` (default ``time.monotonic``) is the clock in seconds the local state's open
    periods, probe leases and reconnects are timed by; tests pass one they move themselves.

    Thread-safe; no lock is held while the wrapped function runs. Breakers register by name
    (see :func:`get_breaker`, :func:`all_breakers`); a second breaker with the same name is
    a ValueError.
    """

    def __init__(
        self,
        name: str,
        failure_threshold: int = 5,
        recovery_timeout: float = 60.0,
        expected_exception: ExceptionTypes = Exception,
        is_failure: Callable[[BaseException], bool] | None = None,
        redis_url: str | None = None,
        *,
        initial_recovery_timeout: float | None = None,
        probe_timeout: float | None = None,
        key_prefix: str = "worker:breaker:",
        reconnect_interval: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if not isinstance(name, str) or not name:
            raise ValueError(f"name must be a non-empty string, got {name!r}")
        self.name = name
        self.failure_threshold = check_int("failure_threshold", failure_threshold, minimum=1)
        self.recovery_timeout = check_number(
            "recovery_timeout", recovery_timeout, minimum=0.0, strict=True
        )
        self.initial_recovery_timeout = (
            self.recovery_timeout
            if initial_recovery_timeout is None
            else min(
                self.recovery_timeout,
                check_number(
                    "initial_recovery_timeout", initial_recovery_timeout, minimum=0.0, strict=True
                ),
            )
        )
        self.expected_exception = check_exceptions(
            "expected_exception", expected_exception, allow_empty=False
        )
        check_callable("is_failure", is_failure)
        self.is_failure = is_failure
        self.probe_timeout = (
            self.recovery_timeout
            if probe_timeout is None
            else check_number("probe_timeout", probe_timeout, minimum=0.0, strict=True)
        )
        self.reconnect_interval = check_number(
            "reconnect_interval", reconnect_interval, minimum=0.0, strict=True
        )
        if redis_url is not None and (not isinstance(redis_url, str) or not redis_url):
            raise ValueError(f"redis_url must be a non-empty string or None, got {redis_url!r}")
        self.redis_url = redis_url
        if not isinstance(key_prefix, str):
            raise ValueError(f"key_prefix must be a string, got {key_prefix!r}")
        self.key_prefix = key_prefix
        if not callable(clock):
            raise ValueError(f"clock must be a callable returning seconds, got {clock!r}")
        self.clock = clock
        self._listeners: list[StateListener] = []
        self._shared_listeners: list[SharedStateListener] = []
        self._local = LocalBreakerState(
            failure_threshold=self.failure_threshold,
            recovery_timeout=self.recovery_timeout,
            initial_recovery_timeout=self.initial_recovery_timeout,
            probe_timeout=self.probe_timeout,
            clock=clock,
            on_change=self._emit,
        )
        self._fallback: FallbackBreakerState | None = None
        self._states: BreakerState = self._local  # the one this breaker asks
        if redis_url is not None:
            from ._breaker_store import RedisBreakerStore

            self._fallback = FallbackBreakerState(
                RedisBreakerStore(
                    redis_url,
                    key_prefix + name,
                    failure_threshold=self.failure_threshold,
                    recovery_timeout=self.recovery_timeout,
                    initial_recovery_timeout=self.initial_recovery_timeout,
                    probe_timeout=self.probe_timeout,
                ),
                self._local,
                reconnect_interval=self.reconnect_interval,
                clock=clock,
                on_reachable=self._shared_state_changed,
            )
            self._states = self._fallback
        registry = REGISTRY.get()
        with registry.lock:
            if name in registry.breakers:
                raise ValueError(
                    f"name {name!r} is already a registered breaker; use get_breaker({name!r})"
                )
            registry.breakers[name] = self

    def __repr__(self) -> str:
        where = "shared" if self._fallback is not None else "local"
        return (
            f"CircuitBreaker({self.name!r}, state={self._local.state.value}, {where}, "
            f"failure_threshold={self.failure_threshold}, "
            f"recovery_timeout={self.recovery_timeout})"
        )

    # -- state and listeners

    @property
    def state(self) -> CircuitState:
        """The current state (read from Redis for a shared breaker that reaches it)."""
        return self._states.snapshot()

    @property
    def shared(self) -> bool:
        """True when the state is meant to live in Redis (``redis_url`` given)."""
        return self._fallback is not None

    @property
    def degraded(self) -> bool:
        """True while a shared breaker cannot reach Redis and runs on local state."""
        return self._fallback is not None and self._fallback.degraded

    @property
    def shared_state_ok(self) -> bool:
        """False only while a shared breaker runs on local state; health reads this."""
        return not self.degraded

    def add_listener(self, listener: StateListener) -> None:
        """Call ``listener(breaker, old, new)`` on every state change of this breaker."""
        check_callable("listener", listener)
        self._listeners.append(listener)

    def add_shared_state_listener(self, listener: SharedStateListener) -> None:
        """Call ``listener(breaker, ok)`` when this breaker loses or regains Redis."""
        check_callable("listener", listener)
        self._shared_listeners.append(listener)

    def reset(self) -> None:
        """Close the breaker and forget its failures (in Redis too, when shared)."""
        self._states.reset()

    def _emit(self, old: CircuitState, new: CircuitState) -> None:
        """Log a state change and tell the listeners (the state tells, outside its lock)."""
        level = logging.WARNING if new is CircuitState.OPEN else logging.INFO
        logger.log(
            level,
            "circuit breaker %s: %s -> %s",
            self.name,
            old.value,
            new.value,
            extra={"breaker": self.name, "old_state": old.value, "new_state": new.value},
        )
        notify(self._listeners, self, old, new)
        notify(_state_listeners, self, old, new)

    def _shared_state_changed(self, ok: bool, reason: BaseException | None) -> None:
        """Log that Redis was lost (running on local state) or regained; tell the listeners."""
        if ok:
            logger.info(
                "circuit breaker %s: shared state reachable again",
                self.name,
                extra={"breaker": self.name, "shared_state_ok": True},
            )
        else:
            logger.warning(
                "circuit breaker %s: shared state unreachable, using local state: %s",
                self.name,
                reason,
                extra={"breaker": self.name, "shared_state_ok": False},
            )
        notify(self._shared_listeners, self, ok)
        notify(_shared_state_listeners, self, ok)

    # -- admission and outcome

    def _admit(self) -> Verdict:
        """Let a call through (returning its verdict) or raise CircuitBreakerOpenError."""
        verdict = self._states.admit()
        if verdict.decision == REJECT:
            raise CircuitBreakerOpenError(self.name, verdict.retry_after)
        return verdict

    def _record(self, verdict: Verdict, outcome: str) -> None:
        self._states.record(verdict, outcome)

    def _outcome_of(self, exc: BaseException) -> str:
        if not isinstance(exc, Exception):
            return RELEASE
        if isinstance(exc, self.expected_exception) and (
            self.is_failure is None or self.is_failure(exc)
        ):
            return FAILURE
        return SUCCESS

    def call(self, fn: Callable[..., R], /, *args: Any, **kwargs: Any) -> R:
        """Call ``fn(*args, **kwargs)`` through the breaker."""
        local = self._local
        if self._fallback is None and local.state is CircuitState.CLOSED:
            verdict = LOCAL_CALL  # the success path: no lock, no allocation
        else:
            verdict = self._admit()
        try:
            result = fn(*args, **kwargs)
        except BaseException as exc:
            self._record(verdict, self._outcome_of(exc))
            raise
        if verdict is not LOCAL_CALL or local.failures:
            self._record(verdict, SUCCESS)
        return result

    async def acall(self, fn: Callable[..., Awaitable[R]], /, *args: Any, **kwargs: Any) -> R:
        """Await ``fn(*args, **kwargs)`` through the breaker (Redis is asked off the loop)."""
        import asyncio

        if self._fallback is None:
            verdict = self._admit()
        else:
            # Redis is asked in a thread (with this context, for log lines). A plain future,
            # not a task, so that nothing cancels it: if the caller is cancelled meanwhile,
            # the thread runs on and a probe lease it is granted is given back.
            admission = asyncio.get_running_loop().run_in_executor(
                None, contextvars.copy_context().run, self._admit
            )
            try:
                verdict = await asyncio.shield(admission)
            except asyncio.CancelledError:
                admission.add_done_callback(self._release_abandoned)
                raise
        try:
            result = await fn(*args, **kwargs)
        except BaseException as exc:
            await self._arecord(verdict, self._outcome_of(exc))
            raise
        await self._arecord(verdict, SUCCESS)
        return result

    def _release_abandoned(self, admission: asyncio.Future[Verdict]) -> None:
        """Give back the probe lease granted to a caller that was cancelled meanwhile (in a
        thread: this runs on the event loop, and Redis may be slow)."""
        if not admission.cancelled() and admission.exception() is None:
            verdict = admission.result()
            if verdict.probe:
                threading.Thread(target=self._record, args=(verdict, RELEASE), daemon=True).start()

    async def _arecord(self, verdict: Verdict, outcome: str) -> None:
        """:meth:`_record`, in a thread when it has to ask Redis."""
        if verdict.shared and not verdict.tells_shared_state_nothing(outcome):
            import asyncio

            await asyncio.to_thread(self._record, verdict, outcome)
        else:
            self._record(verdict, outcome)

    def __call__(self, fn: Callable[P, R]) -> Callable[P, R]:
        """Decorate ``fn`` (sync or async) so every call passes through this breaker (the
        wrapper's ``breaker``)."""
        return decorate(fn, self.call, self.acall, breaker=self)


_BREAKER_PARAMETERS = frozenset(inspect.signature(CircuitBreaker).parameters) - {"name"}


def get_breaker(name: str, **kwargs: Any) -> CircuitBreaker:
    """The registered breaker ``name``, created with ``kwargs`` if it does not exist yet.

    An existing breaker whose settings differ from a given keyword is a ValueError, so two
    parts of a program cannot silently disagree about one breaker.
    """
    registry = REGISTRY.get()
    with registry.lock:
        existing = registry.breakers.get(name)
    if existing is None:
        try:
            return CircuitBreaker(name, **kwargs)
        except ValueError:
            with registry.lock:
                existing = registry.breakers.get(name)
            if existing is None:
                raise
    for key, value in kwargs.items():
        if key not in _BREAKER_PARAMETERS:
            raise ValueError(f"unknown CircuitBreaker parameter: {key}")
        current = getattr(existing, key)
        if key == "expected_exception":
            value = check_exceptions(key, value, allow_empty=False)
        elif key == "initial_recovery_timeout":
            initial = existing.recovery_timeout if value is None else value
            value = min(
                existing.recovery_timeout, check_number(key, initial, minimum=0.0, strict=True)
            )
        elif key in ("recovery_timeout", "probe_timeout", "reconnect_interval"):
            value = check_number(key, value, minimum=0.0, strict=True)
        if current != value:
            raise ValueError(
                f"breaker {name!r} exists with {key}={current!r}; cannot get it with "
                f"{key}={value!r}"
            )
    return existing


def all_breakers() -> list[CircuitBreaker]:
    """Every registered breaker, in registration order (health and metrics read this)."""
    registry = REGISTRY.get()
    with registry.lock:
        return list(registry.breakers.values())


def circuit_breaker(
    failure_threshold: int = 5,
    recovery_timeout: float = 60.0,
    expected_exception: ExceptionTypes = Exception,
    name: str | None = None,
    *,
    is_failure: Callable[[BaseException], bool] | None = None,
    redis_url: str | None = None,
) -> Callable[[Callable[P, R]], Callable[P, R]]:
    """Decorator: calls pass through the registered breaker ``name`` (default: the function's
    module and qualified name). Functions decorated with the same name share one breaker."""
    check_int("failure_threshold", failure_threshold, minimum=1)
    check_number("recovery_timeout", recovery_timeout, minimum=0.0, strict=True)
    check_exceptions("expected_exception", expected_exception, allow_empty=False)
    check_callable("is_failure", is_failure)
    if name is not None and (not isinstance(name, str) or not name):
        raise ValueError(f"name must be a non-empty string or None, got {name!r}")

    def guard(fn: Callable[P, R]) -> Callable[P, R]:
        breaker = get_breaker(
            name or qualname(fn),
            failure_threshold=failure_threshold,
            recovery_timeout=recovery_timeout,
            expected_exception=expected_exception,
            is_failure=is_failure,
            redis_url=redis_url,
        )
        return breaker(fn)

    return guard
