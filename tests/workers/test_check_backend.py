"""``python -m backend.workers.shared check``: the backend part says which of URL, key,
organization or network is wrong (exit 1), 2 for an invalid configuration, 0 when all work."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from backend.workers.shared.config import WorkerConfig
from tests.fault_server import FaultServer, Respond
from tests.live_backend import LiveBackend

REPO = Path(__file__).resolve().parents[2]
_CONFIG_NAMES = {f.upper() for f in WorkerConfig.model_fields} | {"ENV_FILE"}


def run_check(env_vars: dict[str, str], cwd: Path) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if k.upper() not in _CONFIG_NAMES}
    return subprocess.run(
        [sys.executable, "-m", "backend.workers.shared", "check"],
        env={**clean, "PYTHONPATH": str(REPO), "API_TIMEOUT": "5", **env_vars},
        cwd=cwd, capture_output=True, text=True, timeout=60, check=False,
    )


@pytest.fixture
def good_env(live_backend: LiveBackend) -> dict[str, str]:
    return {
        "INTERNAL_SERVICE_API_KEY": live_backend.api_key,
        "DJANGO_APP_BACKEND_URL": live_backend.url,
        "ORGANIZATION_ID": live_backend.org_id,
    }


@pytest.fixture
def not_the_backend() -> Iterator[FaultServer]:
    with FaultServer(default=Respond(404, "<html>Welcome to some other site</html>")) as server:
        yield server


def test_all_good(good_env: dict[str, str], tmp_path: Path, live_backend: LiveBackend) -> None:
    result = run_check(good_env, tmp_path)
    assert result.returncode == 0, result.stderr
    assert "backend OK" in result.stdout and "organization OK" in result.stdout
    assert live_backend.api_key not in result.stdout + result.stderr


def test_no_organization_is_only_a_note(good_env: dict[str, str], tmp_path: Path) -> None:
    result = run_check({**good_env, "ORGANIZATION_ID": ""}, tmp_path)
    assert result.returncode == 0, result.stderr
    assert "ORGANIZATION_ID is not set" in result.stdout


def test_wrong_key(good_env: dict[str, str], tmp_path: Path) -> None:
    wrong = "swi-wrong-key-does-not-exist"
    result = run_check({**good_env, "INTERNAL_SERVICE_API_KEY": wrong}, tmp_path)
    assert result.returncode == 1
    assert result.stderr.startswith("KEY:") and "INTERNAL_SERVICE_API_KEY" in result.stderr
    assert wrong not in result.stdout + result.stderr


def test_unknown_organization(good_env: dict[str, str], tmp_path: Path) -> None:
    result = run_check({**good_env, "ORGANIZATION_ID": "org-nobody-knows"}, tmp_path)
    assert result.returncode == 1
    assert result.stderr.startswith("ORGANIZATION:") and "org-nobody-knows" in result.stderr
    assert "backend OK" in result.stdout


def test_nothing_listening(good_env: dict[str, str], tmp_path: Path) -> None:
    with FaultServer() as gone:
        url = gone.url
    result = run_check({**good_env, "DJANGO_APP_BACKEND_URL": url}, tmp_path)
    assert result.returncode == 1
    assert result.stderr.startswith("NETWORK:") and "DJANGO_APP_BACKEND_URL" in result.stderr


def test_url_of_something_else(good_env: dict[str, str], tmp_path: Path,
                               not_the_backend: FaultServer) -> None:
    result = run_check({**good_env, "DJANGO_APP_BACKEND_URL": not_the_backend.url}, tmp_path)
    assert result.returncode == 1
    assert result.stderr.startswith("URL:") and "DJANGO_APP_BACKEND_URL" in result.stderr


def test_invalid_configuration_is_exit_2(good_env: dict[str, str], tmp_path: Path) -> None:
    result = run_check({**good_env, "DJANGO_APP_BACKEND_URL": "ftp://nope"}, tmp_path)
    assert result.returncode == 2
    assert "DJANGO_APP_BACKEND_URL" in result.stderr


def test_worker_name_unusable_in_a_header_is_exit_2(good_env: dict[str, str],
                                                    tmp_path: Path) -> None:
    result = run_check({**good_env, "WORKER_NAME": "travailleur-\u00e9"}, tmp_path)
    assert result.returncode == 2
    assert "WORKER_NAME" in result.stderr and "Traceback" not in result.stderr
