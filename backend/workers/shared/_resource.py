"""A declared resource of the internal API (``/internal/v1/<name>/``) as the client sees it:
:class:`Resource`, which ``InternalAPIClient.resource()`` returns, and the process's
conditional-GET cache its ``get`` answers from when the backend says 304.

Every declared resource serves the same contract (cursor lists with filters, create, object
GET/PATCH/DELETE, ``batch/`` where declared, ``ETag`` on every answer with a body, 304 on a
current ``If-None-Match``, 412 on a stale ``If-Match``), so one class reads and writes all of
them; a model class makes its answers typed, else they are :class:`~.models.Record` dicts.
"""

from __future__ import annotations

import builtins
import json
import re
import threading
import uuid
from collections import OrderedDict
from collections.abc import Iterator, Mapping
from enum import Enum
from typing import Any, Final, Generic, TypeVar

from . import _runtime
from ._client_base import DEFAULT_ORG, DEFAULT_PAGE_SIZE, ClientBase, OrgArg, seg, shorten
from ._fencing import HeldLease, lease_of
from ._pipeline import Answer
from .errors import APIResponseError, NotFoundError
from .models import Record, ResultModel

T = TypeVar("T", bound=ResultModel | Record)

#: Entries the conditional-GET cache of a process keeps (least recently used dropped first).
CACHE_ENTRIES: Final = 1024
#: Characters of kept bodies the cache holds at most in all (a body longer than a sixteenth of
#: it is not kept: one large object must not push out hundreds of others).
CACHE_CHARS: Final = 32 * 1024 * 1024
#: Most items one ``batch`` call sends (the backend's limit).
MAX_BATCH: Final = 500
#: Longest ``if_match`` and filter value sent (an ETag is a few dozen characters; a longer
#: value would only meet the request-line or header limit).
MAX_VALUE: Final = 1024
_NAME = re.compile(r"^[a-z][a-z0-9]*(?:-[a-z0-9]+)*$")
_FILTER = re.compile(r"^[a-z][a-z0-9_]{0,63}$")
_RESERVED = frozenset({"limit", "cursor"})
_Key = tuple[str, str, str]  # base URL, organization, object path


class _Cache:
    """The objects this process read, by backend URL, organization and path: the ETag and the
    body (as JSON text: each hit decodes a copy of its own, cheaper than ``deepcopy``) of the
    last versioned answer, at most :data:`CACHE_ENTRIES` of them and :data:`CACHE_CHARS` of
    body text in all."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.entries: OrderedDict[_Key, tuple[str, str]] = OrderedDict()
        self.chars = 0

    def get(self, key: _Key) -> tuple[str, str] | None:
        with self.lock:
            entry = self.entries.get(key)
            if entry is not None:
                self.entries.move_to_end(key)
            return entry

    def put(self, key: _Key, etag: str, data: str) -> None:
        with self.lock:
            self._drop(key)
            if len(data) > CACHE_CHARS // 16:
                return  # too large to keep: the next get reads it whole
            self.entries[key] = (etag, data)
            self.chars += len(data)
            while len(self.entries) > CACHE_ENTRIES or self.chars > CACHE_CHARS:
                _, (_, dropped) = self.entries.popitem(last=False)
                self.chars -= len(dropped)

    def forget(self, key: _Key) -> None:
        with self.lock:
            self._drop(key)

    def _drop(self, key: _Key) -> None:
        entry = self.entries.pop(key, None)
        if entry is not None:
            self.chars -= len(entry[1])


# A forked child starts empty (and with a lock no parent thread can hold).
_CACHE = _runtime.part("conditional GET cache", _Cache, lambda _inherited: _Cache())


def cached_entries() -> int:
    """How many objects the process's conditional-GET cache holds now."""
    state = _CACHE.get()
    with state.lock:
        return len(state.entries)


