"""Worker configuration: every setting from the environment and ``.env``, validated once.

``WorkerConfig()`` reads the process environment and a ``.env`` file (``ENV_FILE`` names
another one). Any bad value raises one :class:`ConfigurationError` that names every bad
variable; secrets never appear in a message, a ``repr`` or a dump. The checks of one value
that the validators call live in ``_config_checks``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Any

from pydantic import (
    Field,
    SecretStr,
    ValidationError,
    ValidationInfo,
    field_serializer,
    field_validator,
)
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from . import _http, _redact, _runtime
from ._config_checks import (
    LOG_FORMATS as LOG_FORMATS,
    LOG_LEVELS as LOG_LEVELS,
    MAX_SECRET_LENGTH as MAX_SECRET_LENGTH,
    MAX_URL_LENGTH as MAX_URL_LENGTH,
    RESULT_BACKEND_SCHEMES,
    broker_schemes,
    check_backend_url,
    check_data_dir,
    check_log_format,
    check_log_level,
    check_order,
    check_secret,
    check_token,
    check_transport_url,
    check_webhook_secret,
    split_csv,
    strip_ascii,
    visible_ascii_problem,
)

MASK = _redact.MASK  # what a secret shows as (one mask for the package)
_SECRET_FIELDS = ("internal_service_api_key", "webhook_signing_secret")
_URL_FIELDS = (
    "django_app_backend_url",
    "celery_broker_url",
    "celery_result_backend",
    "circuit_breaker_redis_url",
)
#: Longest duration setting (one year): longer ones overflow timers (threading, Redis).
MAX_SECONDS = 365 * 24 * 3600.0
#: Characters of a bad value quoted in a ``ConfigurationError``.
MAX_QUOTED = 80


class ConfigurationError(ValueError):
    """The environment holds one or more bad settings; ``problems`` maps variable to reason."""

    def __init__(self, problems: dict[str, str]) -> None:
        self.problems = problems
        lines = "\n".join(f"  {name}: {why}" for name, why in problems.items())
        super().__init__(f"invalid worker configuration ({len(problems)} problem(s)):\n{lines}")


def logging_settings() -> tuple[str, str]:
    """``LOG_LEVEL`` and ``LOG_FORMAT`` from the process environment (unset or empty: INFO,
    structured), checked as :class:`WorkerConfig` checks them, for logging set up before or
    without a whole configuration (the Celery wiring). Raises :class:`ConfigurationError`."""
    problems: dict[str, str] = {}
    chosen: list[str] = []
    for name, default, check in (
        ("LOG_LEVEL", "INFO", check_log_level),
        ("LOG_FORMAT", "structured", check_log_format),
    ):
        value = os.environ.get(name) or default
        try:
            chosen.append(check(value))
        except ValueError as exc:
            problems[name] = f"{exc} (got {_quoted(value, url=False)})"
    if problems:
        raise ConfigurationError(problems)
    return chosen[0], chosen[1]


class WorkerConfig(BaseSettings):
    """All settings of a worker; attribute names are the variables' names in lower case."""

    model_config = SettingsConfigDict(
        env_file=".env",
        env_file_encoding="utf-8",
        extra="ignore",
        case_sensitive=False,
        validate_default=True,
        frozen=True,
        allow_inf_nan=False,  # inf, nan and 1e999 are refused for every number
    )

    # --- the module README's table --------------------------------------------------------
    internal_service_api_key: SecretStr = Field(
        description="API key for internal service authentication (required)"
    )
    django_app_backend_url: str = Field("http://localhost:8000", description="Backend base URL")
    worker_name: str = Field("unstract-worker", description="Worker identifier")
    worker_version: str = Field("1.0.0", description="Worker version")
    organization_id: str | None = Field(None, description="Default organization context")
    api_timeout: float = Field(30.0, gt=0, le=MAX_SECONDS, description="API timeout (s)")
    api_retry_attempts: int = Field(3, ge=0, le=20, description="Retries after a failed call")
    log_level: str = Field("INFO", description="Logging level")
    log_format: str = Field("structured", description="Log format (structured/simple)")
    circuit_breaker_failure_threshold: int = Field(
        5, ge=1, le=1_000_000, description="Failures to open"
    )
    circuit_breaker_recovery_timeout: float = Field(
        60.0, gt=0, le=MAX_SECONDS, description="Seconds open"
    )
    health_check_interval: float = Field(
        30.0, gt=0, le=MAX_SECONDS, description="Health re-check interval"
    )
    metrics_port: int = Field(8080, ge=0, le=65535, description="Health server port (0: any)")
    max_concurrent_tasks: int = Field(10, ge=1, le=10_000, description="Worker concurrency")

    # --- beyond the module README ---------------------------------------------------------
    celery_broker_url: str | None = Field(None, description="Broker URL (default: filesystem)")
    celery_result_backend: str | None = Field(None, description="Result backend URL")
    worker_data_dir: Path = Field(Path(".data"), description="Local data (filesystem broker)")
    task_time_limit: float = Field(3600.0, gt=0, le=MAX_SECONDS, description="Hard limit (s)")
    task_soft_time_limit: float = Field(
        3300.0, gt=0, le=MAX_SECONDS, description="Soft task time limit (s)"
    )
    api_retry_base_delay: float = Field(
        0.5, ge=0, le=MAX_SECONDS, description="First retry delay (s)"
    )
    api_retry_max_delay: float = Field(
        30.0, gt=0, le=MAX_SECONDS, description="Cap on one retry delay (s)"
    )
    api_deadline: float = Field(120.0, gt=0, le=MAX_SECONDS, description="Time for one call (s)")
    api_retry_budget_ratio: float = Field(0.2, ge=0, le=1, description="Retries per call")
    api_retry_budget_min_per_second: float = Field(
        1.0, ge=0, le=1_000_000, description="Retry floor per s"
    )
    api_max_connections: int = Field(
        _http.POOL_MAX_CONNECTIONS, ge=1, le=1000, description="Connections per process"
    )
    api_max_keepalive_connections: int | None = Field(
        None, ge=0, le=1000, description="Idle connections kept (default: all)"
    )
    circuit_breaker_initial_recovery_timeout: float = Field(
        1.0, gt=0, le=MAX_SECONDS, description="First open period (s), x1.5 per failed probe"
    )
    circuit_breaker_redis_url: str | None = Field(None, description="Shared breaker state")
    execution_lease_seconds: int = Field(
        30, ge=3, le=3600, description="Lease an ExecutionTask claims (s), heartbeat every 1/3"
    )
    webhook_signing_secret: SecretStr | None = Field(None, description="Standard Webhooks key")
    webhook_allowed_hosts: Annotated[list[str], NoDecode] = Field(
        default_factory=list, description="Hosts exempt from the private-network block"
    )
    webhook_timeout: float = Field(10.0, gt=0, le=MAX_SECONDS, description="Webhook timeout (s)")
    health_host: str = Field("0.0.0.0", description="Health server bind address")
    health_check_timeout: float = Field(
        5.0, gt=0, le=MAX_SECONDS, description="Time bound of one health check"
    )
    health_heartbeat_timeout: float = Field(
        30.0, gt=0, le=MAX_SECONDS, description="Pool process heartbeat age (s) counted as hung"
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

    # --- validators: secrets ------------------------------------------------------------
    @field_validator("internal_service_api_key")
    @classmethod
    def _api_key(cls, value: SecretStr) -> SecretStr:
        text = value.get_secret_value()
        check_secret(text)
        if "," in text:
            raise ValueError(
                "holds a comma: a worker sends one key (a comma-separated list of keys is "
                "the backend's setting, for rotation)"
            )
        return value

    @field_validator("webhook_signing_secret", mode="before")
    @classmethod
    def _blank_secret_is_none(cls, value: Any) -> Any:
        if isinstance(value, str) and not strip_ascii(value):
            return None
        return value

    @field_validator("webhook_signing_secret")
    @classmethod
    def _webhook_secret(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None:
            check_webhook_secret(value.get_secret_value())
        return value

    # --- validators: URLs ---------------------------------------------------------------
    @field_validator(
        "django_app_backend_url",
        "celery_broker_url",
        "celery_result_backend",
        "circuit_breaker_redis_url",
        mode="before",
    )
    @classmethod
    def _url_stripped(cls, value: Any) -> Any:
        return strip_ascii(value) if isinstance(value, str) else value

    @field_validator("django_app_backend_url")
    @classmethod
    def _backend_url(cls, value: str) -> str:
        return check_backend_url(value)

    @field_validator("celery_broker_url", "celery_result_backend", "circuit_breaker_redis_url")
    @classmethod
    def _blank_url_is_none(cls, value: str | None) -> str | None:
        return value or None

    @field_validator("celery_broker_url")
    @classmethod
    def _broker_url(cls, value: str | None) -> str | None:
        if value is None:
            return None
        return check_transport_url(value, broker_schemes(), "redis://localhost:6379/0")

    @field_validator("celery_result_backend")
    @classmethod
    def _result_backend(cls, value: str | None) -> str | None:
        if value is None:
            return None
        return check_transport_url(value, RESULT_BACKEND_SCHEMES, "redis://localhost:6379/1")

    @field_validator("circuit_breaker_redis_url")
    @classmethod
    def _redis_url(cls, value: str | None) -> str | None:
        if value is not None:
            check_transport_url(
                value, frozenset({"redis", "rediss", "unix"}), "redis://localhost:6379/2"
            )
            if ";" in value:
                raise ValueError("must be one redis://, rediss:// or unix:// URL")
        return value

    # --- validators: names that go into headers, queues and addresses -------------------
    @field_validator("worker_name")
    @classmethod
    def _worker_name(cls, value: str) -> str:
        check_token(value, max_length=200)
        if "," in value:
            raise ValueError("must not hold a comma (it is also the worker's Celery queue)")
        return value

    @field_validator("worker_version")
    @classmethod
    def _worker_version(cls, value: str) -> str:
        return check_token(value, max_length=100)

    @field_validator("organization_id", mode="before")
    @classmethod
    def _blank_org_is_none(cls, value: Any) -> Any:
        if isinstance(value, str):
            return strip_ascii(value) or None
        return value

    @field_validator("organization_id")
    @classmethod
    def _organization_id(cls, value: str | None) -> str | None:
        return None if value is None else check_token(value, max_length=64)

    @field_validator("webhook_allowed_hosts", mode="before")
    @classmethod
    def _hosts(cls, value: Any) -> Any:
        hosts = split_csv(value)
        if isinstance(hosts, list) and all(isinstance(h, str) for h in hosts):
            return [h.lower() for h in hosts]
        return hosts  # not a list of text: the type check reports it

    @field_validator("webhook_allowed_hosts")
    @classmethod
    def _hosts_visible(cls, value: list[str]) -> list[str]:
        for position, host in enumerate(value, 1):
            problem = visible_ascii_problem(host)
            if problem is not None or len(host) > 260:
                why = problem or "is longer than a host name"
                raise ValueError(f"host {position} {why} (write host or host:port, in ASCII)")
        return value

    @field_validator("health_host")
    @classmethod
    def _health_host(cls, value: str) -> str:
        return check_token(strip_ascii(value), max_length=255)

    # --- validators: choices ------------------------------------------------------------
    @field_validator("log_level", mode="before")
    @classmethod
    def _log_level(cls, value: Any) -> Any:
        return check_log_level(value)

    @field_validator("log_format", mode="before")
    @classmethod
    def _log_format(cls, value: Any) -> Any:
        return check_log_format(value)

    # --- validators: settings bounded by another one ----------------------------------
    @field_validator("task_soft_time_limit")
    @classmethod
    def _soft_below_hard(cls, value: float, info: ValidationInfo) -> float:
        return check_order(value, info, "task_time_limit", "below")

    @field_validator("api_retry_max_delay")
    @classmethod
    def _max_delay_above_base(cls, value: float, info: ValidationInfo) -> float:
        return check_order(value, info, "api_retry_base_delay", "at least")

    @field_validator("api_max_keepalive_connections")
    @classmethod
    def _keepalive_within_pool(cls, value: int | None, info: ValidationInfo) -> int | None:
        if value is None:
            return None
        return int(check_order(value, info, "api_max_connections", "at most"))

    @field_validator(
        "health_memory_unhealthy_percent",
        "health_disk_unhealthy_percent",
        "health_cpu_unhealthy_percent",
    )
    @classmethod
    def _unhealthy_above_degraded(cls, value: float, info: ValidationInfo) -> float:
        degraded = str(info.field_name).replace("_unhealthy_", "_degraded_")
        return check_order(value, info, degraded, "at least")

    # --- validators: paths --------------------------------------------------------------
    @field_validator("worker_data_dir", mode="before")
    @classmethod
    def _printable_path(cls, value: Any) -> Any:
        if isinstance(value, str) and (not strip_ascii(value) or not value.isprintable()):
            raise ValueError("must be a folder's path (not empty, no control character)")
        return value

    @field_validator("worker_data_dir")
    @classmethod
    def _data_dir(cls, value: Path) -> Path:
        try:
            path = value.expanduser().resolve()
        except (OSError, RuntimeError, ValueError) as exc:
            raise ValueError(f"cannot be resolved: {exc}") from None
        return check_data_dir(path)

    @field_serializer(*_SECRET_FIELDS)
    def _mask(self, value: SecretStr | None) -> str | None:
        return None if value is None else MASK

    @field_serializer(*_URL_FIELDS)
    def _redact_url(self, value: str | None) -> str | None:
        return None if value is None else _redact.redact_url(value)

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
        _runtime.install_celery()  # task log context, child heartbeats, multiprocess metrics
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
            # The module README's `-Q my-worker` consumes what the worker's own tasks send.
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
            # The embedded broker: producer and consumer share one folder pair; kombu's own
            # transport can hand a consumer a half-written message file.
            from . import _fs_transport  # kombu's, needed only by this broker

            conf.update(_fs_transport.celery_conf(self.broker_dir))
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
                why += f" (got {_quoted(error.get('input'), url=field in _URL_FIELDS)})"
        problems[name] = f"{problems[name]}; {why}" if name in problems else why
    return ConfigurationError(problems)


def _quoted(value: Any, *, url: bool) -> str:
    """A bad value as a message shows it: a URL without credentials, cut to a line's length."""
    if url and isinstance(value, str):
        value = _redact.redact_url(value)
    text = repr(value)
    return text if len(text) <= MAX_QUOTED else f"{text[: MAX_QUOTED - 3]}..."
