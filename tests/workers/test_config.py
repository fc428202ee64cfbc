"""WorkerConfig: defaults, validation, masking, .env loading, Celery settings and `check`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from backend.workers.shared import ConfigurationError, WorkerConfig
from backend.workers.shared.config import MASK

KEY = "swi-config-key-Zx81Qp"
SECRET = "whsec_c2VjcmV0LXZhbHVlLWZvci10ZXN0cw=="
REPO = Path(__file__).resolve().parents[2]

SEED_DEFAULTS = {
    "django_app_backend_url": "http://localhost:8000",
    "worker_name": "unstract-worker",
    "worker_version": "1.0.0",
    "organization_id": None,
    "api_timeout": 30.0,
    "api_retry_attempts": 3,
    "log_level": "INFO",
    "log_format": "structured",
    "circuit_breaker_failure_threshold": 5,
    "circuit_breaker_recovery_timeout": 60.0,
    "health_check_interval": 30.0,
    "metrics_port": 8080,
    "max_concurrent_tasks": 10,
}


@pytest.fixture
def env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> pytest.MonkeyPatch:
    """A clean environment: no worker variables, cwd without a .env file, the key set."""
    for name in list(os.environ):
        if name.upper() in {f.upper() for f in WorkerConfig.model_fields} | {"ENV_FILE"}:
            monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("INTERNAL_SERVICE_API_KEY", KEY)
    return monkeypatch


def test_seed_defaults(env: pytest.MonkeyPatch) -> None:
    config = WorkerConfig()
    for name, value in SEED_DEFAULTS.items():
        assert getattr(config, name) == value, name
    assert config.api_key() == KEY


def test_seed_attributes(env: pytest.MonkeyPatch) -> None:
    env.setenv("WORKER_NAME", "my-worker")
    env.setenv("METRICS_PORT", "9191")
    config = WorkerConfig()
    assert config.internal_api_base_url == "http://localhost:8000/internal/v1"
    assert config.worker_name == "my-worker"
    assert config.metrics_port == 9191


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("http://backend:8000", "http://backend:8000/internal/v1"),
        ("http://backend:8000/", "http://backend:8000/internal/v1"),
        ("https://api.example.org/prefix/", "https://api.example.org/prefix/internal/v1"),
        (" http://b ", "http://b/internal/v1"),
    ],
)
def test_base_url_joined_without_doubled_slashes(
    env: pytest.MonkeyPatch, url: str, expected: str
) -> None:
    env.setenv("DJANGO_APP_BACKEND_URL", url)
    assert WorkerConfig().internal_api_base_url == expected


def test_missing_key_is_an_error(env: pytest.MonkeyPatch) -> None:
    env.delenv("INTERNAL_SERVICE_API_KEY")
    with pytest.raises(ConfigurationError) as info:
        WorkerConfig()
    assert info.value.problems == {"INTERNAL_SERVICE_API_KEY": "required, not set"}
    assert isinstance(info.value, ValueError)


def test_blank_key_is_an_error(env: pytest.MonkeyPatch) -> None:
    env.setenv("INTERNAL_SERVICE_API_KEY", "   ")
    with pytest.raises(ConfigurationError) as info:
        WorkerConfig()
    assert "INTERNAL_SERVICE_API_KEY" in info.value.problems


BAD_VALUES = [
    ("DJANGO_APP_BACKEND_URL", "ftp://backend", "http(s) URL"),
    ("DJANGO_APP_BACKEND_URL", "http://", "http(s) URL"),
    ("DJANGO_APP_BACKEND_URL", "backend:8000", "http(s) URL"),
    ("API_TIMEOUT", "0", "greater than 0"),
    ("API_TIMEOUT", "soon", "valid number"),
    ("API_RETRY_ATTEMPTS", "-1", "greater than or equal to 0"),
    ("LOG_LEVEL", "LOUD", "one of DEBUG"),
    ("LOG_FORMAT", "xml", "structured, simple"),
    ("CIRCUIT_BREAKER_FAILURE_THRESHOLD", "0", "greater than or equal to 1"),
    ("CIRCUIT_BREAKER_RECOVERY_TIMEOUT", "-5", "greater than 0"),
    ("HEALTH_CHECK_INTERVAL", "0", "greater than 0"),
    ("METRICS_PORT", "0", "greater than or equal to 1"),
    ("METRICS_PORT", "65536", "less than or equal to 65535"),
    ("MAX_CONCURRENT_TASKS", "0", "greater than or equal to 1"),
    ("CIRCUIT_BREAKER_REDIS_URL", "http://redis", "redis://"),
]


@pytest.mark.parametrize(("name", "value", "why"), BAD_VALUES)
def test_each_bad_variable_is_named_with_reason_and_value(
    env: pytest.MonkeyPatch, name: str, value: str, why: str
) -> None:
    env.setenv(name, value)
    with pytest.raises(ConfigurationError) as info:
        WorkerConfig()
    assert list(info.value.problems) == [name]
    message = info.value.problems[name]
    assert why in message
    assert repr(value) in message
    assert name in str(info.value)


def test_every_bad_variable_reported_at_once(env: pytest.MonkeyPatch) -> None:
    env.delenv("INTERNAL_SERVICE_API_KEY")
    env.setenv("API_TIMEOUT", "-1")
    env.setenv("METRICS_PORT", "99999")
    env.setenv("LOG_FORMAT", "xml")
    with pytest.raises(ConfigurationError) as info:
        WorkerConfig()
    assert set(info.value.problems) == {
        "INTERNAL_SERVICE_API_KEY",
        "API_TIMEOUT",
        "METRICS_PORT",
        "LOG_FORMAT",
    }


def test_case_insensitive_choices_are_normalised(env: pytest.MonkeyPatch) -> None:
    env.setenv("LOG_LEVEL", "debug")
    env.setenv("LOG_FORMAT", "SIMPLE")
    config = WorkerConfig()
    assert (config.log_level, config.log_format) == ("DEBUG", "simple")


def test_secret_values_never_shown(env: pytest.MonkeyPatch) -> None:
    env.setenv("WEBHOOK_SIGNING_SECRET", SECRET)
    config = WorkerConfig()
    dumps = [
        repr(config),
        str(config),
        json.dumps(config.model_dump(mode="json")),
        str(config.model_dump()),
        json.dumps(config.public_settings()),
    ]
    for text in dumps:
        assert KEY not in text
        assert SECRET not in text
        assert MASK in text
    assert config.secret_values() == (KEY, SECRET)


def test_secret_not_in_validation_error(env: pytest.MonkeyPatch) -> None:
    env.setenv("WEBHOOK_SIGNING_SECRET", SECRET)
    env.setenv("API_TIMEOUT", "-1")
    with pytest.raises(ConfigurationError) as info:
        WorkerConfig()
    assert KEY not in str(info.value)
    assert SECRET not in str(info.value)


def test_unknown_variables_ignored(env: pytest.MonkeyPatch) -> None:
    env.setenv("SOMETHING_ELSE", "x")
    env.setenv("WORKER_FAVOURITE_COLOUR", "blue")
    assert WorkerConfig().worker_name == "unstract-worker"


def test_dotenv_in_working_directory(env: pytest.MonkeyPatch, tmp_path: Path) -> None:
    env.delenv("INTERNAL_SERVICE_API_KEY")
    (tmp_path / ".env").write_text(
        f"INTERNAL_SERVICE_API_KEY={KEY}\nWORKER_NAME=from-dotenv\nUNRELATED=1\n"
    )
    config = WorkerConfig()
    assert config.worker_name == "from-dotenv"
    assert config.api_key() == KEY


def test_environment_wins_over_dotenv(env: pytest.MonkeyPatch, tmp_path: Path) -> None:
    (tmp_path / ".env").write_text("WORKER_NAME=from-dotenv\n")
    env.setenv("WORKER_NAME", "from-env")
    assert WorkerConfig().worker_name == "from-env"


def test_env_file_variable_points_elsewhere(env: pytest.MonkeyPatch, tmp_path: Path) -> None:
    other = tmp_path / "conf" / "worker.env"
    other.parent.mkdir()
    other.write_text("WORKER_NAME=from-env-file\nMETRICS_PORT=9999\n")
    (tmp_path / ".env").write_text("WORKER_NAME=from-dotenv\n")
    env.setenv("ENV_FILE", str(other))
    config = WorkerConfig()
    assert (config.worker_name, config.metrics_port) == ("from-env-file", 9999)


def test_webhook_allowed_hosts_comma_separated(env: pytest.MonkeyPatch) -> None:
    env.setenv("WEBHOOK_ALLOWED_HOSTS", " Hooks.Local , 127.0.0.1,,localhost ")
    assert WorkerConfig().webhook_allowed_hosts == ["hooks.local", "127.0.0.1", "localhost"]


def test_blank_optionals_are_unset(env: pytest.MonkeyPatch) -> None:
    env.setenv("ORGANIZATION_ID", "")
    env.setenv("CELERY_BROKER_URL", "  ")
    env.setenv("WEBHOOK_SIGNING_SECRET", "")
    config = WorkerConfig()
    assert config.organization_id is None
    assert config.celery_broker_url is None
    assert config.webhook_signing_secret is None
    assert config.secret_values() == (KEY,)


def test_config_is_frozen(env: pytest.MonkeyPatch) -> None:
    config = WorkerConfig()
    with pytest.raises(ValueError, match="frozen"):
        config.worker_name = "other"  # type: ignore[misc]


def test_celery_config_production_settings(env: pytest.MonkeyPatch) -> None:
    env.setenv("WORKER_NAME", "my-worker")
    env.setenv("MAX_CONCURRENT_TASKS", "4")
    env.setenv("CELERY_BROKER_URL", "redis://127.0.0.1:6379/3")
    conf = WorkerConfig().get_celery_config()
    assert conf["broker_url"] == "redis://127.0.0.1:6379/3"
    assert conf["task_serializer"] == "json"
    assert conf["accept_content"] == ["json"]
    assert conf["task_acks_late"] is True
    assert conf["task_reject_on_worker_lost"] is True
    assert conf["worker_prefetch_multiplier"] == 1
    assert conf["worker_concurrency"] == 4
    assert conf["task_default_queue"] == "my-worker"
    assert conf["broker_connection_retry_on_startup"] is True
    assert conf["broker_heartbeat"] > 0
    assert 0 < conf["task_soft_time_limit"] < conf["task_time_limit"]
    assert conf["broker_transport_options"]["visibility_timeout"] > conf["task_time_limit"]
    assert "result_backend" not in conf


def test_celery_config_embedded_broker_when_unset(
    env: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    env.setenv("WORKER_DATA_DIR", str(tmp_path / "data"))
    conf = WorkerConfig().get_celery_config()
    assert conf["broker_url"] == "filesystem://"
    options = conf["broker_transport_options"]
    assert options["data_folder_in"] == options["data_folder_out"]
    assert Path(options["data_folder_in"]).is_dir()
    assert Path(options["data_folder_in"]).is_relative_to(tmp_path / "data")


def test_seed_quick_start_merge_keeps_a_working_broker(env: pytest.MonkeyPatch) -> None:
    """The seed merges get_celery_config() after its own broker_url from the environment."""
    config = WorkerConfig()
    merged = {"broker_url": os.getenv("CELERY_BROKER_URL"), **config.get_celery_config()}
    assert merged["broker_url"] == "filesystem://"


def test_celery_config_loads_into_a_real_celery_app(env: pytest.MonkeyPatch) -> None:
    from celery import Celery

    env.setenv("CELERY_RESULT_BACKEND", "redis://127.0.0.1:6379/5")
    app = Celery("config_test")
    app.config_from_object(WorkerConfig().get_celery_config())
    assert app.conf.task_acks_late is True
    assert app.conf.result_backend == "redis://127.0.0.1:6379/5"
    assert app.conf.task_default_queue == "unstract-worker"


def _check(env_vars: dict[str, str], cwd: Path) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if k.upper() not in _CONFIG_NAMES}
    return subprocess.run(
        [sys.executable, "-m", "backend.workers.shared", "check", "--no-backend"],
        env={**clean, "PYTHONPATH": str(REPO), **env_vars},
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=60,
    )


_CONFIG_NAMES = {f.upper() for f in WorkerConfig.model_fields} | {"ENV_FILE"}


def test_check_prints_masked_configuration(tmp_path: Path) -> None:
    result = _check({"INTERNAL_SERVICE_API_KEY": KEY, "WORKER_NAME": "checked"}, tmp_path)
    assert result.returncode == 0, result.stderr
    assert KEY not in result.stdout + result.stderr
    assert '"WORKER_NAME": "checked"' in result.stdout
    assert f'"INTERNAL_SERVICE_API_KEY": "{MASK}"' in result.stdout


def test_check_exit_code_2_on_bad_configuration(tmp_path: Path) -> None:
    result = _check({"METRICS_PORT": "0"}, tmp_path)
    assert result.returncode == 2
    assert "INTERNAL_SERVICE_API_KEY: required, not set" in result.stderr
    assert "METRICS_PORT" in result.stderr
