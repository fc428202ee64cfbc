"""What a health check finds: a status, one check's result, and the report of a whole run.

The data the checker (``health``), the built-in checks (``_health_checks``) and the HTTP server
share; ``health`` is where the public names are imported from.
"""

from __future__ import annotations

import dataclasses
import enum
from typing import Any

from ._timefmt import utc_now_iso


class HealthStatus(enum.StrEnum):
    """Outcome of a check or of a whole report, from best to worst."""

    HEALTHY = "healthy"
    DEGRADED = "degraded"
    UNHEALTHY = "unhealthy"

    @property
    def rank(self) -> int:
        """0 healthy, 1 degraded, 2 unhealthy: the overall status is the highest rank."""
        return _RANK[self]


_RANK = {HealthStatus.HEALTHY: 0, HealthStatus.DEGRADED: 1, HealthStatus.UNHEALTHY: 2}


def worst(statuses: list[HealthStatus]) -> HealthStatus:
    """The worst of ``statuses`` (healthy when there are none)."""
    return max(statuses, key=lambda s: s.rank, default=HealthStatus.HEALTHY)


@dataclasses.dataclass
class HealthCheckResult:
    """The outcome of one check; ``duration_ms`` and ``timestamp`` are filled in by the checker."""

    name: str
    status: HealthStatus
    message: str
    details: dict[str, Any] | None = None
    duration_ms: float = 0.0
    timestamp: str = dataclasses.field(default_factory=utc_now_iso)

    def __post_init__(self) -> None:
        try:
            self.status = HealthStatus(self.status)
        except ValueError:
            raise ValueError(
                f"status must be one of {', '.join(s.value for s in HealthStatus)}, "
                f"got {self.status!r}"
            ) from None

    def to_dict(self) -> dict[str, Any]:
        """The JSON form used in responses."""
        out: dict[str, Any] = {"status": self.status.value, "message": self.message}
        if self.details:
            out["details"] = self.details
        out["duration_ms"] = self.duration_ms
        out["timestamp"] = self.timestamp
        return out


@dataclasses.dataclass(frozen=True)
class HealthReport:
    """All checks of one run and the overall status."""

    status: HealthStatus
    timestamp: str
    uptime_seconds: float
    worker_name: str
    checks: dict[str, HealthCheckResult]

    def to_dict(self) -> dict[str, Any]:
        """The module README's JSON shape: status, timestamp, uptime_seconds, worker_name and
        checks."""
        return {
            "status": self.status.value,
            "timestamp": self.timestamp,
            "uptime_seconds": self.uptime_seconds,
            "worker_name": self.worker_name,
            "checks": {name: result.to_dict() for name, result in self.checks.items()},
        }

    @property
    def http_status(self) -> int:
        """200 when healthy or degraded, 503 when unhealthy."""
        return 503 if self.status is HealthStatus.UNHEALTHY else 200
