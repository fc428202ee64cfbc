"""The exceptions of the internal API client and of webhook delivery.

The hierarchy is drawn in :mod:`backend.workers.shared.api_client`, which re-exports every
class, as the package does. This module imports nothing of the client (no ``httpx2``), so the
webhook module can raise them, and a caller catch them, without loading it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar

from . import _redact
from .retry_utils import CircuitBreakerOpenError

if TYPE_CHECKING:
    from .models import WebhookResult

#: Longest ``detail`` kept in an exception (the backend's text, or a body excerpt).
MAX_DETAIL = 300


def one_line(text: str, limit: int = MAX_DETAIL) -> str:
    """``text`` on one line, configured secrets masked (before the cut, so no part of one is
    left), whitespace collapsed, cut to ``limit`` characters. Every error text goes through it."""
    flat = " ".join(_redact.scrub(text).split())
    return flat if len(flat) <= limit else flat[: limit - 3] + "..."


def is_transient(exc: BaseException) -> bool:
    """True when trying the work again later may succeed: an open circuit breaker, or an
    exception whose ``transient`` attribute is ``True`` (the client's transient errors)."""
    return isinstance(exc, CircuitBreakerOpenError) or getattr(exc, "transient", False) is True


class InternalAPIError(Exception):
    """A call to the internal API failed; the base of every error the client raises.

    ``status`` is the HTTP status (``None`` when no response arrived), ``error_code`` and
    ``detail`` come from the backend's error body, ``request_id`` is the ``X-Request-ID`` the
    call carried, ``method`` and ``path`` say which call, and ``retry_after`` (seconds) is
    the server's ``Retry-After`` when it sent one. ``transient`` tells whether trying again
    later may succeed.
    """

    transient: ClassVar[bool] = False

    def __init__(
        self,
        detail: str,
        *,
        status: int | None = None,
        error_code: str | None = None,
        request_id: str | None = None,
        method: str | None = None,
        path: str | None = None,
        retry_after: float | None = None,
    ) -> None:
        self.detail = one_line(detail)
        self.status = status
        self.error_code = error_code
        self.request_id = request_id
        self.method = method
        self.path = path
        self.retry_after = retry_after
        # Not super(): in APICircuitOpenError the next class is CircuitBreakerOpenError,
        # whose constructor takes other arguments; every attribute is set above.
        Exception.__init__(self, self.detail)

    def __reduce__(self) -> tuple[Any, ...]:
        # Keyword-only constructor: pickle (Celery's prefork pool) restores the attributes.
        return (_restore, (type(self), self.detail, dict(self.__dict__)))

    def __str__(self) -> str:
        head = " ".join(str(part) for part in (self.status, self.error_code) if part is not None)
        where = " ".join(part for part in (self.method, self.path) if part)
        context = ", ".join(
            part
            for part in (where, f"request {self.request_id}" if self.request_id else "")
            if part
        )
        text = f"{head}: {self.detail}" if head else self.detail
        return f"{text} ({context})" if context else text

    def __repr__(self) -> str:
        return f"{type(self).__name__}({str(self)!r})"


def _restore(cls: type[InternalAPIError], detail: str, state: dict[str, Any]) -> InternalAPIError:
    error = cls.__new__(cls)
    Exception.__init__(error, detail)
    error.__dict__.update(state)
    return error


class OrganizationRequiredError(InternalAPIError, ValueError):
    """An organization-scoped call was made with no organization; nothing was sent."""


class AuthenticationError(InternalAPIError):
    """The backend refused the credentials (401) or the permission (403)."""


class NotFoundError(InternalAPIError):
    """The object does not exist, or belongs to another organization (404)."""


class ConflictError(InternalAPIError):
    """The request conflicts with the object's state (409), e.g. an illegal transition."""


class PreconditionFailedError(InternalAPIError):
    """The object changed since the version named by ``If-Match`` (412 ``precondition_failed``):
    nothing was applied; read it again (its new ``etag``) and decide anew. Not transient."""


class LeaseLostError(ConflictError):
    """The task's lease on the execution is gone (409 ``lease_lost``): another worker claimed
    it, or the reaper took it back. Nothing was applied; the new holder owns the execution,
    so this task must stop writing about it. Not transient: trying again cannot succeed."""


class LeaseHeldError(ConflictError):
    """Another worker holds a live lease on the execution (409 ``lease_held``);
    ``retry_after`` is the seconds until that lease runs out (the server's ``Retry-After``)."""


class APIValidationError(InternalAPIError):
    """The backend rejected the input (400 or 422); ``detail`` names the problem."""


class RateLimitedError(InternalAPIError):
    """The backend is shedding load (429); ``retry_after`` says when to come back."""

    transient = True


class ServerError(InternalAPIError):
    """The backend failed (5xx)."""

    transient = True


class APIResponseError(InternalAPIError):
    """The backend answered something this client cannot use: an unexpected status, or a
    body that is not the JSON promised (``detail`` holds a short excerpt)."""


class APITimeoutError(InternalAPIError):
    """No answer within the timeout (connect, read, write or pool wait, or a 408)."""

    transient = True


class APIConnectionError(InternalAPIError):
    """The backend could not be reached, or dropped the connection before answering."""

    transient = True


# retry_after is Optional on the base and always set here, which mypy cannot reconcile.
class APICircuitOpenError(InternalAPIError, CircuitBreakerOpenError):  # type: ignore[misc]
    """The backend's circuit breaker is open: the call was not sent. Never retried by the
    client itself; ``retry_after`` is the time until the breaker lets a probe through."""

    transient = True

    def __init__(
        self,
        breaker_name: str,
        retry_after: float,
        *,
        method: str,
        path: str,
        request_id: str | None,
    ) -> None:
        InternalAPIError.__init__(
            self,
            f"circuit breaker {breaker_name!r} is open; next probe in {retry_after:.1f}s",
            method=method,
            path=path,
            request_id=request_id,
            retry_after=retry_after,
        )
        self.breaker_name = breaker_name


class WebhookError(Exception):
    """A webhook could not be sent as asked (not a failure of the receiver, which is reported
    in the returned ``WebhookResult``)."""


class WebhookURLRefusedError(WebhookError, ValueError):
    """The SSRF guard refused the webhook URL (or a redirect target); nothing was sent to it.
    The message names the URL's host and the reason. A refused first URL is not recorded; a
    refused redirect is recorded as ``blocked``, and ``result`` is that recorded delivery."""

    result: WebhookResult | None = None


class WebhookNotRecordedError(InternalAPIError, WebhookError):
    """The webhook went out, but recording the delivery with the backend failed.

    Not transient: sending again would deliver twice. ``result`` is what the delivery did
    (its ``delivery_id`` is empty), ``record`` the body to record it later, idempotently,
    with ``client.post("webhook-deliveries/", error.record,
    idempotency_key=error.result.message_id)``. The recording's error is ``__cause__``; its
    status, code, request id, method and path are copied here.
    """

    def __init__(
        self, result: WebhookResult, record: dict[str, Any], cause: InternalAPIError
    ) -> None:
        answered = f"status {result.status_code}" if result.status_code else "no answer"
        InternalAPIError.__init__(
            self,
            f"webhook {result.message_id} was {result.outcome} ({answered}, "
            f"{result.attempts} attempt(s)) but recording it failed: {cause.detail}; "
            "do not send it again",
            status=cause.status,
            error_code=cause.error_code,
            request_id=cause.request_id,
            method=cause.method,
            path=cause.path,
        )
        self.result = result
        self.record = record
