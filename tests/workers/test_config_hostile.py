"""Hostile input for every setting of WorkerConfig, table-driven.

Every field gets unpaired surrogates, NUL and other control characters, non-ASCII digits,
huge and negative numbers, inf/nan, wrong types, empty strings, overlong values, and (URL
settings) URLs with credentials. Each bad value must give a ConfigurationError that names the
variable (no other exception type, so no traceback of another kind), and no secret (API key,
webhook secret, URL password) may appear in ``str()``/``repr()`` of the error or of a config.
A sample goes through ``python -m backend.workers.shared check`` as a subprocess.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from backend.workers.shared.config import ConfigurationError, WorkerConfig

REPO = Path(__file__).resolve().parents[2]
KEY = "swi-hostile-key-Qm7Zk2Wx"
WEBHOOK_SECRET = "whsec_aG9zdGlsZS1zdWl0ZS13ZWJob29rLXNlY3JldA=="
PASSWORD = "Pw-hostile-9Jd3"  # put in URLs: never shown
MARKER = "Mk5Tq8"  # in hostile values: never shown when the value is a secret's
SECRETS = (KEY, WEBHOOK_SECRET, PASSWORD)
_CONFIG_NAMES = {f.upper() for f in WorkerConfig.model_fields} | {"ENV_FILE"}

FIELDS = WorkerConfig.model_fields
NUMBER_FIELDS = sorted(n for n, f in FIELDS.items() if f.annotation in (int, float, int | None))
URL_FIELDS = ("django_app_backend_url", "celery_broker_url", "celery_result_backend",
              "circuit_breaker_redis_url")
SECRET_FIELDS = ("internal_service_api_key", "webhook_signing_secret")
OPTIONAL = sorted(n for n, f in FIELDS.items() if f.default is None)

# Bad in every setting.
EVERYWHERE: list[Any] = [
    "\ud800",  # an unpaired surrogate
    "\udcff",  # what os.environ makes of an undecodable byte
    f"{MARKER}\ud83d",
    "\x00",
    f"{MARKER}\x00",
    f"{MARKER}\x01",
    f"{MARKER}\x1b[2J",
    f"{MARKER}\nX",
    f"{MARKER}\r",
    f"{MARKER}\x7f",
    f"{MARKER}\u2028",
    f"{MARKER}\u0085",
    "x" * 100_000,  # overlong
    [1, 2],
    {"a": 1},
    object(),
    b"\xff\xfe",
]
NUMBERS: list[Any] = [
    "", " ", "abc", "\u00b2", "\u0663", "\uff11", "1\uff12", "\u00bd", "inf", "-inf", "nan",
    "NaN", "Infinity", "1e999", "-1e999", "1e308", "9" * 5000, "-1", "-0.5", "0x10", "1,5",
    "1 000", "--1", float("inf"), float("nan"), 10**100, -(10**100), "12abc",
]
TEXTS: list[Any] = ["\u00e9", "\u00b2", "\u0663", "\uff11", 12, 1.5]
URLS = {
    "django_app_backend_url": [
        f"http://svc:{PASSWORD}@backend:8000",
        f"http://:{PASSWORD}@backend:8000",
        f"https://svc:{PASSWORD}@backend/internal/v1",
        f"http://svc:{PASSWORD}@backend:99999",
        f"ftp://svc:{PASSWORD}@backend",
        f"svc:{PASSWORD}@backend:8000",
        "http://[::1",
        "http://backend:-1",
        "http://backend:0",
        "http://",
        "backend:8000",
        "http://b\u00e4ckend:8000",
        "http://backend:8000/?q=1",
        "http://backend:8000/#x",
    ],
    "celery_broker_url": [
        f"redis://:{PASSWORD}@redis:99999/0",
        f"bogus://:{PASSWORD}@redis:6379/0",
        f"amqp://guest:{PASSWORD}@rabbit:5672//;bogus://x",
        f"://guest:{PASSWORD}@rabbit",
        f"guest:{PASSWORD}@rabbit:5672",
        "redis",
        "redis:/x",
        "redis://[::1",
        "redis://r\u00e9dis:6379",
    ],
    "celery_result_backend": [
        f"redis://:{PASSWORD}@redis:70000/1",
        f"nope://:{PASSWORD}@redis:6379/1",
        f"db+postgresql://u:{PASSWORD}@pg:0/x",
        "rpc",
        "redis://[::1",
    ],
    "circuit_breaker_redis_url": [
        f"http://:{PASSWORD}@redis:6379/2",
        f"redis://:{PASSWORD}@redis:65536/2",
        f"redis://:{PASSWORD}@a:6379;redis://:{PASSWORD}@b:6379",
        "redis",
        "redis://[::1",
    ],
}
SECRET_VALUES: list[Any] = [
    f" {MARKER}{MARKER}",
    f"{MARKER}{MARKER}\n",
    f"{MARKER}\t{MARKER}",
    f"{MARKER} {MARKER}",
    f"{MARKER}\u00e9{MARKER}",
    f"{MARKER}\uff11{MARKER}",
    12345,
]
OTHER: dict[str, list[Any]] = {
    "execution_lease_seconds": ["0", "2", "3601", "30.5", "1e3", 2, 3601, 30.5, True, None],
    "circuit_breaker_initial_recovery_timeout": ["0", "-0", 0, "31536001", 1e20, None],
    "internal_service_api_key": [*SECRET_VALUES, "", "   ", None, f"{MARKER},{MARKER}"],
    "webhook_signing_secret": [
        *SECRET_VALUES, f"{MARKER}!!", f"whsec_{MARKER}%%", "whsec_", f"whsec_{MARKER}-_x"
    ],
    "webhook_allowed_hosts": ["good,b\u00e4d", "good, a b", "\u0663", 12, ["ok", 3]],
    "worker_data_dir": ["", "   ", "/proc/sys/swi-hostile", 12, "/dev/null/x"],
    "log_level": ["", "LOUD", "debug\u0131", "\u0131nfo", None],
    "log_format": ["", "xml", "SIMPLE\u00e9", None],
    "worker_name": ["", "a,b", "a b", "x" * 201, None],
    "worker_version": ["", "1 0", "x" * 101, None],
    "organization_id": ["o r g", "x" * 65],
    "health_host": ["", "a b", "x" * 256, None],
}
# Values fine for a setting although they are bad for most.
ACCEPTED: dict[str, set[Any]] = {
    # A folder's name may be any printable text: non-ASCII ones are ordinary.
    "worker_data_dir": {"\u00e9", "\u00b2", "\u0663", "\uff11"},
    # ASCII whitespace at the ends of these is dropped (a Windows line end in .env).
    "health_host": {f"{MARKER}\r"},
    "organization_id": {f"{MARKER}\r"},
    "webhook_allowed_hosts": {f"{MARKER}\r"},
}


def _cases() -> list[Any]:
    cases = []
    for name in sorted(FIELDS):
        values = list(EVERYWHERE)
        if name in NUMBER_FIELDS:
            values += NUMBERS
        elif name not in ("worker_data_dir",) and name not in URL_FIELDS:
            values += TEXTS
        values += URLS.get(name, []) + OTHER.get(name, [])
        if name not in OPTIONAL and name not in OTHER:
            values.append(None)
        for index, value in enumerate(values):
            if isinstance(value, str) and value in ACCEPTED.get(name, set()):
                continue
            cases.append(pytest.param(name, value, id=f"{name}-{index}"))
    return cases


CASES = _cases()


def _base(**values: Any) -> dict[str, Any]:
    return {
        "_env_file": None,
        "internal_service_api_key": KEY,
        "webhook_signing_secret": WEBHOOK_SECRET,
        **values,
    }


def _assert_nothing_secret(text: str, *also: str) -> None:
    shown = [s for s in (*SECRETS, *also) if s in text]
    assert shown == [], text[:2000]


def test_every_setting_is_covered() -> None:
    names = {case.values[0] for case in CASES}
    assert names == set(FIELDS)
    assert len(CASES) >= 900, len(CASES)


@pytest.mark.parametrize(("name", "value"), CASES)
def test_bad_value_is_a_configuration_error_naming_the_variable(name: str, value: Any) -> None:
    with pytest.raises(ConfigurationError) as info:
        WorkerConfig(**_base(**{name: value}))
    assert list(info.value.problems) == [name.upper()]
    assert isinstance(info.value, ValueError)
    marker = (MARKER,) if name in SECRET_FIELDS else ()
    for text in (str(info.value), repr(info.value), repr(info.value.problems)):
        _assert_nothing_secret(text, *marker)
    assert len(str(info.value)) < 1000  # an overlong value is not echoed whole


@pytest.mark.parametrize(
    "value", sorted(ACCEPTED["worker_data_dir"]), ids=lambda v: f"U+{ord(v[0]):04X}"
)
def test_non_ascii_folder_names_are_fine(value: str, tmp_path: Path) -> None:
    config = WorkerConfig(**_base(worker_data_dir=str(tmp_path / value)))
    assert config.worker_data_dir == tmp_path / value


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("celery_broker_url", f"amqp://guest:{PASSWORD}@rabbit:5672//"),
        ("celery_broker_url", f"redis://:{PASSWORD}@a:6379/0;redis://:{PASSWORD}@b:6379/0"),
        ("celery_broker_url", f"redis://r:6379/0?password={PASSWORD}"),
        ("celery_result_backend", f"redis://user:{PASSWORD}@redis:6379/1"),
        ("celery_result_backend", f"db+postgresql://u:{PASSWORD}@pg/x"),
        ("circuit_breaker_redis_url", f"rediss://default:{PASSWORD}@redis:6380/2"),
        ("circuit_breaker_redis_url", f"redis://:{PASSWORD.replace('-', '%40')}@redis/2"),
    ],
)
def test_accepted_urls_never_show_their_password(name: str, value: str) -> None:
    config = WorkerConfig(**_base(**{name: value}))
    assert getattr(config, name) == value  # used as given
    for text in (repr(config), str(config), str(config.model_dump()),
                 str(config.public_settings())):
        _assert_nothing_secret(text.replace(PASSWORD.replace("-", "%40"), PASSWORD))


CHECK_SAMPLE = [
    {"INTERNAL_SERVICE_API_KEY": KEY + "\n"},
    {"INTERNAL_SERVICE_API_KEY": KEY[:6] + "\u00e9" + KEY[6:]},
    {"INTERNAL_SERVICE_API_KEY": KEY[:6] + "\x1b" + KEY[6:]},
    {"WEBHOOK_SIGNING_SECRET": f"whsec_{MARKER}!!!"},
    {"DJANGO_APP_BACKEND_URL": f"http://svc:{PASSWORD}@127.0.0.1:8000"},
    {"CELERY_BROKER_URL": f"bogus://:{PASSWORD}@127.0.0.1:6379/0"},
    {"CELERY_RESULT_BACKEND": f"redis://:{PASSWORD}@127.0.0.1:99999/1"},
    {"CIRCUIT_BREAKER_REDIS_URL": f"http://:{PASSWORD}@127.0.0.1:6379"},
    {"WORKER_NAME": "\udcff"},
    {"ORGANIZATION_ID": "org\u2028"},
    {"METRICS_PORT": "\u0663"},
    {"API_TIMEOUT": "1e999", "TASK_TIME_LIMIT": "nan", "HEALTH_CHECK_INTERVAL": "inf"},
    {"API_RETRY_ATTEMPTS": "9" * 5000},
    {"LOG_LEVEL": "x" * 100_000},
    {"WORKER_DATA_DIR": "/proc/sys/swi-hostile"},
]


@pytest.mark.parametrize("variables", CHECK_SAMPLE, ids=lambda v: "+".join(v))
def test_check_refuses_with_exit_2_naming_the_variable(
    variables: dict[str, str], tmp_path: Path
) -> None:
    clean = {k: v for k, v in os.environ.items() if k.upper() not in _CONFIG_NAMES}
    env = {**clean, "PYTHONPATH": str(REPO), "INTERNAL_SERVICE_API_KEY": KEY,
           "WEBHOOK_SIGNING_SECRET": WEBHOOK_SECRET, **variables}
    result = subprocess.run(
        [sys.executable, "-m", "backend.workers.shared", "check"],
        env=env, cwd=tmp_path, capture_output=True, timeout=60, check=False,
    )
    out = (result.stdout + result.stderr).decode("utf-8", errors="backslashreplace")
    assert result.returncode == 2, out[:2000]
    assert "Traceback" not in out
    for name in variables:
        assert f"  {name}: " in out
    _assert_nothing_secret(out, MARKER)


@pytest.mark.parametrize("name", sorted(ACCEPTED.keys() - {"worker_data_dir"}))
def test_ascii_whitespace_at_the_ends_is_dropped(name: str) -> None:
    config = WorkerConfig(**_base(**{name: f" {MARKER}\r\n"}))
    value = getattr(config, name)
    assert value == ([MARKER.lower()] if isinstance(value, list) else MARKER)
