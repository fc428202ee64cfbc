"""Worker configuration: every setting from the environment and ``.env``, validated once.

``WorkerConfig()`` reads the process environment and a ``.env`` file (``ENV_FILE`` names
another one). Any bad value raises one :class:`ConfigurationError` that names every bad
variable; secrets never appear in a message, a ``repr`` or a dump.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import urlsplit

from pydantic import (
    Field,
    SecretStr,
    ValidationError,
    field_serializer,
    field_validator,
)
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from . import _celery, _redact

MASK = "**********"
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
LOG_FORMATS = ("structured", "simple")
_SECRET_FIELDS = ("internal_service_api_key", "webhook_signing_secret")


class ConfigurationError(ValueError):
    """The environment holds one or more bad settings; ``problems`` maps variable to reason."""

    def __init__(self, problems: dict[str, str]) -> None:
        self.problems = problems
        lines = "\n".join(f"  {name}: {why}" for name, why in problems.items())
        super().__init__(f"invalid worker configuration ({len(problems)} problem(s)):\n{lines}")


def _check_http_url(value: str) -> str:
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError("must be an http(s) URL with a host")
    return value


def _split_csv(value: Any) -> Any:
    if isinstance(value, str):
        return [item.strip() for item in value.split(",") if item.strip()]
    return value


class WorkerConfig(BaseSettings):
    """All settings of a worker; attribute names are the variables' names in lower case."""

    model_config = SettingsConfigDict(
        env_file=".env",
        env_file_encoding="utf-8",
        extra="ignore",
        case_sensitive=False,
        validate_default=True,
        frozen=True,
    )

    # --- the seed's table -------------------------------------------------------------
    internal_service_api_key: SecretStr = Field(
        description="API key for internal service authentication (required)"
    )
    django_app_backend_url: str = Field("http://localhost:8000", description="Backend base URL")
    worker_name: str = Field("unstract-worker", min_length=1, description="Worker identifier")
    worker_version: str = Field("1.0.0", min_length=1, description="Worker version")
    organization_id: str | None = Field(None, description="Default organization context")
    api_timeout: float = Field(30.0, gt=0, description="API request timeout (seconds)")
    api_retry_attempts: int = Field(3, ge=0, le=20, description="Retries after a failed call")
    log_level: str = Field("INFO", description="Logging level")
    log_format: str = Field("structured", description="Log format (structured/simple)")
    circuit_breaker_failure_threshold: int = Field(5, ge=1, description="Failures to open")
    circuit_breaker_recovery_timeout: float = Field(60.0, gt=0, description="Seconds open")
    health_check_interval: float = Field(30.0, gt=0, description="Health re-check interval")
    metrics_port: int = Field(8080, ge=1, le=65535, description="Health server port")
    max_concurrent_tasks: int = Field(10, ge=1, description="Worker concurrency")

    # --- beyond the seed ----------------------------------------------------------------
    celery_broker_url: str | None = Field(None, description="Broker URL (default: filesystem)")
    celery_result_backend: str | None = Field(None, description="Result backend URL")
    worker_data_dir: Path = Field(Path(".data"), description="Local data (filesystem broker)")
    task_time_limit: float = Field(3600.0, gt=0, description="Hard task time limit (s)")
    task_soft_time_limit: float = Field(3300.0, gt=0, description="Soft task time limit (s)")
    api_retry_base_delay: float = Field(0.5, ge=0, description="First retry delay (s)")
    api_retry_max_delay: float = Field(30.0, gt=0, description="Cap on one retry delay (s)")
    api_deadline: float = Field(120.0, gt=0, description="Total time for one call (s)")
    api_retry_budget_ratio: float = Field(0.2, ge=0, le=1, description="Retries per call")
    api_retry_budget_min_per_second: float = Field(1.0, ge=0, description="Retry floor per s")
    circuit_breaker_redis_url: str | None = Field(None, description="Shared breaker state")
    webhook_signing_secret: SecretStr | None = Field(None, description="Standard Webhooks key")
    webhook_allowed_hosts: Annotated[list[str], NoDecode] = Field(
        default_factory=list, description="Hosts exempt from the private-network block"
    )
    webhook_timeout: float = Field(10.0, gt=0, description="Webhook request timeout (s)")
    health_host: str = Field("0.0.0.0", description="Health server bind address")
    health_check_timeout: float = Field(5.0, gt=0, description="Time bound of one health check")
    health_heartbeat_timeout: float = Field(
        30.0, gt=0, description="Pool process heartbeat age (s) counted as hung"
    )
    health_memory_degraded_percent: float = Field(85.0, gt=0, le=100, description="Memory %")
    health_memory_unhealthy_percent: float = Field(95.0, gt=0, le=100, description="Memory %")
    health_disk_degraded_percent: float = Field(85.0, gt=0, le=100, description="Disk %")
    health_disk_unhealthy_percent: float = Field(95.0, gt=0, le=100, description="Disk %")
    health_cpu_degraded_percent: float = Field(95.0, gt=0, le=100, description="CPU %")
    health_cpu_unhealthy_percent: float = Field(
        100.0, gt=0, le=100, description="CPU % (100: a busy CPU alone is never unhealthy)"
    )

    def __init__(self, **values: Any) -> None:
        values.setdefault("_env_file", os.environ.get("ENV_FILE", ".env"))
        try:
            super().__init__(**values)
        except ValidationError as exc:
            raise _configuration_error(exc) from None
        _redact.register_secrets(self.secret_values())  # scrubbed from every log line

    # --- validators ---------------------------------------------------------------------
    @field_validator("internal_service_api_key")
    @classmethod
    def _key_not_blank(cls, value: SecretStr) -> SecretStr:
        if not value.get_secret_value().strip():
            raise ValueError("must not be empty")
        return value

    @field_validator("django_app_backend_url")
    @classmethod
    def _backend_url(cls, value: str) -> str:
        return _check_http_url(value.strip()).rstrip("/")

    @field_validator("log_level", mode="before")
    @classmethod
    def _log_level(cls, value: Any) -> Any:
        if isinstance(value, str) and value.strip().upper() in LOG_LEVELS:
            return value.strip().upper()
        raise ValueError(f"must be one of {', '.join(LOG_LEVELS)}")

    @field_validator("log_format", mode="before")
    @classmethod
    def _log_format(cls, value: Any) -> Any:
        if isinstance(value, str) and value.strip().lower() in LOG_FORMATS:
            return value.strip().lower()
        raise ValueError(f"must be one of {', '.join(LOG_FORMATS)}")

    @field_validator(
        "organization_id",
        "celery_broker_url",
        "celery_result_backend",
        "circuit_breaker_redis_url",
        mode="before",
    )
    @classmethod
    def _blank_is_none(cls, value: Any) -> Any:
        if isinstance(value, str) and not value.strip():
            return None
        return value.strip() if isinstance(value, str) else value

    @field_validator("circuit_breaker_redis_url")
    @classmethod
    def _redis_url(cls, value: str | None) -> str | None:
        if value is not None and urlsplit(value).scheme not in ("redis", "rediss", "unix"):
            raise ValueError("must be a redis://, rediss:// or unix:// URL")
        return value

    @field_validator("webhook_signing_secret", mode="before")
    @classmethod
    def _blank_secret_is_none(cls, value: Any) -> Any:
        if isinstance(value, str) and not value.strip():
            return None
        return value

    @field_validator("webhook_allowed_hosts", mode="before")
    @classmethod
    def _hosts(cls, value: Any) -> Any:
        hosts = _split_csv(value)
        return [h.lower() for h in hosts] if isinstance(hosts, list) else hosts

    @field_validator("worker_data_dir")
    @classmethod
    def _absolute_dir(cls, value: Path) -> Path:
        return value.expanduser().resolve()

    @field_serializer(*_SECRET_FIELDS)
    def _mask(self, value: SecretStr | None) -> str | None:
        return None if value is None else MASK

    # --- derived values -----------------------------------------------------------------
    @property
    def internal_api_base_url(self) -> str:
        """The internal API root, e.g. ``http://localhost:8000/internal/v1``."""
        return f"{self.django_app_backend_url}/internal/v1"

    @property
    def broker_url(self) -> str:
        """The broker to use: ``CELERY_BROKER_URL``, or the embedded filesystem transport."""
        return self.celery_broker_url or "filesystem://"

    @property
    def broker_dir(self) -> Path:
        """Folder of the embedded filesystem broker (inside ``WORKER_DATA_DIR``)."""
        return self.worker_data_dir / "broker"

    def api_key(self) -> str:
        """The bearer key's value, for the one place that sends it."""
        return self.internal_service_api_key.get_secret_value()

    def secret_values(self) -> tuple[str, ...]:
        """Every configured secret's value, for scrubbing from log text."""
        secrets = [self.internal_service_api_key, self.webhook_signing_secret]
        return tuple(s.get_secret_value() for s in secrets if s is not None)

    def public_settings(self) -> dict[str, Any]:
        """Every setting by its environment name, secrets masked: what ``check`` prints."""
        dumped = self.model_dump(mode="json")
        return {name.upper(): dumped[name] for name in type(self).model_fields}

    def get_celery_config(self) -> dict[str, Any]:
        """Production Celery settings for a worker built on this configuration."""
        _celery.install()  # task log context, child heartbeats, multiprocess metrics
        conf: dict[str, Any] = {
            "broker_url": self.broker_url,
            # JSON only: no pickle payloads from the broker, ever.
            "task_serializer": "json",
            "result_serializer": "json",
            "accept_content": ["json"],
            "result_accept_content": ["json"],
            # Acknowledge after the task ran, and re-queue it if its process dies mid-task:
            # a killed child loses no execution (tasks must therefore be idempotent).
            "task_acks_late": True,
            "task_reject_on_worker_lost": True,
            # One message per process at a time: long tasks do not hoard the queue.
            "worker_prefetch_multiplier": 1,
            "worker_concurrency": self.max_concurrent_tasks,
            # The seed's `-Q my-worker` consumes what the worker's own tasks send.
            "task_default_queue": self.worker_name,
            # Keep trying the broker at start-up instead of exiting on the first refusal.
            "broker_connection_retry_on_startup": True,
            "broker_connection_max_retries": None,
            # AMQP heartbeats detect a dead broker connection within about a minute.
            "broker_heartbeat": 30,
            # With late acks, tasks in flight on a lost connection are redelivered.
            "worker_cancel_long_running_tasks_on_connection_loss": True,
            # A runaway task is stopped: soft limit raises in the task, hard limit kills it.
            "task_soft_time_limit": self.task_soft_time_limit,
            "task_time_limit": self.task_time_limit,
            "worker_send_task_events": False,
            "task_ignore_result": self.celery_result_backend is None,
        }
        if self.celery_result_backend:
            conf["result_backend"] = self.celery_result_backend
        if self.broker_url.startswith("filesystem://"):
            # The embedded broker: producer and consumer share one folder pair.
            folders = {name: self.broker_dir / name for name in ("queue", "processed", "control")}
            for folder in folders.values():
                folder.mkdir(parents=True, exist_ok=True)
            # kombu's own transport can hand a consumer a half-written message file.
            conf["broker_transport"] = "backend.workers.shared._fs_transport:Transport"
            conf["broker_transport_options"] = {
                "data_folder_in": str(folders["queue"]),
                "data_folder_out": str(folders["queue"]),
                "processed_folder": str(folders["processed"]),
                "store_processed": False,
                "control_folder": str(folders["control"]),
                # kombu polls the folder once a second by default: a prefork pool then
                # idles up to a second between tasks. 0.1 s costs a directory listing.
                "polling_interval": 0.1,
            }
        elif self.broker_url.startswith(("redis://", "rediss://")):
            # Redelivery of unacknowledged tasks must wait longer than a task may run.
            conf["broker_transport_options"] = {
                "visibility_timeout": int(self.task_time_limit) + 300,
            }
        return conf

    def __repr__(self) -> str:
        shown = ", ".join(f"{k}={v!r}" for k, v in self.model_dump(mode="json").items())
        return f"WorkerConfig({shown})"

    __str__ = __repr__


def _configuration_error(exc: ValidationError) -> ConfigurationError:
    problems: dict[str, str] = {}
    for error in exc.errors():
        field = str(error["loc"][0]) if error["loc"] else "?"
        name = field.upper()
        if error["type"] == "missing":
            why = "required, not set"
        else:
            why = str(error["msg"]).removeprefix("Value error, ")
            if field not in _SECRET_FIELDS:
                why += f" (got {error.get('input')!r})"
        problems[name] = f"{problems[name]}; {why}" if name in problems else why
    return ConfigurationError(problems)
