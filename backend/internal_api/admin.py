"""Read-only Django admin: people can look at organizations, executions and deliveries."""

from __future__ import annotations

from typing import Any

from django.contrib import admin
from django.http import HttpRequest

from backend.internal_api.models import Organization, WebhookDelivery, WorkflowExecution


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

    list_display = ("id", "organization", "workflow_id", "status", "attempts", "created_at")
    list_filter = ("status", "organization")
    search_fields = ("id", "workflow_id", "task_id")
    ordering = ("-created_at",)


@admin.register(WebhookDelivery)
class WebhookDeliveryAdmin(ReadOnlyAdmin):
    """Webhook deliveries."""

    list_display = ("id", "organization", "execution", "outcome", "status_code", "created_at")
    list_filter = ("outcome",)
    ordering = ("-created_at",)