class Resource(Generic[T]):
    """The declared resource ``name`` reached through ``client``: each call is organization-
    scoped (``organization_id=`` as everywhere in the client) and returns ``model`` instances,
    or :class:`~.models.Record` dicts when no model was given. Objects answered by ``get``,
    ``create`` and ``update`` carry their ``etag`` for an ``If-Match``.

    ``labels`` name its operations in the errors it raises before sending (``{"get":
    "get_workflow_execution"}`` for the client's own methods built on it); an operation not
    named there is ``<name>.<operation>``; ``"id"`` names the id argument (``object_id``
    when not given)."""

    def __init__(
        self,
        client: ClientBase,
        name: str,
        model: type[ResultModel] | None,
        *,
        labels: Mapping[str, str] | None = None,
    ) -> None:
        if not isinstance(name, str) or not _NAME.match(name):
            raise ValueError(f"a resource name is lowercase words joined by '-', got {name!r}")
        if model is not None and not (isinstance(model, type) and issubclass(model, ResultModel)):
            raise TypeError(f"model must be a ResultModel subclass or None, got {model!r}")
        self.client = client
        self.name = name
        self.model = model
        self.labels: Mapping[str, str] = labels or {}

    def __repr__(self) -> str:
        model = self.model.__name__ if self.model else "Record"
        return f"Resource({self.name!r}, model={model})"

    def get(self, object_id: str | uuid.UUID, *, organization_id: OrgArg = DEFAULT_ORG) -> T:
        """Read one object (:class:`NotFoundError` when unknown or another organization's).
        A copy read before is revalidated with ``If-None-Match``: a 304 answers from it."""
        org = self._org(organization_id, "get")
        path = self._object_path(object_id)
        cache, key = _CACHE.get(), self._key(org, path)
        cached = cache.get(key)
        headers = {"If-None-Match": cached[0]} if cached else None
        try:
            answer = self.client._exchange(
                "GET", path, org, endpoint=self._object_endpoint, headers=headers
            )
        except NotFoundError:
            cache.forget(key)  # deleted meanwhile: its kept copy is of no more use
            raise
        if answer.not_modified and cached:
            kept = json.loads(cached[1])
            return self._one(kept, "GET", self._object_endpoint, answer.etag or cached[0])
        return self._remember(org, path, answer, "GET", self._object_endpoint)

    def list(
        self,
        limit: int | None = None,
        *,
        page_size: int = DEFAULT_PAGE_SIZE,
        organization_id: OrgArg = DEFAULT_ORG,
        **filters: str | int | bool | uuid.UUID | Enum | None,
    ) -> Iterator[T]:
        """The objects newest first, page by page as the iterator is consumed; ``filters``
        are the resource's query parameters (``None`` ones are left out). ``limit`` caps how
        many are yielded, ``page_size`` (1-500) is what each page asks for."""
        org = self._org(organization_id, "list")
        params = {name: _filter_value(name, value) for name, value in filters.items()}
        if isinstance(page_size, bool) or not isinstance(page_size, int):
            raise TypeError(f"page_size must be an int, got {page_size!r}")
        if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int)):
            raise TypeError(f"limit must be an int or None, got {limit!r}")
        return self.client._paginate(
            f"{self.name}/",
            {name: value for name, value in params.items() if value is not None},
            self.model,
            limit,
            page_size,
            org,
        )

    def create(
        self,
        *,
        idempotency_key: str | None = None,
        organization_id: OrgArg = DEFAULT_ORG,
        **fields: Any,
    ) -> T:
        """Create one object from ``fields``; retries reuse one ``Idempotency-Key``
        (``idempotency_key``, or a fresh one), so a retried create makes one object."""
        org = self._org(organization_id, "create")
        path = f"{self.name}/"
        answer = self.client._exchange(
            "POST",
            path,
            org,
            json_body=_body(fields, "create"),
            idempotency_key=idempotency_key,
            lease=_held_for([fields], None),
        )
        return self._remember(org, None, answer, "POST", path)

    def update(
        self,
        object_id: str | uuid.UUID,
        *,
        if_match: str | None = None,
        for_execution: str | uuid.UUID | None = None,
        organization_id: OrgArg = DEFAULT_ORG,
        **fields: Any,
    ) -> T:
        """Change ``fields`` of one object. With ``if_match`` (an ``etag``) only while the
        object is still that version: else :class:`PreconditionFailedError`, nothing changed.
        ``for_execution``: the object belongs to that execution (a file of it), and the lease
        this context holds on it fences the write; an execution's own update is fenced by
        its lease without it."""
        if not fields:
            raise ValueError(f"{self._label('update')} needs at least one field to change")
        org = self._org(organization_id, "update")
        path = self._object_path(object_id)
        owner = _execution(for_execution) or str(object_id)
        answer = self.client._exchange(
            "PATCH",
            path,
            org,
            json_body=_body(fields, "update"),
            endpoint=self._object_endpoint,
            lease=lease_of(owner),
            headers=_if_match(if_match),
        )
        return self._remember(org, path, answer, "PATCH", self._object_endpoint)

    def delete(
        self,
        object_id: str | uuid.UUID,
        *,
        if_match: str | None = None,
        for_execution: str | uuid.UUID | None = None,
        organization_id: OrgArg = DEFAULT_ORG,
    ) -> None:
        """Delete one object (with ``if_match``, only while it is still that version;
        ``for_execution`` as for :meth:`update`)."""
        org = self._org(organization_id, "delete")
        path = self._object_path(object_id)
        headers = _if_match(if_match)
        lease = lease_of(_execution(for_execution))
        _CACHE.get().forget(self._key(org, path))
        self.client._exchange(
            "DELETE", path, org, endpoint=self._object_endpoint, headers=headers, lease=lease
        )

    def forget(self, object_id: str | uuid.UUID, *, organization_id: OrgArg = DEFAULT_ORG) -> None:
        """Drop the copy of one object this process keeps, after a change made by a call
        that is not this resource's (a lifecycle ``POST``, a generic ``patch``): the next
        ``get`` reads it in full instead of sending an ``If-None-Match`` known to be stale."""
        org = self._org(organization_id, "forget")
        _CACHE.get().forget(self._key(org, self._object_path(object_id)))

    def batch(
        self,
        items: builtins.list[dict[str, Any]],
        *,
        idempotency_key: str | None = None,
        for_execution: str | uuid.UUID | None = None,
        organization_id: OrgArg = DEFAULT_ORG,
    ) -> builtins.list[T]:
        """Apply up to 500 creates (no ``id``) and updates (``id`` and the fields to change)
        in one transaction, all or nothing (``POST <name>/batch/``, for resources declared
        with it; another answers :class:`NotFoundError`). The objects as stored, in order.
        ``for_execution``: every item is a file of that execution (an item naming another
        ``execution_id`` is a ``ValueError``), and the lease this context holds on it fences
        the batch; without it, only a batch whose items all name the held execution is."""
        if not isinstance(items, list) or not all(isinstance(item, dict) for item in items):
            raise TypeError("items must be a list of dicts")
        if len(items) > MAX_BATCH:
            raise ValueError(f"a batch holds at most {MAX_BATCH} items, got {len(items)}")
        org = self._org(organization_id, "batch")
        if not items:
            return []
        paths = [
            self._object_path(item["id"], f"items[{index}]['id']")
            for index, item in enumerate(items)
            if "id" in item
        ]
        body = [_body(item, f"items[{index}]") for index, item in enumerate(items)]
        lease = _held_for(items, _execution(for_execution))
        cache = _CACHE.get()
        for kept in paths:
            cache.forget(self._key(org, kept))
        path = f"{self.name}/batch/"
        data = self.client._exchange(
            "POST",
            path,
            org,
            json_body={"items": body},
            idempotency_key=idempotency_key,
            lease=lease,
        ).value
        results = data.get("results") if isinstance(data, dict) else None
        if not isinstance(results, list) or len(results) != len(items):
            raise APIResponseError(
                f"batch answer has no 'results' list of {len(items)}", method="POST", path=path
            )
        return [self._one(result, "POST", path, None) for result in results]

    # --- internals ----------------------------------------------------------------------
    @property
    def _object_endpoint(self) -> str:
        return f"{self.name}/{{id}}/"

    def _label(self, operation: str) -> str:
        return self.labels.get(operation) or f"{self.name}.{operation}"

    def _org(self, organization_id: OrgArg, operation: str) -> str:
        return self.client._require_org(organization_id, self._label(operation))

    def _key(self, org: str, path: str) -> _Key:
        return (self.client.base_url, org, path)

    def _object_path(self, object_id: object, what: str | None = None) -> str:
        return f"{self.name}/{seg(object_id, what or self.labels.get('id', 'object_id'))}/"

    def _one(self, data: Any, method: str, endpoint: str, etag: str | None) -> T:
        """``data``, answered to ``method`` on ``endpoint``, as the resource's model."""
        parsed: T = self.client._parse(self.model, data, method, endpoint)
        parsed.stamped(etag)
        return parsed

    def _remember(
        self, org: str, kept: str | None, answer: Answer, method: str, endpoint: str
    ) -> T:
        """The object ``answer`` (to ``method`` on ``endpoint``) holds, kept with its ETag
        for a later ``get`` of ``kept`` (else of its own id's) by ``org`` once it parsed (an
        error or a bad body never is)."""
        data, etag = answer.value, answer.etag
        parsed = self._one(data, method, endpoint, etag)
        if kept is None and isinstance(data, dict) and isinstance(data.get("id"), str):
            kept = self._object_path(data["id"])
        if kept is not None:
            key = self._key(org, kept)
            if etag:
                _CACHE.get().put(key, etag, json.dumps(data))
            else:  # an unversioned answer: what was kept is no longer known to be current
                _CACHE.get().forget(key)
        return parsed


