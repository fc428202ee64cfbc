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

README_DEFAULTS = {
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


def test_readme_defaults(env: pytest.MonkeyPatch) -> None:
    config = WorkerConfig()
    for name, value in README_DEFAULTS.items():
        assert getattr(config, name) == value, name
    assert config.api_key() == KEY


def test_readme_attributes(env: pytest.MonkeyPatch) -> None:
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
        ("https://api.example.org//", "https://api.example.org/internal/v1"),
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
    ("METRICS_PORT", "-1", "greater than or equal to 0"),
    ("METRICS_PORT", "65536", "less than or equal to 65535"),
    ("MAX_CONCURRENT_TASKS", "0", "greater than or equal to 1"),
    ("CIRCUIT_BREAKER_REDIS_URL", "http://redis", "redis://"),
    ("CIRCUIT_BREAKER_INITIAL_RECOVERY_TIMEOUT", "0", "greater than 0"),
    ("CIRCUIT_BREAKER_INITIAL_RECOVERY_TIMEOUT", "-1", "greater than 0"),
    ("CIRCUIT_BREAKER_INITIAL_RECOVERY_TIMEOUT", "1e20", "less than or equal to 31536000"),
    ("EXECUTION_LEASE_SECONDS", "2", "greater than or equal to 3"),
    ("EXECUTION_LEASE_SECONDS", "3601", "less than or equal to 3600"),
    ("EXECUTION_LEASE_SECONDS", "2.5", "valid integer"),
    ("EXECUTION_LEASE_SECONDS", "soon", "valid integer"),
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


def test_readme_quick_start_merge_keeps_a_working_broker(env: pytest.MonkeyPatch) -> None:
    """The Quick Start merges get_celery_config() after its own broker_url from the environment."""
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
    result = _check({"METRICS_PORT": "-1"}, tmp_path)
    assert result.returncode == 2
    assert "INTERNAL_SERVICE_API_KEY: required, not set" in result.stderr
    assert "METRICS_PORT" in result.stderr


# --- values that used to be accepted and failed later (issue 9) ---------------------------

KEY_BODY = "Zq8Xv1Lm9Pw3Rt6Y"
UNUSABLE_KEYS = [
    KEY_BODY + "\n",  # a line break copied from a file
    KEY_BODY + "\r\n",
    "\n" + KEY_BODY,
    KEY_BODY[:8] + "\r" + KEY_BODY[8:],
    KEY_BODY[:8] + "\x00" + KEY_BODY[8:],
    KEY_BODY[:8] + "\x1b[31m" + KEY_BODY[8:],
    KEY_BODY[:8] + "\x7f" + KEY_BODY[8:],
    KEY_BODY[:8] + "\u00e9" + KEY_BODY[8:],  # non-ASCII: UnicodeEncodeError on the first call
    KEY_BODY[:8] + "\u2028" + KEY_BODY[8:],
    KEY_BODY[:8] + "\ud800" + KEY_BODY[8:],
    KEY_BODY[:8] + " " + KEY_BODY[8:],
    KEY_BODY[:8] + "," + KEY_BODY[8:],  # the backend's rotation list, not one key
]


def fragments(secret: str, size: int = 4) -> set[str]:
    """Every run of ``size`` characters of ``secret``: none may be shown."""
    return {secret[i : i + size] for i in range(len(secret) - size + 1)}


@pytest.mark.parametrize("key", UNUSABLE_KEYS, ids=repr)
def test_unusable_api_key_refused_naming_the_variable_never_the_value(key: str) -> None:
    with pytest.raises(ConfigurationError) as info:
        WorkerConfig(_env_file=None, internal_service_api_key=key)
    assert list(info.value.problems) == ["INTERNAL_SERVICE_API_KEY"]
    shown = str(info.value) + repr(info.value) + repr(info.value.problems)
    assert not [f for f in fragments(KEY_BODY) if f in shown]


def test_key_with_a_trailing_newline_from_the_environment(env: pytest.MonkeyPatch) -> None:
    env.setenv("INTERNAL_SERVICE_API_KEY", KEY_BODY + "\n")
    with pytest.raises(ConfigurationError, match="INTERNAL_SERVICE_API_KEY: has leading or"):
        WorkerConfig()


@pytest.mark.parametrize(
    ("name", "value", "why"),
    [
        ("DJANGO_APP_BACKEND_URL", "http://svc:pa55-Secret-77@backend:8000", "write http://backend:8000"),
        ("DJANGO_APP_BACKEND_URL", "http://svc@backend:8000", "write http://backend:8000"),
        ("CELERY_BROKER_URL", "foo://svc:pa55-Secret-77@broker:5672//", "not one of"),
        ("CELERY_RESULT_BACKEND", "nope://:pa55-Secret-77@redis:6379/1", "not one of"),
        ("CIRCUIT_BREAKER_REDIS_URL", "http://:pa55-Secret-77@redis:6379/1", "redis://"),
        ("CELERY_BROKER_URL", "redis://:pa55-Secret-77@redis:99999/0", "port"),
    ],
)
def test_refused_url_is_shown_without_its_password(
    env: pytest.MonkeyPatch, name: str, value: str, why: str
) -> None:
    env.setenv(name, value)
    with pytest.raises(ConfigurationError) as info:
        WorkerConfig()
    assert list(info.value.problems) == [name] and why in info.value.problems[name]
    assert "pa55-Secret-77" not in str(info.value) and f"{MASK}@" in str(info.value)


def test_url_passwords_never_in_repr_dump_or_check(env: pytest.MonkeyPatch, tmp_path: Path) -> None:
    urls = {
        "CELERY_BROKER_URL": "amqp://guest:pa55-Broker-1@127.0.0.1:5672//",
        "CELERY_RESULT_BACKEND": "redis://:pa55-Result-2@127.0.0.1:6379/5",
        "CIRCUIT_BREAKER_REDIS_URL": "redis://user:pa55-Breaker-3@127.0.0.1:6379/6?password=pa55-Query-4",
    }
    for name, value in urls.items():
        env.setenv(name, value)
    config = WorkerConfig()
    assert config.celery_broker_url == urls["CELERY_BROKER_URL"]  # the real value is used
    result = _check({**urls, "INTERNAL_SERVICE_API_KEY": KEY}, tmp_path)
    assert result.returncode == 0, result.stderr
    assert '"CELERY_BROKER_URL": "amqp://**********@127.0.0.1:5672//"' in result.stdout
    for text in (repr(config), str(config), json.dumps(config.public_settings()),
                 str(config.model_dump()), result.stdout + result.stderr):
        assert "pa55-" not in text


def test_backend_url_with_credentials_is_refused(env: pytest.MonkeyPatch) -> None:
    """Credentials in the URL make httpx send Basic auth instead of the bearer key."""
    env.setenv("DJANGO_APP_BACKEND_URL", "https://svc:pa55-Secret-77@api.example.org")
    with pytest.raises(ConfigurationError) as info:
        WorkerConfig()
    why = info.value.problems["DJANGO_APP_BACKEND_URL"]
    assert "user or password" in why and "write https://api.example.org" in why


@pytest.mark.parametrize(
    "url",
    [
        "http://backend:8000/internal/v1",
        "http://backend:8000/internal/v1/",
        "https://api.example.org/prefix/",
        "http://backend:8000/?debug=1",
        "http://backend:8000?debug=1",
        "http://backend:8000/#top",
        "http://backend:8000#top",
    ],
)
def test_backend_url_with_path_query_or_fragment_is_refused(
    env: pytest.MonkeyPatch, url: str
) -> None:
    env.setenv("DJANGO_APP_BACKEND_URL", url)
    with pytest.raises(ConfigurationError) as info:
        WorkerConfig()
    why = info.value.problems["DJANGO_APP_BACKEND_URL"]
    assert "without path, query or fragment: write http" in why
    assert "(the client adds /internal/v1/)" in why


FLOAT_SETTINGS = sorted(
    name.upper() for name, field in WorkerConfig.model_fields.items() if field.annotation is float
)


@pytest.mark.parametrize("value", ["inf", "-inf", "nan", "1e999", "Infinity", "NaN"])
def test_no_float_setting_takes_infinity_or_nan(env: pytest.MonkeyPatch, value: str) -> None:
    for name in FLOAT_SETTINGS:
        env.setenv(name, value)
    with pytest.raises(ConfigurationError) as info:
        WorkerConfig()
    assert set(info.value.problems) == set(FLOAT_SETTINGS)  # every one, in one error
    assert len(FLOAT_SETTINGS) >= 19


def test_huge_durations_refused_before_they_overflow_a_timer(env: pytest.MonkeyPatch) -> None:
    env.setenv("HEALTH_CHECK_INTERVAL", "1e300")
    env.setenv("CIRCUIT_BREAKER_RECOVERY_TIMEOUT", "1e20")
    with pytest.raises(ConfigurationError) as info:
        WorkerConfig()
    assert set(info.value.problems) == {"HEALTH_CHECK_INTERVAL", "CIRCUIT_BREAKER_RECOVERY_TIMEOUT"}
    assert "less than or equal to 31536000" in info.value.problems["HEALTH_CHECK_INTERVAL"]


@pytest.mark.parametrize("value", ["65536", "99999", "-1", "1e3", "\uff18\uff10\uff18\uff10"])
def test_port_out_of_range_refused(env: pytest.MonkeyPatch, value: str) -> None:
    env.setenv("METRICS_PORT", value)
    with pytest.raises(ConfigurationError) as info:
        WorkerConfig()
    assert list(info.value.problems) == ["METRICS_PORT"]


def test_metrics_port_zero_means_any_free_port(env: pytest.MonkeyPatch) -> None:
    from backend.workers.shared import HealthChecker, HealthServer

    env.setenv("METRICS_PORT", "0")
    config = WorkerConfig()
    assert config.metrics_port == 0
    server = HealthServer(HealthChecker(config), port=config.metrics_port, host="127.0.0.1")
    server.start()
    try:
        assert server.running and 0 < server.port <= 65535
    finally:
        server.stop()


def test_unusable_data_dir_refused(env: pytest.MonkeyPatch, tmp_path: Path) -> None:
    a_file = tmp_path / "a-file"
    a_file.write_text("not a folder")
    for value, why in ((a_file, "it is a file"), (a_file / "data", f"{a_file} is a file")):
        env.setenv("WORKER_DATA_DIR", str(value))
        with pytest.raises(ConfigurationError) as info:
            WorkerConfig()
        assert list(info.value.problems) == ["WORKER_DATA_DIR"]
        assert why in info.value.problems["WORKER_DATA_DIR"]


def test_unwritable_data_dir_refused_by_check(tmp_path: Path) -> None:
    """``check`` said OK for a folder no one may create files in (/proc/sys refuses new
    files to every user, root included)."""
    env = {"INTERNAL_SERVICE_API_KEY": KEY, "WORKER_DATA_DIR": "/proc/sys/swi-worker-data"}
    result = _check(env, tmp_path)
    assert result.returncode == 2, result.stdout + result.stderr
    assert "WORKER_DATA_DIR: is not writable (/proc/sys refuses new files)" in result.stderr


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write in a folder of mode 0555")
def test_read_only_folder_refused(env: pytest.MonkeyPatch, tmp_path: Path) -> None:
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o555)
    env.setenv("WORKER_DATA_DIR", str(locked / "data"))
    try:
        with pytest.raises(ConfigurationError, match="WORKER_DATA_DIR: is not writable"):
            WorkerConfig()
    finally:
        locked.chmod(0o755)


