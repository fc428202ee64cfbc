"""The attempt pipeline of :class:`~backend.workers.shared.api_client.InternalAPIClient`: one
logical call made of one or more HTTP attempts.

A call is prepared once (headers, JSON body, one ``Idempotency-Key`` for all the attempts of
a ``POST``, ``X-Lease-Epoch`` under a lease); each attempt goes through the backend's circuit
breaker to the process-wide pool (``_http.py``), within the call's deadline; the retry policy
(``_policy.py``) decides on another attempt, with ``Retry-After`` read from the answer. Each
attempt is logged (under the ``api_client`` logger) and measured. A call may add headers of
its own (a conditional request's ``If-Match`` / ``If-None-Match``); its :class:`Answer` holds
the decoded body, the answer's ``ETag`` and whether it was a 304.
"""

from __future__ import annotations

import json
import logging
import re
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final

from . import _http, _metrics
from ._fencing import HeldLease
from ._policy import backend_breaker, retry_policy, should_retry_read, should_retry_write
from ._resilience import check_number
from ._retry_after import parse_retry_after
from .config import WorkerConfig
from .errors import (
    APICircuitOpenError,
    APIConnectionError,
    APIResponseError,
    APITimeoutError,
    APIValidationError,
    AuthenticationError,
    ConflictError,
    InternalAPIError,
    LeaseHeldError,
    LeaseLostError,
    NotFoundError,
    PreconditionFailedError,
    RateLimitedError,
    ServerError,
    one_line,
)
from .retry_utils import CircuitBreakerOpenError

if TYPE_CHECKING:
    import httpx2

# The attempts' lines are the client's: one logger for what InternalAPIClient does.
logger = logging.getLogger("backend.workers.shared.api_client")

#: Characters of an unusable response body quoted in an ``APIResponseError``.
BODY_EXCERPT = 200
#: Longest ``X-Request-ID`` taken from the bound context.
MAX_REQUEST_ID = 200
_NO_ANSWER: Final = frozenset({"timeout", "connection_error"})  # _reason() of a lost answer
_UNSAFE_ID_CHARS = re.compile(r"[^\x21-\x7e]")
_ID_SEGMENT = re.compile(r"^(?:[0-9a-fA-F-]{32,36}|\d+)$")


def header_value(name: str, value: str) -> str:
    """``value`` when it can be sent as a header value; else a ``ValueError`` naming ``name``."""
    # httpx2 sends header values as ASCII; say which setting is wrong instead of failing each
    # call with a UnicodeEncodeError (or a protocol error for a line break).
    text = str(value)
    if not text.strip() or not text.isascii() or not text.isprintable():
        raise ValueError(f"{name} must be non-empty printable ASCII, got {text!r}")
    return text


def endpoint_template(path: str) -> str:
    """``path`` with its ids replaced by ``{id}``: a bounded metric label."""
    return "/".join("{id}" if _ID_SEGMENT.match(p) else p for p in path.split("/"))


@dataclass(frozen=True)
class Answer:
    """A call's outcome: the decoded JSON body (``None`` for none), the answer's ``ETag``
    (``None`` when it has none), and whether it was a 304 to the call's ``If-None-Match``."""

    value: Any
    etag: str | None = None
    not_modified: bool = False


@dataclass
class _Call:
    """One logical call: what every attempt sends, and what attempts have happened."""

    method: str
    path: str
    endpoint: str
    headers: dict[str, str]
    params: dict[str, Any] | None
    body: bytes | None
    timeout: float
    deadline: float
    attempts: int = 0
    last_failure: str | None = None


