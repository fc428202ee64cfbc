"""Read-only Django admin: people can look at organizations, executions, their dispatches and
events, and webhook deliveries."""

from __future__ import annotations

from typing import Any

from django.contrib import admin
from django.http import HttpRequest

from backend.internal_api.models import (
    Dispatch,
    ExecutionEvent,
    Organization,
    WebhookDelivery,
    WorkflowExecution,
)


class ReadOnlyAdmin(admin.ModelAdmin):
    """An admin page that lists and shows rows but never adds, changes or deletes them."""

    def has_add_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        """Nobody adds rows here."""
        return False

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        """Nobody changes rows here."""
        return False

    def has_delete_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        """Nobody deletes rows here."""
        return False


@admin.register(Organization)
class OrganizationAdmin(ReadOnlyAdmin):
    """Organizations."""

    list_display = ("id", "name", "created_at")
    search_fields = ("id", "name")


@admin.register(WorkflowExecution)
class WorkflowExecutionAdmin(ReadOnlyAdmin):
    """Workflow executions, newest first, filterable by status."""

    list_display = (
        "id",
        "organization",
        "workflow_id",
        "status",
        "attempts",
        "lease_epoch",
        "lease_expires_at",
        "created_at",
    )
    list_filter = ("status", "organization")
    search_fields = ("id", "workflow_id", "task_id")
    ordering = ("-created_at",)


@admin.register(WebhookDelivery)
class WebhookDeliveryAdmin(ReadOnlyAdmin):
    """Webhook deliveries."""

    list_display = ("id", "organization", "execution", "outcome", "status_code", "created_at")
    list_filter = ("outcome",)
    search_fields = ("webhook_id",)
    ordering = ("-created_at",)


@admin.register(Dispatch)
class DispatchAdmin(ReadOnlyAdmin):
    """The outbox of Celery messages, newest first; unpublished ones have no ``published_at``."""

    list_display = ("id", "execution", "task", "queue", "reason", "created_at", "published_at")
    list_filter = ("reason",)
    ordering = ("-id",)


@admin.register(ExecutionEvent)
class ExecutionEventAdmin(ReadOnlyAdmin):
    """Status changes of executions, newest first."""

    list_display = ("id", "execution", "from_status", "to_status", "reason", "worker", "at")
    list_filter = ("reason", "to_status")
    search_fields = ("execution__id",)
    ordering = ("-id",)
