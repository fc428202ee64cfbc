"""Root URLs: the internal API under ``/internal/v1/`` and the read-only admin."""

from __future__ import annotations

from django.contrib import admin
from django.urls import include, path

urlpatterns = [
    path("internal/v1/", include("backend.internal_api.urls")),
    path("admin/", admin.site.urls),
]

handler400 = "backend.internal_api.errors.handler400"
handler403 = "backend.internal_api.errors.handler403"
handler404 = "backend.internal_api.errors.handler404"
handler500 = "backend.internal_api.errors.handler500"
