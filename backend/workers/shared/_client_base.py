"""What every operation of :class:`~backend.workers.shared.api_client.InternalAPIClient`
builds on: the client's configuration and organization, its life, the call through the
attempt pipeline (``_pipeline.py``), pagination, parsing of the answers, and the checks of
the arguments the operations share.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Iterator, Mapping
from typing import Any, Final, Self, TypedDict, Unpack

from pydantic import ValidationError

from ._fencing import HeldLease
from ._pipeline import Answer, Pipeline, header_value
from .config import WorkerConfig
from .errors import APIResponseError, OrganizationRequiredError
from .models import Record, ResultModel
from .retry_utils import CircuitBreaker


class CallOptions(TypedDict, total=False):
    """The options of one call, as :meth:`Pipeline.call <._pipeline.Pipeline.call>` takes
    them (its defaults apply to those left out)."""

    params: dict[str, Any] | None
    json_body: Any
    idempotency_key: str | None
    timeout: float | None
    deadline: float | None
    retry: bool
    endpoint: str | None
    lease: HeldLease | None
    keyed: bool
    headers: Mapping[str, str] | None


#: Page size used when iterating a list endpoint (the backend allows up to 500).
DEFAULT_PAGE_SIZE = 100
MAX_PAGE_SIZE = 500


class Unset:
    """The type of :data:`DEFAULT_ORG`: no ``organization_id=`` given."""

    def __repr__(self) -> str:
        return "<default organization>"


#: The default of ``organization_id=``: the client's organization.
DEFAULT_ORG: Final = Unset()
OrgArg = str | None | Unset


class ClientBase:
    """The state and internals of an ``InternalAPIClient``; its operations are defined by
    the classes built on this one."""

    def __init__(self, config: WorkerConfig, *, organization_id: str | None = None) -> None:
        self.config = config
        self.base_url = config.internal_api_base_url + "/"
        self._organization_id = organization_id or config.organization_id
        self._user_agent = header_value(
            "WORKER_NAME/WORKER_VERSION", f"{config.worker_name}/{config.worker_version}"
        )
        if self._organization_id is not None:
            header_value("organization_id", self._organization_id)
        self._closed = False
        self._pipeline = Pipeline(config, self.base_url, self._user_agent)

    # --- lifecycle and context --------------------------------------------------------
    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        """End this client's use; the process-wide connection pool stays open for others."""
        self._closed = True

    def __repr__(self) -> str:
        return (
            f"InternalAPIClient(base_url={self.base_url!r}, "
            f"organization_id={self._organization_id!r})"
        )

    @property
    def organization_id(self) -> str | None:
        """The organization org-scoped calls use when no ``organization_id=`` is given."""
        return self._organization_id

    @property
    def breaker(self) -> CircuitBreaker:
        """The circuit breaker of this client's backend URL (shared by the whole process)."""
        return self._pipeline.breaker

    def set_organization_context(self, organization_id: str | None) -> None:
        """Use ``organization_id`` for this client's org-scoped calls (``None`` clears it)."""
        if organization_id is not None:
            header_value("organization_id", organization_id)
        self._organization_id = organization_id

    # --- internals ----------------------------------------------------------------------
    def _org(self, organization_id: OrgArg) -> str | None:
        return self._organization_id if isinstance(organization_id, Unset) else organization_id

    def _require_org(self, organization_id: OrgArg, operation: str) -> str:
        org = self._org(organization_id)
        if not org:
            raise OrganizationRequiredError(
                f"{operation} is organization-scoped but no organization is set: set "
                "ORGANIZATION_ID, call set_organization_context(), or pass organization_id="
            )
        return org

    def _org_call(
        self, method: str, path: str, organization_id: OrgArg, operation: str, **kwargs: Any
    ) -> Any:
        return self._call(method, path, self._require_org(organization_id, operation), **kwargs)

    def _paginate(
        self,
        path: str,
        params: dict[str, Any],
        model: type[ResultModel] | None,
        limit: int | None,
        page_size: int,
        org: str,
    ) -> Iterator[Any]:
        if limit is not None and limit < 0:
            raise ValueError("limit must be >= 0 or None")
        if not 1 <= page_size <= MAX_PAGE_SIZE:
            raise ValueError(f"page_size must be between 1 and {MAX_PAGE_SIZE}")

        def pages() -> Iterator[Any]:
            remaining = limit
            cursor: str | None = None
            while remaining is None or remaining > 0:
                query = dict(params)
                query["limit"] = page_size if remaining is None else min(page_size, remaining)
                if cursor:
                    query["cursor"] = cursor
                data = self._call("GET", path, org, params=query)
                if not isinstance(data, dict) or not isinstance(data.get("results"), list):
                    raise APIResponseError(
                        "list answer has no 'results' list", method="GET", path=path
                    )
                for item in data["results"]:
                    yield self._parse(model, item, "GET", path)
                    if remaining is not None:
                        remaining -= 1
                        if remaining == 0:
                            return
                following = data.get("next_cursor")
                if not following:
                    return
                if not isinstance(following, str) or following == cursor:
                    # A cursor that does not move would make this iterator endless.
                    raise APIResponseError(
                        f"list answer has an unusable next_cursor {str(following)[:80]!r}",
                        method="GET",
                        path=path,
                    )
                cursor = following

        return pages()

    def _parse(self, model: type[Any] | None, data: Any, method: str, path: str) -> Any:
        if model is None:  # a plain object of a declared resource
            if not isinstance(data, dict):
                raise APIResponseError(
                    f"response is not a JSON object ({type(data).__name__})",
                    method=method,
                    path=path,
                )
            return Record(data)
        try:
            return model.model_validate(data)
        except ValidationError as exc:
            problems = "; ".join(
                f"{'.'.join(str(p) for p in e['loc']) or 'body'}: {e['msg']}"
                for e in exc.errors()[:3]
            )
            raise APIResponseError(
                f"response is not a valid {model.__name__} ({problems})",
                method=method,
                path=path,
            ) from None

    def _call(
        self, method: str, path: str, organization_id: str | None, **options: Unpack[CallOptions]
    ) -> Any:
        """The call's parsed body (see :meth:`_exchange`)."""
        return self._exchange(method, path, organization_id, **options).value

    def _exchange(
        self, method: str, path: str, organization_id: str | None, **options: Unpack[CallOptions]
    ) -> Answer:
        """The call through the attempt pipeline, with its ETag and whether it was a 304."""
        if self._closed:
            raise RuntimeError("this InternalAPIClient is closed; open a new one")
        return self._pipeline.call(method, path, organization_id, **options)