@pytest.mark.parametrize(
    "secret",
    ["!!!!", "whsec_", "whsec_not base64", "whsec_c2VjcmV0-dXJs_c2FmZQ", "whsec_%%%%", "c2Vj\n"],
)
def test_webhook_secret_not_base64_refused(secret: str) -> None:
    with pytest.raises(ConfigurationError) as info:
        WorkerConfig(_env_file=None, internal_service_api_key=KEY, webhook_signing_secret=secret)
    assert list(info.value.problems) == ["WEBHOOK_SIGNING_SECRET"]
    body = secret.strip().removeprefix("whsec_")
    assert not body or body not in str(info.value).replace("whsec_", "")


@pytest.mark.parametrize(
    "secret", [SECRET, "c2VjcmV0LXZhbHVlLWZvci10ZXN0cw", "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"]
)
def test_webhook_secret_forms_the_library_signs_with(secret: str) -> None:
    from standardwebhooks.webhooks import Webhook

    config = WorkerConfig(_env_file=None, internal_service_api_key=KEY,
                          webhook_signing_secret=secret)
    signer = Webhook(config.webhook_signing_secret.get_secret_value())  # type: ignore[union-attr]
    assert signer.sign("msg_1", __import__("datetime").datetime.now(), "{}")


@pytest.mark.parametrize(
    "value", ["nonsense", "redis", "://host", "foo://broker", "redis:/x", "amqp//host", "", "  "]
)
def test_broker_url_that_is_not_one_is_refused(env: pytest.MonkeyPatch, value: str) -> None:
    env.setenv("CELERY_BROKER_URL", value)
    if not value.strip():
        assert WorkerConfig().celery_broker_url is None  # blank: the embedded broker
        return
    with pytest.raises(ConfigurationError) as info:
        WorkerConfig()
    assert list(info.value.problems) == ["CELERY_BROKER_URL"]