def _held_for(bodies: builtins.list[dict[str, Any]], owner: str | None) -> HeldLease | None:
    """The lease that fences a write of ``bodies``: the one this context holds on ``owner``
    (the execution the caller says they belong to: a body naming another ``execution_id``
    is a ``ValueError``), else on the execution that every body names (``execution_id``);
    ``None`` when the context holds neither (a batch mixing executions, or id-only items
    without ``owner``, is not fenced: the backend would fence each by its own execution)."""
    named = [str(body["execution_id"]) if body.get("execution_id") else None for body in bodies]
    if owner is not None:
        other = next((name for name in named if name is not None and name != owner), None)
        if other is not None:
            raise ValueError(f"for_execution is {owner!r} but an item names execution_id {other!r}")
        return lease_of(owner)
    first = named[0]
    return lease_of(first) if first is not None and named.count(first) == len(named) else None


def _execution(for_execution: object) -> str | None:
    """The execution id ``for_execution`` names (``None``: none named)."""
    if for_execution is None:
        return None
    return seg(for_execution, "for_execution")


def _body(fields: dict[str, Any], where: str) -> dict[str, Any]:
    """``fields`` as sent: a ``UUID`` value as its text (as filters send it)."""
    body = {}
    for name, value in fields.items():
        if not isinstance(name, str):
            raise TypeError(f"{where}: a field name must be a str, got {name!r}")
        body[name] = str(value) if isinstance(value, uuid.UUID) else value
    return body


