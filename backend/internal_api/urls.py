"""URLs of the internal API, mounted at ``/internal/v1/``."""

from __future__ import annotations

from django.urls import path
from drf_spectacular.views import SpectacularAPIView

from backend.internal_api import views

urlpatterns = [
    path("health/", views.HealthView.as_view(), name="health"),
    path("metrics/", views.MetricsView.as_view(), name="metrics"),
    *views.WORKFLOW_EXECUTIONS.urls(),
    path(
        "workflow-executions/<uuid:pk>/status/",
        views.ExecutionStatusView.as_view(),
        name="execution-status",
    ),
    path(
        "workflow-executions/<uuid:pk>/claim/",
        views.ExecutionClaimView.as_view(),
        name="execution-claim",
    ),
    path(
        "workflow-executions/<uuid:pk>/heartbeat/",
        views.ExecutionHeartbeatView.as_view(),
        name="execution-heartbeat",
    ),
    path(
        "workflow-executions/<uuid:pk>/release/",
        views.ExecutionReleaseView.as_view(),
        name="execution-release",
    ),
    path(
        "workflow-executions/<uuid:pk>/events/",
        views.ExecutionEventsView.as_view(),
        name="execution-events",
    ),
    *views.WEBHOOK_DELIVERIES.urls(),
    *views.FILE_EXECUTIONS.urls(),
    path("schema/", SpectacularAPIView.as_view(), name="schema"),
]