#: Longest id sent (ids are UUIDs; a longer one would only meet the request-line limit).
MAX_ID: Final = 255
# What an id may hold: sent as it is, it is one path segment that neither the client (``.``,
# ``..``) nor the server (a ``/`` or ``%`` decoded) can turn into another path.
_ID = re.compile(r"[A-Za-z0-9_~-][A-Za-z0-9._~-]*")


def seg(value: object, what: str = "an id") -> str:
    """``value`` (a ``str`` or ``UUID``) as one path segment: ASCII letters, digits, ``-``,
    ``_``, ``~`` and ``.`` (not first), at most :data:`MAX_ID` characters; else a
    ``TypeError``/``ValueError`` naming ``what``, before anything is sent."""
    if not isinstance(value, str | uuid.UUID):
        raise TypeError(f"{what} must be a str or UUID, got {type(value).__name__}")
    text = str(value)
    if not text.strip():
        raise ValueError(f"{what} must be a non-empty string")
    if len(text) > MAX_ID:
        raise ValueError(f"{what} is at most {MAX_ID} characters, got {len(text)}")
    if not _ID.fullmatch(text):
        raise ValueError(
            f"{what} must be letters, digits, '-', '_', '~' and '.' (not first), "
            f"got {shorten(text)!r}"
        )
    return text


def shorten(text: str, keep: int = 40) -> str:
    """``text`` for an error message: its first ``keep`` characters, and how long it was."""
    return text if len(text) <= keep else f"{text[:keep]}... ({len(text)} characters)"
