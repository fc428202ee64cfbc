"""Django app configuration of the internal API."""

from __future__ import annotations

from django.apps import AppConfig


class InternalApiConfig(AppConfig):
    """The app that serves ``/internal/v1/`` to the workers."""

    name = "backend.internal_api"
    label = "internal_api"
    verbose_name = "Internal API"
    default_auto_field = "django.db.models.BigAutoField"