# An entity tag (RFC 9110), weak or strong, or ``*``: visible ASCII between the quotes.
_ETAG = re.compile(r'\*|(?:W/)?"[\x21\x23-\x7e]*"')


def _if_match(etag: str | None) -> dict[str, str] | None:
    if etag is None:
        return None
    if not isinstance(etag, str):
        raise TypeError(f"if_match must be an etag (str), got {type(etag).__name__}")
    if len(etag) > MAX_VALUE:
        raise ValueError(f"if_match is at most {MAX_VALUE} characters, got {shorten(etag)!r}")
    if not _ETAG.fullmatch(etag):
        raise ValueError(f'if_match must be an ETag ("...", W/"..." or *), got {shorten(etag)!r}')
    return {"If-Match": etag}


def _filter_value(name: str, value: object) -> str | None:
    if name in _RESERVED or not _FILTER.match(name):
        raise ValueError(f"{name!r} is not a filter name (limit and cursor are set by list)")
    if value is None:
        return None
    if isinstance(value, Enum):
        value = value.value
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str | int | uuid.UUID):
        text = str(value)
        if len(text) > MAX_VALUE:
            raise ValueError(
                f"filter {name} is at most {MAX_VALUE} characters, got {shorten(text)!r}"
            )
        return text
    raise TypeError(f"filter {name} must be a str, int, bool or UUID, got {type(value).__name__}")