@pytest.mark.parametrize(
    "value",
    ["redis://127.0.0.1:6379/0", "amqp://guest:guest@127.0.0.1:5672//", "filesystem://",
     "sqla+sqlite:///x.db", "sentinel://a:26379;sentinel://b:26379", "memory://"],
)
def test_broker_urls_kombu_knows_are_accepted(env: pytest.MonkeyPatch, value: str) -> None:
    env.setenv("CELERY_BROKER_URL", value)
    assert WorkerConfig().celery_broker_url == value


@pytest.mark.parametrize(
    ("settings", "named", "why"),
    [
        ({"TASK_SOFT_TIME_LIMIT": "4000"}, "TASK_SOFT_TIME_LIMIT", "below TASK_TIME_LIMIT (3600)"),
        ({"TASK_TIME_LIMIT": "60", "TASK_SOFT_TIME_LIMIT": "60"}, "TASK_SOFT_TIME_LIMIT", "below"),
        ({"HEALTH_MEMORY_DEGRADED_PERCENT": "99"}, "HEALTH_MEMORY_UNHEALTHY_PERCENT",
         "at least HEALTH_MEMORY_DEGRADED_PERCENT (99)"),
        ({"HEALTH_DISK_UNHEALTHY_PERCENT": "50"}, "HEALTH_DISK_UNHEALTHY_PERCENT",
         "at least HEALTH_DISK_DEGRADED_PERCENT (85)"),
        ({"HEALTH_CPU_DEGRADED_PERCENT": "100", "HEALTH_CPU_UNHEALTHY_PERCENT": "99"},
         "HEALTH_CPU_UNHEALTHY_PERCENT", "at least HEALTH_CPU_DEGRADED_PERCENT (100)"),
        ({"API_RETRY_BASE_DELAY": "40"}, "API_RETRY_MAX_DELAY", "at least API_RETRY_BASE_DELAY"),
        ({"API_MAX_CONNECTIONS": "4", "API_MAX_KEEPALIVE_CONNECTIONS": "5"},
         "API_MAX_KEEPALIVE_CONNECTIONS", "at most API_MAX_CONNECTIONS (4)"),
    ],
)
def test_settings_that_contradict_each_other(
    env: pytest.MonkeyPatch, settings: dict[str, str], named: str, why: str
) -> None:
    for name, value in settings.items():
        env.setenv(name, value)
    env.setenv("API_TIMEOUT", "-1")  # reported in the same error
    with pytest.raises(ConfigurationError) as info:
        WorkerConfig()
    assert set(info.value.problems) == {named, "API_TIMEOUT"}
    assert why in info.value.problems[named]


