"""Declared resources: a model served under ``/internal/v1/<name>/`` by one declaration.

A :class:`Resource` names the model, the serializers (output, create, update), the field
holding the organization, the operations served, the list filters, optional status
transitions and the time field lists are ordered by; :meth:`Resource.urls` gives its URL
patterns. Each gets every guarantee of the contract (DESIGN.md, "The internal API contract"),
from one implementation, by concern:

- bearer auth, the body limit and ``Idempotency-Key`` on every POST (``middleware``,
  ``idempotency``: they guard everything under ``/internal/``);
- ``X-Organization-ID`` failing closed (``contract.require_organization``: 400
  ``organization_required``, 404 for an unknown organization) and every query scoped by it
  (another organization's object is a 404); cursor lists, newest first (``contract.page``:
  ``limit`` 1 to 500, ``next_cursor``);
- versions (``versions``): every object GET, list, create, PATCH and batch answers an
  ``ETag`` (a hash of the body it answers, or of the object's ``version_field``),
  ``If-None-Match`` gives 304, a stale ``If-Match`` 412 ``precondition_failed`` (an endpoint
  that cannot honour one refuses it: ``contract.InternalView``); a write's check and the
  write run under the row's lock (``SELECT ... FOR UPDATE``; SQLite: the ``BEGIN
  IMMEDIATE`` write lock), so of two writers with the same ``If-Match`` exactly one applies;
- the declaration and what its views share (``declaration``), the views (``resource_views``)
  and ``POST <name>/batch/`` (``batch``, ``batch=True``): up to 500 creates and updates in
  one transaction, all or nothing, errors naming the item;
- ``{"error", "detail"}`` errors (``errors``) and the OpenAPI document (``schema/``).
"""

from __future__ import annotations

from django.urls import URLPattern, path

from backend.internal_api.batch import batch_view
from backend.internal_api.declaration import Declaration, Filter, Reference, Transitions
from backend.internal_api.resource_views import detail_view, list_view

# The names a team's declaration imports from here (README, "How a team adds its own").
__all__ = ["Filter", "Reference", "Resource", "Transitions"]


class Resource(Declaration):
    """One model served under ``/internal/v1/<name>/`` (module docstring): its declaration
    (:class:`~declaration.Declaration`) and its URL patterns."""

    def urls(self) -> list[URLPattern]:
        """The resource's URL patterns (``<name>/``, ``<name>/batch/``, ``<name>/<id>/``)."""
        patterns = [path(f"{self.name}/", list_view(self).as_view(), name=self.name)]
        if self.batch:
            patterns.append(
                path(f"{self.name}/batch/", batch_view(self).as_view(), name=f"{self.name}-batch")
            )
        if self.operations & {"read", "update", "delete"}:
            patterns.append(
                path(f"{self.name}/<uuid:pk>/", detail_view(self).as_view(), name=self.label)
            )
        return patterns
