"""``config.logging_settings()``: LOG_LEVEL and LOG_FORMAT read as WorkerConfig reads them, for
the Celery wiring that sets up logging in a worker that built no WorkerConfig (and in a real
``celery worker`` whose module configures nothing)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from backend.workers.shared import ConfigurationError, WorkerConfig
from backend.workers.shared.config import logging_settings

REPO = Path(__file__).resolve().parents[2]

GOOD = [
    ({}, ("INFO", "structured")),
    ({"LOG_LEVEL": "", "LOG_FORMAT": ""}, ("INFO", "structured")),
    ({"LOG_LEVEL": "debug", "LOG_FORMAT": "SIMPLE"}, ("DEBUG", "simple")),
    ({"LOG_LEVEL": " warning\t", "LOG_FORMAT": " structured "}, ("WARNING", "structured")),
]
BAD_VALUES = [
    "verbose", "json", "INFO\x01", "\x1b[31mINFO", "IN\nFO", "\uff29\uff2e\uff26\uff2f",
    "\u0130nfo", "\udcff", "\u200bINFO", "INFO" * 10_000, "10", "\u0663", "true",
]


@pytest.mark.parametrize(("environ", "expected"), GOOD)
def test_good_values_read_as_worker_config_reads_them(
    monkeypatch: pytest.MonkeyPatch, environ: dict[str, str], expected: tuple[str, str]
) -> None:
    monkeypatch.delenv("LOG_LEVEL", raising=False)
    monkeypatch.delenv("LOG_FORMAT", raising=False)
    monkeypatch.delenv("ENV_FILE", raising=False)
    for name, value in environ.items():
        monkeypatch.setenv(name, value)
    assert logging_settings() == expected
    if all(environ.values()):
        config = WorkerConfig(internal_service_api_key="k", _env_file=None)
        assert (config.log_level, config.log_format) == expected


@pytest.mark.parametrize("name", ["LOG_LEVEL", "LOG_FORMAT"])
@pytest.mark.parametrize("value", BAD_VALUES)
def test_a_bad_value_is_refused_naming_the_variable(
    monkeypatch: pytest.MonkeyPatch, name: str, value: str
) -> None:
    monkeypatch.setenv(name, value)
    with pytest.raises(ConfigurationError) as caught:
        logging_settings()
    assert list(caught.value.problems) == [name]
    message = str(caught.value)
    assert "must be one of" in message and len(message) < 300
    with pytest.raises(ConfigurationError) as by_config:
        WorkerConfig(internal_service_api_key="k", _env_file=None)
    assert name in by_config.value.problems  # the same verdict


def test_a_celery_worker_that_configures_nothing_names_the_bad_variable(tmp_path: Path) -> None:
    (tmp_path / "bare.py").write_text(textwrap.dedent("""
        from celery import Celery
        from backend.workers.shared import ExecutionTask, _celery
        app = Celery('bare', broker='memory://')
        _celery.install()
    """))
    env = {**os.environ, "LOG_FORMAT": "json",
           "PYTHONPATH": os.pathsep.join([str(tmp_path), str(REPO)])}
    done = subprocess.run([sys.executable, "-m", "celery", "-A", "bare", "worker", "--pool",
                           "solo"], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=60)
    assert done.returncode != 0
    assert "LOG_FORMAT: must be one of structured, simple (got 'json')" in done.stderr


READY_MODULE = """
import logging, os, sys
from celery import Celery, signals
from backend.workers.shared import _celery
app = Celery('levels', broker='memory://')
_celery.install()

@signals.worker_ready.connect
def _ready(**_):
    logging.getLogger('probe').info('probe ready')
    logging.getLogger('probe').warning('probe warning')
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    os._exit(0)
"""


@pytest.mark.parametrize(
    ("log_level", "options", "info_shown"),
    [
        ("INFO", [], True),  # LOG_LEVEL, since no --loglevel was given
        ("WARNING", [], False),
        ("WARNING", ["--loglevel", "INFO"], True),  # an explicit --loglevel wins
        ("INFO", ["--loglevel", "WARNING"], False),
    ],
)
def test_log_level_in_a_celery_worker_that_configures_nothing(
    tmp_path: Path, log_level: str, options: list[str], info_shown: bool
) -> None:
    (tmp_path / "levels.py").write_text(textwrap.dedent(READY_MODULE))
    env = {**os.environ, "LOG_LEVEL": log_level,
           "PYTHONPATH": os.pathsep.join([str(tmp_path), str(REPO)])}
    done = subprocess.run([sys.executable, "-m", "celery", "-A", "levels", "worker", "--pool",
                           "solo", *options], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=60)
    output = done.stdout + done.stderr
    assert "probe warning" in output, output[-2000:]
    assert ("probe ready" in output) is info_shown