def test_equal_thresholds_and_delays_are_fine(env: pytest.MonkeyPatch) -> None:
    env.setenv("HEALTH_DISK_DEGRADED_PERCENT", "90")
    env.setenv("HEALTH_DISK_UNHEALTHY_PERCENT", "90")
    env.setenv("API_RETRY_BASE_DELAY", "2")
    env.setenv("API_RETRY_MAX_DELAY", "2")
    config = WorkerConfig()
    assert config.health_disk_unhealthy_percent == config.api_retry_max_delay * 45


@pytest.mark.parametrize(
    ("name", "value"),
    [("CIRCUIT_BREAKER_RECOVERY_TIMEOUT", "inf"), ("ORGANIZATION_ID", "org\u00e9"),
     ("ORGANIZATION_ID", "org one"), ("WORKER_VERSION", "1.0\n")],
)
def test_errors_name_the_variable_not_an_internal_field(
    env: pytest.MonkeyPatch, tmp_path: Path, name: str, value: str
) -> None:
    env.setenv(name, value)
    with pytest.raises(ConfigurationError) as info:
        WorkerConfig()
    assert list(info.value.problems) == [name]
    result = _check({"INTERNAL_SERVICE_API_KEY": KEY, name: value}, tmp_path)
    assert result.returncode == 2 and f"{name}: " in result.stderr
    assert "recovery_timeout" not in result.stderr and "organization_id" not in result.stderr
    assert "Traceback" not in result.stderr


def test_pool_limits_default_and_validated(env: pytest.MonkeyPatch) -> None:
    config = WorkerConfig()
    assert (config.api_max_connections, config.api_max_keepalive_connections) == (10, None)
    for name, value in (("API_MAX_CONNECTIONS", "0"), ("API_MAX_CONNECTIONS", "1001"),
                        ("API_MAX_KEEPALIVE_CONNECTIONS", "-1")):
        env.setenv(name, value)
        with pytest.raises(ConfigurationError) as info:
            WorkerConfig()
        assert list(info.value.problems) == [name]
        env.delenv(name)


def test_result_backend_schemes_are_celerys_own() -> None:
    # config checks CELERY_RESULT_BACKEND without importing Celery: its list is Celery's.
    from celery.app.backends import BACKEND_ALIASES

    from backend.workers.shared import _config_checks

    celerys = frozenset(name.lower() for name in BACKEND_ALIASES) | {"db", "cache"}
    assert celerys == _config_checks.RESULT_BACKEND_SCHEMES
