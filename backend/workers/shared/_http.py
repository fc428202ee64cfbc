"""The one holder of HTTP connection pools: one ``httpx2.Client`` per process, base URL and
pool size (``API_MAX_CONNECTIONS``, ``API_MAX_KEEPALIVE_CONNECTIONS``).

Pools are created lazily on first use and shared by every ``InternalAPIClient`` of the
process, so a task that opens ``with InternalAPIClient(config)`` reuses warm connections
instead of paying a TCP (and TLS) handshake. After ``fork()`` the child forgets the pools it
inherited without closing them: closing would shut sockets the parent is still using. The
child builds its own on first use. Pools are closed at interpreter exit, or earlier by
:func:`close_all` (for example from a worker-process shutdown hook).
"""

from __future__ import annotations

import atexit
import logging
import threading
from typing import TYPE_CHECKING

from . import _runtime

if TYPE_CHECKING:
    import ssl

    import httpx2

#: Most connections one process keeps open to one backend URL (``API_MAX_CONNECTIONS``).
POOL_MAX_CONNECTIONS = 10
#: Seconds an idle pooled connection is kept (below the backend's 75 s keep-alive).
POOL_KEEPALIVE_EXPIRY = 60.0

class _Pools:
    """This process's pools, keyed by base URL and sizes, and its TLS context."""

    def __init__(self) -> None:
        self.lock = threading.RLock()  # get_pool() holds it while _new_pool() asks for TLS
        self.pools: dict[tuple[str, int, int], httpx2.Client] = {}
        self.ssl_context: ssl.SSLContext | None = None

    def after_fork(self) -> None:
        """In the child: drop (never close) the inherited pools and replace the lock, which
        another parent thread may have held at the fork. The TLS context is kept: it holds no
        connection, only settings and CA certificates."""
        self.lock = threading.RLock()
        self.pools = {}


_POOLS = _runtime.part("http pools", _Pools, _Pools.after_fork)


def get_pool(
    base_url: str,
    *,
    max_connections: int = POOL_MAX_CONNECTIONS,
    max_keepalive: int | None = None,
) -> httpx2.Client:
    """The process's pooled client for ``base_url``, created on first use: at most
    ``max_connections`` open, ``max_keepalive`` of them kept when idle (``None``: all)."""
    key = (base_url, max_connections, max_connections if max_keepalive is None else max_keepalive)
    state = _POOLS.get()
    pool = state.pools.get(key)
    if pool is not None:
        return pool
    with state.lock:
        pool = state.pools.get(key)
        if pool is None:
            pool = _new_pool(*key)
            state.pools[key] = pool
        return pool


def shared_ssl_context() -> ssl.SSLContext:
    """A verifying TLS context built once per process (loading CA certificates is slow)."""
    state = _POOLS.get()
    context = state.ssl_context
    if context is None:
        import ssl

        with state.lock:
            if state.ssl_context is None:
                state.ssl_context = ssl.create_default_context()
            context = state.ssl_context
    return context


def preload() -> None:
    """Import the transport stack (httpx2's connection pool, its HTTP/1.1 machinery and the
    IDNA codec of the first request's host name), build the TLS context and quiet httpx2's
    request lines now. Called in a prefork worker's main process before the pool forks: the
    children then share those pages (and the CA certificates) instead of each loading its own
    copy at its first request, and no process sets a logger's level after the fork
    (``Logger.setLevel`` clears the cache of every logger of the process, which copies the
    pages the fork shared)."""
    import encodings.idna  # noqa: F401  (each child imported it at its first request)

    import httpx2

    httpx2.HTTPTransport(verify=shared_ssl_context()).close()
    _quiet_httpx2_request_lines()


def pool_count() -> int:
    """How many pools this process holds now (for diagnostics and tests)."""
    return len(_POOLS.get().pools)


def close_all() -> None:
    """Close every pool of this process; the next use creates fresh ones."""
    state = _POOLS.get()
    with state.lock:
        pools = list(state.pools.values())
        state.pools.clear()
    for pool in pools:
        pool.close()


def _quiet_httpx2_request_lines() -> None:
    # httpx2 logs every request at INFO ("HTTP Request: GET <url> ..."), httpcore2 each step
    # at DEBUG; the API client logs each attempt itself (DEBUG on success, INFO on
    # failure). An explicit level set by the application is left alone.
    for name in ("httpx2", "httpcore2"):
        httpx_logger = logging.getLogger(name)
        if httpx_logger.level == logging.NOTSET:
            httpx_logger.setLevel(logging.WARNING)


def _new_pool(base_url: str, max_connections: int, max_keepalive: int) -> httpx2.Client:
    import httpx2

    _quiet_httpx2_request_lines()

    limits = httpx2.Limits(
        max_connections=max_connections,
        max_keepalive_connections=max_keepalive,
        keepalive_expiry=POOL_KEEPALIVE_EXPIRY,
    )
    # Timeouts are given per request; proxies from the environment are not consulted so the
    # worker reaches exactly the configured backend.
    return httpx2.Client(
        base_url=base_url,
        limits=limits,
        trust_env=False,
        follow_redirects=False,
        verify=shared_ssl_context(),
    )


atexit.register(close_all)
