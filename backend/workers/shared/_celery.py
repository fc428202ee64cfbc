"""Celery signal wiring for observability; :func:`install` connects it once per process.

It runs automatically when a worker follows the module README's Quick Start: from
``WorkerConfig.get_celery_config()``, from ``WorkerLogger.configure()`` and from
``HealthServer.start()`` (the last two when Celery is imported), each through
``_runtime.install_celery``: they import nothing of this module, which is built on them
(configuration, logging, client). What it connects:

- ``celeryd_init`` and ``setup_logging``: Celery leaves the root logger, its handlers and
  ``sys.stdout`` alone (our handler stays the only one); if nothing configured logging yet,
  it is configured from ``LOG_LEVEL``/``LOG_FORMAT``/``WORKER_NAME`` (``--loglevel`` when
  given) before Celery's first start-up warning.
- ``celeryd_after_setup``: in ``structured`` format the ASCII banner becomes one JSON line;
  ``print`` output is redirected into the log when ``worker_redirect_stdouts`` is on.
- ``worker_init`` / ``worker_ready`` / ``worker_shutdown`` (main process): the run directory,
  prometheus-client multiprocess mode (cleaned before the pool forks), consumer state; and,
  before a prefork pool forks, the modules every task uses imported once and the heap frozen
  (``gc.freeze()``), so the children share those pages instead of copying them.
- Celery's shutdown messages (``worker: Warm shutdown (MainProcess)``, ``Hitting Ctrl+C
  again ...``), written raw to the terminal by its signal handlers, become log lines in the
  ``structured`` format.
- ``worker_process_init`` / ``worker_process_shutdown`` (prefork child): heartbeat thread,
  last heartbeat, dead child's live gauges dropped.
- ``task_prerun`` / ``task_postrun``: ``task_id``, ``task_name``, and ``execution_id`` /
  ``organization_id`` when the task receives them, bound to the log context for the task
  (any pool: prefork, threads, solo); task count and duration recorded, and the outcome of
  each finished task (the exception type of a failed one, and whether it is transient) for
  the ``worker_process`` check and ``/readyz``. A task that takes no ``organization_id``
  argument (the Quick Start's ``my_task(self, execution_id)``) is not handed the
  ``organization_id`` keyword that the backend's dispatch adds to every message.
"""

from __future__ import annotations

import inspect
import logging
import sys
import threading
import time
from collections.abc import Mapping
from contextvars import Token
from typing import Any

from . import _heartbeat, _metrics, _redact, _runtime, _stats
from .errors import is_transient

TASK_ARGUMENTS = ("execution_id", "organization_id")
_UID = "backend.workers.shared._celery."

log = logging.getLogger(__name__)


class _Wiring:
    """What the wiring knows in this process: whether its handlers are connected, the tasks
    running (their log context and start), and what each task's signature takes."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.installed = False
        self.running: dict[str, tuple[Token[Mapping[str, Any]], Mapping[str, Any], float]] = {}
        self.positional: dict[str, tuple[str, ...]] = {}
        self.takes_organization: dict[str, bool] = {}

    def after_fork(self) -> None:
        """A forked child keeps the connected handlers and the signatures read; the tasks
        running in the parent are not its own."""
        self.lock = threading.Lock()
        self.running = {}


_WIRING = _runtime.part("celery wiring", _Wiring, _Wiring.after_fork)


def install() -> None:
    """Connect the observability signal handlers (idempotent, cheap after the first call)."""
    wiring = _WIRING.get()
    if wiring.installed:
        return
    with wiring.lock:
        if wiring.installed:
            return
        from celery import signals

        handlers = {
            signals.celeryd_init: _on_celeryd_init,
            signals.setup_logging: _on_setup_logging,
            signals.celeryd_after_setup: _on_after_setup,
            signals.worker_init: _on_worker_init,
            signals.worker_ready: _on_worker_ready,
            signals.worker_shutdown: _on_worker_shutdown,
            signals.worker_process_init: _on_child_init,
            signals.worker_process_shutdown: _on_child_shutdown,
            signals.task_prerun: _on_task_prerun,
            signals.task_postrun: _on_task_postrun,
        }
        for signal, handler in handlers.items():
            signal.connect(handler, weak=False, dispatch_uid=_UID + handler.__name__)
        _route_shutdown_messages()
        if _runs_worker_command():
            _heartbeat.expect_worker()
        wiring.installed = True
    _metrics.subscribe_resilience()


def _click_context() -> Any:
    """The click context of the running ``celery`` command in this thread (None outside it;
    click is never imported just for this)."""
    click = sys.modules.get("click")
    return click.get_current_context(silent=True) if click is not None else None


def _runs_worker_command() -> bool:
    """True when this process runs ``celery worker``, read from click's context: the
    ``celery`` command imports the app (``-A``) with its subcommand already chosen."""
    context = _click_context()
    if context is None:
        return False
    root = context.find_root()
    return root.command.name == "celery" and root.invoked_subcommand == "worker"


# --- logging --------------------------------------------------------------------------


def _configure_if_needed(loglevel: Any) -> None:
    """Configure logging from the environment unless done already; an explicit
    ``--loglevel`` wins over ``LOG_LEVEL``, Celery's default for it (WARNING) does not."""
    from . import config, logging_utils

    if logging_utils.WorkerLogger.is_configured():
        return
    level, log_format = config.logging_settings()
    explicit = not _loglevel_defaulted()
    if explicit and isinstance(loglevel, int) and loglevel:
        level = logging.getLevelName(loglevel)
    elif explicit and isinstance(loglevel, str) and loglevel.strip():
        level = loglevel.strip().upper()
    logging_utils.WorkerLogger.configure(log_level=level, log_format=log_format)