class Pipeline:
    """How one client's calls reach one backend URL: prepared once, attempted through the
    breaker (resolved here, once) under the retry policy of ``config``."""

    def __init__(self, config: WorkerConfig, base_url: str, user_agent: str) -> None:
        self.config = config
        self.base_url = base_url
        self.user_agent = user_agent
        # Resolved once: a second client of the same backend URL with other breaker settings
        # fails when it is created, not in the middle of a call.
        self.breaker = backend_breaker(config)

    def call(
        self,
        method: str,
        path: str,
        organization_id: str | None,
        *,
        params: dict[str, Any] | None = None,
        json_body: Any = None,
        idempotency_key: str | None = None,
        timeout: float | None = None,
        deadline: float | None = None,
        retry: bool = True,
        endpoint: str | None = None,
        lease: HeldLease | None = None,
        keyed: bool = True,
        headers: Mapping[str, str] | None = None,
    ) -> Answer:
        """Make the call, retried unless ``retry`` is false, with ``headers`` added (a
        conditional request's ``If-Match`` / ``If-None-Match``); its :class:`Answer`."""
        if timeout is not None:
            check_number("timeout", timeout, minimum=0, strict=True)
        if deadline is not None:
            check_number("deadline", deadline, minimum=0, strict=True)
        if lease is not None and lease.lost:
            raise LeaseLostError(
                f"the lease of epoch {lease.epoch} is lost (a heartbeat was refused); not sent",
                error_code="lease_lost",
                method=method,
                path=path,
            )
        config = self.config
        deadline = deadline or config.api_deadline
        extra = {name.lower(): header_value(name, value) for name, value in (headers or {}).items()}
        headers = {
            **extra,
            "authorization": f"Bearer {config.api_key()}",
            "user-agent": self.user_agent,
            "accept": "application/json",
            "x-request-id": _request_id(),
        }
        if organization_id:
            headers["x-organization-id"] = header_value("organization_id", organization_id)
        if lease is not None:
            headers["x-lease-epoch"] = str(lease.epoch)
        body: bytes | None = None
        if json_body is not None or method in ("POST", "PUT", "PATCH"):
            # NaN and infinities are not JSON: refused here, not by the backend.
            body = json.dumps(json_body, separators=(",", ":"), allow_nan=False).encode()
            headers["content-type"] = "application/json"
        if method == "POST" and (keyed or idempotency_key is not None):
            key = idempotency_key or uuid.uuid4().hex
            if len(key) > 255:
                raise ValueError("idempotency_key must be at most 255 characters")
            headers["idempotency-key"] = header_value("idempotency_key", key)
        call = _Call(
            method=method,
            path=path,
            endpoint=endpoint or endpoint_template(path),
            headers=headers,
            params=params,
            body=body,
            timeout=timeout or config.api_timeout,
            deadline=time.monotonic() + deadline,
        )
        breaker = self.breaker

        def attempt() -> Answer:
            # Everything up to the bytes on the wire happens outside the breaker: only what
            # the backend (or the network to it) does may count as its failure.
            remaining = call.deadline - time.monotonic()
            if remaining <= 0:
                raise APITimeoutError(
                    f"deadline of {deadline:g}s passed",
                    method=method,
                    path=path,
                    request_id=call.headers["x-request-id"],
                )
            pool = _http.get_pool(
                self.base_url,
                max_connections=config.api_max_connections,
                max_keepalive=config.api_max_keepalive_connections,
            )
            limit = min(call.timeout, remaining)
            request = pool.build_request(
                method, path, params=params, content=body, headers=headers, timeout=limit
            )
            try:
                return breaker.call(_send, pool, request, call, limit)
            except CircuitBreakerOpenError as exc:
                raise APICircuitOpenError(
                    exc.breaker_name,
                    exc.retry_after,
                    method=method,
                    path=path,
                    request_id=headers["x-request-id"],
                ) from None

        attempt.__qualname__ = f"InternalAPIClient {method} {call.endpoint}"
        if not retry:
            return attempt()
        retry_if = should_retry_read if method == "GET" else should_retry_write
        return retry_policy(config, retry_if=retry_if, deadline=deadline).call(attempt)


def _send(pool: httpx2.Client, request: httpx2.Request, call: _Call, limit: float) -> Answer:
    import httpx2

    call.attempts += 1
    if call.attempts > 1 and call.last_failure:
        _metrics.api_retry(call.method, call.endpoint, call.last_failure)
    request_id = call.headers["x-request-id"]
    started = time.perf_counter()
    status: int | str
    try:
        response = pool.send(request)
    except httpx2.TimeoutException as exc:
        status = "timeout"
        error: InternalAPIError = APITimeoutError(
            f"no answer within {limit:.3g}s ({type(exc).__name__})",
            method=call.method,
            path=call.path,
            request_id=request_id,
        )
    except httpx2.TransportError as exc:
        status = "connection_error"
        error = APIConnectionError(
            f"cannot reach {pool.base_url.host}:{pool.base_url.port} "
            f"({type(exc).__name__}: {one_line(str(exc), 120)})",
            method=call.method,
            path=call.path,
            request_id=request_id,
        )
    except httpx2.DecodingError as exc:
        status = "bad_response"
        error = APIResponseError(
            f"body cannot be decoded ({one_line(str(exc), 120)})",
            method=call.method,
            path=call.path,
            request_id=request_id,
        )
    else:
        status = response.status_code
        seconds = time.perf_counter() - started
        result = _result_of(response, call)
        _record(call, status, seconds, None if isinstance(result, Answer) else result)
        if isinstance(result, Answer):
            return result
        call.last_failure = _reason(result)
        raise result
    _record(call, status, time.perf_counter() - started, error)
    call.last_failure = _reason(error)
    raise error


