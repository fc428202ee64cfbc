"""The webhook operations of :class:`~backend.workers.shared.api_client.InternalAPIClient`:
sending a webhook from the worker (``_webhooks.py`` delivers it) and recording the delivery
with the backend, and reading the recorded deliveries (the declared resource
``webhook-deliveries``, through :class:`~._resource.Resource`).
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Iterator
from dataclasses import replace
from typing import Any, Final

from . import _redact
from ._client_base import DEFAULT_ORG, DEFAULT_PAGE_SIZE, OrgArg
from ._execution_calls import ExecutionCalls
from ._fencing import lease_of
from ._policy import retry_policy, should_retry_transient
from ._resilience import check_number
from ._resource import Resource
from .errors import InternalAPIError, WebhookError, WebhookNotRecordedError
from .models import WebhookDelivery, WebhookResult

_WEBHOOK_ID = re.compile(r"msg_[0-9a-f]{32}")
# The resource's operations (and id) as this class's methods name them (in their errors).
# (send_webhook's record is created with the organization it resolved: nothing to name.)
_LABELS: Final = {
    "id": "delivery_id",
    "get": "get_webhook_delivery",
    "list": "list_webhook_deliveries",
}


class WebhookCalls(ExecutionCalls):
    """The client's calls about webhooks (``send_webhook``, ``webhook-deliveries/``); built
    on the execution calls (a webhook of an execution reads it first)."""

    @property
    def _deliveries(self) -> Resource[WebhookDelivery]:
        """The ``webhook-deliveries`` resource, its operations named as this class's."""
        return Resource(self, "webhook-deliveries", WebhookDelivery, labels=_LABELS)

    def send_webhook(
        self,
        url: str,
        payload: Any,
        headers: dict[str, str] | None = None,
        timeout: float | None = None,
        execution_id: str | None = None,
        *,
        webhook_id: str | None = None,
        organization_id: OrgArg = DEFAULT_ORG,
    ) -> WebhookResult:
        """POST ``payload`` as JSON to ``url`` from this worker, and record the delivery.

        The URL must pass the SSRF guard (:class:`WebhookURLRefusedError` otherwise, with
        nothing sent or recorded). A redirect the guard refuses (or one too many) is recorded
        as ``blocked`` and then raised as :class:`WebhookURLRefusedError`, its ``result``
        the recorded delivery. With ``execution_id``, the execution is read first (unless this
        context holds its lease: it exists), so an unknown one is a :class:`NotFoundError`
        with nothing sent. The body is signed per
        Standard Webhooks when ``WEBHOOK_SIGNING_SECRET`` is set; 5xx, 429, timeouts and
        connection failures are retried, a 410 (or another 4xx) stops. A receiver that keeps
        failing is reported in the result (``outcome="failed"``), not raised. When the
        webhook went out but the backend would not record it, :class:`WebhookNotRecordedError`
        says so (not transient: sending again would deliver twice).

        ``webhook_id`` (``msg_`` and 32 hex digits) is the id of a webhook the backend made
        due (``execution.webhook_due.id``): it is the ``webhook-id`` the receiver sees on
        every attempt, the record carries it (the backend keeps one ``delivered`` record per
        id), and the execution is not read first (the backend knows it).
        """
        # The SSRF guard and the delivery: loaded with the first webhook, not with the client.
        from ._webhooks import AttemptFailed, check_headers, deliver, new_message_id

        if webhook_id is not None and not (
            isinstance(webhook_id, str) and _WEBHOOK_ID.fullmatch(webhook_id)
        ):
            raise ValueError(f"webhook_id must be msg_ and 32 hex digits, got {webhook_id!r}")

        org = self._require_org(organization_id, "send_webhook")
        try:
            body = json.dumps(payload, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
        except (TypeError, ValueError) as exc:
            raise WebhookError(f"webhook payload is not JSON-serialisable: {exc}") from None
        if timeout is not None:
            check_number("timeout", timeout, minimum=0, strict=True)
        check_headers(headers or {})
        if execution_id is not None and webhook_id is None and lease_of(execution_id) is None:
            # The backend refuses to record a delivery of an unknown execution: find out
            # before the webhook goes out, not after (a claimed one is known to exist).
            self.get_workflow_execution(execution_id, organization_id=org)
        message_id = webhook_id or new_message_id()
        secret = self.config.webhook_signing_secret
        extra_headers = {k.lower(): v for k, v in (headers or {}).items()}
        extra_headers.setdefault("user-agent", self._user_agent)
        if webhook_id is not None:  # signed or not, the receiver can deduplicate on it
            extra_headers["webhook-id"] = webhook_id
        report = deliver(
            url=url,
            body=body,
            headers=extra_headers,
            message_id=message_id,
            secret=secret.get_secret_value() if secret is not None else None,
            timeout=timeout or self.config.webhook_timeout,
            allowed_hosts=self.config.webhook_allowed_hosts,
            policy=retry_policy(
                self.config,
                retry_if=should_retry_transient,
                exceptions=(AttemptFailed,),
                budgeted=False,
            ),
        )
        shown_url = _redact.redact_url(url)  # a password in the URL is neither recorded nor shown
        record = {
            "url": shown_url,
            "execution_id": execution_id,
            "status_code": report.status_code,
            "attempts": report.attempts,
            "duration": round(report.duration, 6),
            "outcome": report.outcome,
            "error_message": report.error or "",
        }
        if webhook_id is not None:
            record["webhook_id"] = webhook_id
        result = WebhookResult(
            delivery_id="",
            message_id=message_id,
            url=shown_url,
            outcome=report.outcome,
            status_code=report.status_code,
            attempts=report.attempts,
            duration=report.duration,
            error=report.error,
            response_body=report.response_body,
        )
        try:
            # Fenced by the lease held on execution_id, if any (Resource.create). A due
            # webhook may be delivered again (handed to another worker): the backend keeps
            # one delivered record per webhook_id, each record its own key.
            delivery = self._deliveries.create(
                idempotency_key=uuid.uuid4().hex if webhook_id else message_id,
                organization_id=org,
                **record,
            )
        except InternalAPIError as exc:
            raise WebhookNotRecordedError(result, record, exc) from exc
        recorded = replace(result, delivery_id=delivery.id)
        if report.refused is not None:  # a redirect refused: recorded as blocked, then raised
            report.refused.result = recorded
            raise report.refused
        return recorded

    def get_webhook_delivery(
        self, delivery_id: str, *, organization_id: OrgArg = DEFAULT_ORG
    ) -> WebhookDelivery:
        """Read one recorded webhook delivery (revalidated as ``get_workflow_execution``)."""
        return self._deliveries.get(delivery_id, organization_id=organization_id)

    def list_webhook_deliveries(
        self,
        execution_id: str | None = None,
        *,
        limit: int | None = None,
        page_size: int = DEFAULT_PAGE_SIZE,
        organization_id: OrgArg = DEFAULT_ORG,
    ) -> Iterator[WebhookDelivery]:
        """Recorded deliveries newest first (of one execution when given), page by page."""
        return self._deliveries.list(
            limit,
            page_size=page_size,
            organization_id=organization_id,
            execution_id=execution_id or None,
        )