def _loglevel_defaulted() -> bool:
    """True when the running ``celery worker`` command was given no ``--loglevel`` (click
    says where the value came from); False outside the command (a program's own value)."""
    context = _click_context()
    if context is None or "loglevel" not in context.params:
        return False
    source = context.get_parameter_source("loglevel")
    return source is not None and source.name == "DEFAULT"


def _on_celeryd_init(options: Any = None, **_: Any) -> None:
    # The first worker signal: Celery's own start-up warnings come right after it.
    _configure_if_needed((options or {}).get("loglevel"))


def _on_setup_logging(loglevel: Any = None, **_: Any) -> None:
    _configure_if_needed(loglevel)


def _on_after_setup(sender: Any = None, instance: Any = None, **_: Any) -> None:
    if instance is None:
        return
    from . import logging_utils

    if logging_utils.WorkerLogger.settings()["log_format"] == "structured":
        instance.quiet = True  # the banner is printed raw: log it as one JSON line instead
        app = instance.app
        pool = getattr(instance, "pool_cls", None)
        log.info(
            "celery worker %s starting",
            sender,
            extra={
                "hostname": str(sender),
                "app": app.main,
                "pool": getattr(pool, "__module__", str(pool)).rsplit(".", 1)[-1],
                "concurrency": instance.concurrency,
                "queues": sorted(app.amqp.queues.keys()),
                "broker": _redact.redact_url(str(app.conf.broker_url)),
                "tasks": sorted(n for n in app.tasks if not n.startswith("celery.")),
            },
        )
    if getattr(instance, "redirect_stdouts", False):
        # Celery skips this when a setup_logging handler exists; print() joins the log.
        instance.app.log.redirect_stdouts(instance.redirect_stdouts_level)


# --- worker and children ------------------------------------------------------------


def _on_worker_init(sender: Any = None, **_: Any) -> None:
    _heartbeat.start_main(sender)
    if _forks_a_pool(sender):
        _share_with_pool()


def _forks_a_pool(worker: Any) -> bool:
    pool = getattr(worker, "pool_cls", None)  # still the name here, or a class
    name = pool if isinstance(pool, str) else getattr(pool, "__module__", "")
    return name in ("prefork", "processes") or name.endswith(".prefork")


def _share_with_pool() -> None:
    """In the main process, before the pool forks: make the children share memory.

    The modules every task uses (the API client, httpx2 and its transport stack,
    prometheus-client) are imported, and the TLS context and the API models' validators are
    built, once here instead of once per child, and ``gc.freeze()`` moves the heap out of the
    collector's reach: a child's collections would otherwise write to every object header
    and copy the pages the fork shared (about a third of an idle worker's memory, see
    ``benchmarks/bench_worker.py``).
    """
    import gc

    import prometheus_client  # noqa: F401

    from . import (
        _http,
        api_client,  # noqa: F401
    )

    _http.preload()
    _build_models()
    gc.freeze()


def _build_models() -> None:
    """Build the validators of the client's models now, once for every process: they are
    deferred at import (``defer_build``), and built after the fork each process would build
    its own, writing to pages the fork shared (about 1.3 MiB per process)."""
    from . import models

    for name in models.__all__:
        rebuild = getattr(getattr(models, name), "model_rebuild", None)
        if rebuild is not None:
            rebuild()


def _on_worker_ready(**_: Any) -> None:
    _heartbeat.set_ready(True)


def _on_worker_shutdown(**_: Any) -> None:
    log.info("celery worker shutting down")
    _heartbeat.stop_main()