_ERROR_BY_STATUS: dict[int, type[InternalAPIError]] = {
    400: APIValidationError,
    401: AuthenticationError,
    403: AuthenticationError,
    404: NotFoundError,
    408: APITimeoutError,
    409: ConflictError,
    412: PreconditionFailedError,
    422: APIValidationError,
    429: RateLimitedError,
}


_ERROR_BY_CODE: dict[str | None, type[InternalAPIError]] = {
    "lease_lost": LeaseLostError,
    "lease_held": LeaseHeldError,
}


def _result_of(response: httpx2.Response, call: _Call) -> Answer | InternalAPIError:
    status = response.status_code
    request_id = call.headers["x-request-id"]
    raw = response.content
    etag = response.headers.get("etag")
    if status == 404 and call.method == "DELETE" and call.last_failure in _NO_ANSWER:
        # The attempt whose answer was lost deleted it: gone is what was asked.
        return Answer(None)
    if status == 304 and "if-none-match" in call.headers:
        return Answer(None, etag, not_modified=True)
    if 200 <= status < 300:
        if status == 204 or not raw:
            return Answer(None, etag)
        try:
            return Answer(json.loads(raw), etag)
        except (ValueError, RecursionError):
            return APIResponseError(
                f"body is not JSON: {_excerpt(raw)}",
                status=status,
                method=call.method,
                path=call.path,
                request_id=request_id,
            )
    code, detail = _error_body(raw)
    if detail is None:
        detail = f"HTTP {status} {response.reason_phrase}; body {_excerpt(raw)}"
    kind = _ERROR_BY_CODE.get(code) if status == 409 else None
    kind = kind or _ERROR_BY_STATUS.get(status)
    if kind is None:
        kind = ServerError if status >= 500 else APIResponseError
    return kind(
        detail,
        status=status,
        error_code=code,
        request_id=request_id,
        method=call.method,
        path=call.path,
        retry_after=parse_retry_after(response.headers.get("retry-after")),
    )


def _excerpt(body: bytes) -> str:
    # one_line() scrubs secrets before it cuts: no part of one is left at the cut.
    return repr(one_line(body.decode("utf-8", errors="replace"), BODY_EXCERPT))


def _record(call: _Call, status: int | str, seconds: float, error: InternalAPIError | None) -> None:
    _metrics.api_request(call.method, call.endpoint, status, seconds)
    fields = {
        "method": call.method,
        "path": call.path,
        "status": status,
        "duration_ms": round(seconds * 1000, 2),
        "attempt": call.attempts,
        "request_id": call.headers["x-request-id"],
    }
    # The failure of a call is raised to its caller, whose concern it is to report it
    # (or the retry engine's, which announces each retry): INFO here, never louder.
    if error is None:
        logger.debug("internal API call", extra=fields)
    else:
        logger.info("internal API call failed: %s", error, extra=fields)


def _reason(error: InternalAPIError) -> str:
    if isinstance(error, APITimeoutError):
        return "timeout"
    if isinstance(error, APIConnectionError):
        return "connection_error"
    return str(error.status) if error.status is not None else type(error).__name__


def _error_body(raw: bytes) -> tuple[str | None, str | None]:
    try:
        data = json.loads(raw) if raw else None
    except (ValueError, RecursionError):
        return None, None
    if not isinstance(data, dict):
        return None, None
    code = data.get("error")
    detail = data.get("detail")
    return (str(code) if code is not None else None, str(detail) if detail is not None else None)


def _request_id() -> str:
    # logging_utils loads structlog: imported on the first call, not with the client.
    from .logging_utils import current_context

    context = current_context()
    for name in ("request_id", "task_id", "execution_id"):
        value = context.get(name)
        if value:
            # A header value: visible ASCII only, bounded (a bound id may hold anything).
            return _UNSAFE_ID_CHARS.sub("_", str(value))[:MAX_REQUEST_ID]
    return uuid.uuid4().hex
