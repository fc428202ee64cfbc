"""``test_api.py``, ``test_hostile.py``, ``test_lifecycle_api.py``, ``test_resources.py`` and
``test_hostile_resources.py`` again, on PostgreSQL: a separate pytest session with its own
database.

pytest-django builds one test database per session from the settings, so the PostgreSQL run
is a child session with ``BACKEND_TEST_DATABASE_URL`` naming a database nobody else uses
(pytest-django creates ``test_<name>`` and drops it at the end): concurrent runs on this
machine never share one.
"""

from __future__ import annotations

import os
import secrets
import subprocess
import sys
from pathlib import Path

import pytest
from django.conf import settings

from tests.conftest import POSTGRES_ADMIN_URL

REPO_ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.postgres
def test_api_suite_passes_on_postgresql() -> None:
    name = f"api_{os.getpid()}_{secrets.token_hex(4)}"
    env = dict(os.environ)
    url = f"{POSTGRES_ADMIN_URL.rsplit('/', 1)[0]}/{name}"
    # The child's conftest loads the settings (this session's test key, the new database).
    env.pop("DJANGO_SETTINGS_MODULE", None)
    env.update(
        BACKEND_TEST_DATABASE_URL=url,
        INTERNAL_SERVICE_API_KEY=settings.INTERNAL_API_KEYS[0],
    )
    done = subprocess.run(
        [
            sys.executable, "-m", "pytest", "tests/backend/test_api.py",
            "tests/backend/test_hostile.py", "tests/backend/test_lifecycle_api.py",
            "tests/backend/test_resources.py", "tests/backend/test_hostile_resources.py",
            "-q", "-p", "no:cacheprovider", "--create-db",
        ],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )  # fmt: skip
    summary = done.stdout.strip().splitlines()[-1] if done.stdout.strip() else ""
    assert done.returncode == 0, f"{done.stdout[-6000:]}\n{done.stderr[-3000:]}"
    assert " passed" in summary and "skipped" not in summary, summary