def _on_child_init(**_: Any) -> None:
    _heartbeat.start_child()


def _on_child_shutdown(**_: Any) -> None:
    _heartbeat.child_exiting()


def _route_shutdown_messages() -> None:
    """Celery's signal handlers write their messages with ``safe_say`` straight to the
    terminal; in the ``structured`` format they become log lines instead."""
    from celery.apps import worker as celery_worker

    raw = celery_worker.safe_say
    if getattr(raw, "_worker_logged", False):
        return

    def say(msg: str, *args: Any, **kwargs: Any) -> None:
        from . import logging_utils

        if logging_utils.WorkerLogger.settings()["log_format"] != "structured":
            raw(msg, *args, **kwargs)
            return
        logging.getLogger(celery_worker.__name__).warning(str(msg).strip())

    say._worker_logged = True  # type: ignore[attr-defined]
    celery_worker.safe_say = say


# --- tasks ----------------------------------------------------------------------------


def _failure(outcome: str, retval: Any) -> tuple[str | None, bool]:
    """The exception type a finished task failed with (None when it succeeded), and whether
    that exception is transient (see :func:`errors.is_transient`)."""
    if outcome != "failure":
        return None, False
    if not isinstance(retval, BaseException):
        return "FAILURE", False
    return type(retval).__name__, is_transient(retval)


def _positional_names(task: Any) -> tuple[str, ...]:
    cache = _WIRING.get().positional
    names = cache.get(task.name)
    if names is None:
        try:
            params = inspect.signature(task.run).parameters.values()
        except (TypeError, ValueError):
            params = []  # type: ignore[assignment]
        ordered = []
        for param in params:
            if param.kind not in (param.POSITIONAL_ONLY, param.POSITIONAL_OR_KEYWORD):
                break
            ordered.append(param.name)
        names = cache[task.name] = tuple(ordered)
    return names


def _takes_org_id(task: Any) -> bool:
    """Whether the task's function accepts an ``organization_id`` keyword (True when its
    signature cannot be read: then nothing is dropped)."""
    cache = _WIRING.get().takes_organization
    known = cache.get(task.name)
    if known is None:
        try:
            params = inspect.signature(task.run).parameters.values()
        except (TypeError, ValueError):
            known = True
        else:
            known = any(
                p.kind is p.VAR_KEYWORD
                or (p.name == "organization_id" and p.kind is not p.POSITIONAL_ONLY)
                for p in params
            )
        cache[task.name] = known
    return known


def task_fields(task: Any, args: Any, kwargs: Any) -> dict[str, Any]:
    """The log fields of a task run: id and name are added by the caller; arguments here."""
    found: dict[str, Any] = {}
    if isinstance(kwargs, Mapping):
        for key in TASK_ARGUMENTS:
            if key in kwargs and kwargs[key] is not None:
                found[key] = kwargs[key]
    if len(found) < len(TASK_ARGUMENTS) and args:
        for name, value in zip(_positional_names(task), args, strict=False):
            if name in TASK_ARGUMENTS and name not in found and value is not None:
                found[name] = value
    return {k: v if isinstance(v, str | int) else str(v) for k, v in found.items()}


def _on_task_prerun(
    task_id: str | None = None, task: Any = None, args: Any = None, kwargs: Any = None, **_: Any
) -> None:
    if task is None or task_id is None:
        return
    from . import logging_utils

    if isinstance(kwargs, dict) and "organization_id" in kwargs and not _takes_org_id(task):
        # Celery calls the task with this very dict: the keyword is dropped for it, and the
        # organization still comes from ORGANIZATION_ID, as the task expects.
        kwargs.pop("organization_id")
    fields = {"task_id": task_id, "task_name": task.name, **task_fields(task, args, kwargs)}
    token, previous = logging_utils.bind_context(fields)
    _WIRING.get().running[task_id] = (token, previous, time.perf_counter())


def _on_task_postrun(
    task_id: str | None = None,
    task: Any = None,
    state: str | None = None,
    retval: Any = None,
    **_: Any,
) -> None:
    entry = _WIRING.get().running.pop(task_id, None) if task_id is not None else None
    if entry is None or task is None:
        return
    token, previous, started = entry
    seconds = time.perf_counter() - started
    outcome = (state or "unknown").lower()
    _metrics.task_finished(task.name, outcome, seconds)
    if outcome in ("success", "failure"):  # finished (a re-queued task counts when it ends)
        _stats.recent().record(task.name, *_failure(outcome, retval))
    _heartbeat.task_done()
    from . import logging_utils

    logging_utils.restore_context(token, previous)
