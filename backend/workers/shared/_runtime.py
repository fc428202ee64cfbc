"""The per-process state of the worker package, held in one place: the process's runtime.

Each module declares what it keeps per process (connection pools, circuit breakers, retry
policies and budgets, statistics, open servers) once, as a :class:`Part`: how to build it and
what a forked child (Celery's prefork pool) does with it. The :class:`Runtime` builds a part on
first use and, from its one ``os.register_at_fork`` hook, runs every built part's after-fork
step in declaration order; locks that a fork must not catch held by another thread are taken
around it (:func:`hold_across_fork`). :func:`scoped` runs code on a new runtime, with some or
all parts built anew (test isolation), and puts the previous one back afterwards; a part
built from another's values ``follows`` it, and is built anew with it.

:func:`install_celery` is the one way in to the Celery wiring (``_celery``): the modules that
install it as the module README promises (``WorkerConfig.get_celery_config()``,
``WorkerLogger.configure()``, ``HealthServer.start()``) call it here and import nothing of
Celery; the package registers the wiring at import (:func:`provide_celery_wiring`).
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading
from collections.abc import Callable, Iterator
from typing import Any, Generic, TypeVar

T = TypeVar("T")


class Part(Generic[T]):
    """One kind of per-process state: ``build()`` makes it, ``after_fork(value)`` makes a
    forked child's own from the inherited one (returns the value to keep, or None to keep
    the inherited value as ``after_fork`` left it). It ``follows`` the parts it holds values
    of: a scoped runtime that builds one of those anew builds this one anew too."""

    __slots__ = ("after_fork", "build", "follows", "name")

    def __init__(
        self,
        name: str,
        build: Callable[[], T],
        after_fork: Callable[[T], T | None] | None,
        follows: tuple[Part[Any], ...] = (),
    ) -> None:
        self.name = name
        self.build = build
        self.after_fork = after_fork
        self.follows = follows

    def __repr__(self) -> str:
        return f"Part({self.name!r})"

    def get(self) -> T:
        """This part in the current runtime (built on first use)."""
        return _current.get(self)


_parts: list[Part[Any]] = []  # in declaration order: the order of the after-fork steps


def part(
    name: str,
    build: Callable[[], T],
    after_fork: Callable[[T], T | None] | None = None,
    *,
    follows: tuple[Part[Any], ...] = (),
) -> Part[T]:
    """Declare a part of the per-process state (once, at module level)."""
    if any(existing.name == name for existing in _parts):
        raise ValueError(f"part {name!r} is already declared")
    declared = Part(name, build, after_fork, follows)
    _parts.append(declared)
    return declared


def parts() -> list[str]:
    """The names of the declared parts, in the order a forked child resets them."""
    return [declared.name for declared in _parts]


class Runtime:
    """The values of the declared parts in this process. A scoped runtime (:func:`scoped`)
    holds its own parts and hands every other to the runtime it was opened in."""

    def __init__(
        self, parent: Runtime | None = None, own: frozenset[Part[Any]] | None = None
    ) -> None:
        self._values: dict[Part[Any], Any] = {}
        self._lock = threading.Lock()
        self._parent = parent
        self._own = own  # None: every part is its own

    def get(self, declared: Part[T]) -> T:
        """The value of ``declared``, built on first use."""
        try:
            return self._values[declared]
        except KeyError:
            pass
        if self._parent is not None and self._own is not None and declared not in self._own:
            return self._parent.get(declared)
        with self._lock:
            if declared not in self._values:
                self._values[declared] = declared.build()
            return self._values[declared]

    def after_fork(self) -> None:
        """In a forked child: a fresh lock, then each built part's after-fork step (and the
        same in the runtime a scoped one was opened in)."""
        self._lock = threading.Lock()
        for declared in _parts:
            if declared.after_fork is not None and declared in self._values:
                kept = declared.after_fork(self._values[declared])
                if kept is not None:
                    self._values[declared] = kept
        if self._parent is not None:
            self._parent.after_fork()


_current = Runtime()


def current() -> Runtime:
    """This process's runtime."""
    return _current


@contextlib.contextmanager
def scoped(*fresh: Part[Any]) -> Iterator[Runtime]:
    """Run the block on a new runtime, then restore the previous one. The new runtime builds
    the ``fresh`` parts anew (every part when none is named); the others stay those of the
    previous runtime (built there, when first used in the block), except those that follow
    a fresh one."""
    global _current
    previous = _current
    own = set(fresh)
    for declared in _parts:  # declaration order: a part follows parts declared before it
        if any(followed in own for followed in declared.follows):
            own.add(declared)
    scope = Runtime(previous, frozenset(own) if fresh else None)
    _current = scope
    try:
        yield scope
    finally:
        _current = previous


_celery_wiring: Callable[[], None] | None = None


def provide_celery_wiring(install: Callable[[], None]) -> None:
    """Register the function that installs the Celery wiring (the package's ``__init__``)."""
    global _celery_wiring
    _celery_wiring = install


def install_celery(*, if_imported: bool = False) -> None:
    """Install the Celery wiring in this process (idempotent); with ``if_imported``, only
    when Celery is imported already (never imports it just for this)."""
    if if_imported and "celery" not in sys.modules:
        return
    if _celery_wiring is None:
        raise RuntimeError("no Celery wiring registered: the package registers it at import")
    _celery_wiring()


_held: list[Any] = []  # locks taken before a fork and given back after it, in this order


def hold_across_fork(*locks: Any) -> None:
    """Take ``locks`` before every fork and give them back after it, in the parent and in
    the child: no other thread of the parent holds one at the fork, so the child (whose only
    thread is the forking one) inherits them free."""
    _held.extend(locks)


def _before_fork() -> None:
    for lock in _held:
        lock.acquire()


def _after_fork_in_parent() -> None:
    for lock in reversed(_held):
        lock.release()


def _after_fork_in_child() -> None:
    _after_fork_in_parent()
    _current.after_fork()


os.register_at_fork(
    before=_before_fork, after_in_parent=_after_fork_in_parent, after_in_child=_after_fork_in_child
)
