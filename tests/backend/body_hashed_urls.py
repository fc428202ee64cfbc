"""A URL configuration for tests: the API plus ``files-by-body/``, file executions declared
without a ``version_field`` (their ETag the hash of the body), served by the generic create,
PATCH and batch of ``resources`` (no creator or updater of their own)."""

from __future__ import annotations

from django.urls import include, path

from backend.internal_api.models import FileExecution
from backend.internal_api.resources import Resource
from backend.internal_api.serializers import (
    FileExecutionCreateSerializer,
    FileExecutionSerializer,
    FileExecutionUpdateSerializer,
)

FILES_BY_BODY = Resource(
    name="files-by-body",
    model=FileExecution,
    serializer=FileExecutionSerializer,
    label="file",
    create_serializer=FileExecutionCreateSerializer,
    update_serializer=FileExecutionUpdateSerializer,
    batch=True,
)

urlpatterns = [
    path("internal/v1/", include([*FILES_BY_BODY.urls()])),
    path("", include("backend.urls")),
]
