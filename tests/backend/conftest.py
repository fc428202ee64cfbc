"""pytest-django set-up for the backend tests (loaded only when tests/backend is collected).

Settings module ``backend.settings``; the API key is the suite's recognisable test key; the
database is SQLite unless ``BACKEND_TEST_DATABASE_URL`` names another (the PostgreSQL run of
``test_api.py`` sets it to a database of its own, see ``test_api_postgres.py``).
"""

from __future__ import annotations

import os
import tempfile
import uuid
from collections.abc import Callable
from typing import Any

import pytest

from tests.live_backend import TEST_KEY_PREFIX, make_test_key


def pytest_configure(config: pytest.Config) -> None:
    """Load the backend settings with the test key and a scratch database, set Django up.

    The variables are set only while the settings load, then put back: other suites of the
    same session (tests/e2e) and their subprocesses see the environment they were given.
    """
    os.environ["DJANGO_SETTINGS_MODULE"] = "backend.settings"
    scratch = tempfile.mkdtemp(prefix="backend-tests-")
    key = os.environ.get("INTERNAL_SERVICE_API_KEY", "")
    loading = {
        "INTERNAL_SERVICE_API_KEY": key if key.startswith(TEST_KEY_PREFIX) else make_test_key(),
        "BACKEND_DATA_DIR": scratch,
        "WORKER_DATA_DIR": scratch,  # the embedded broker the backend publishes to
        "DATABASE_URL": os.environ.get(
            "BACKEND_TEST_DATABASE_URL", f"sqlite:///{scratch}/backend.sqlite3"
        ),
    }
    saved = {name: os.environ.get(name) for name in loading}
    os.environ.update(loading)
    try:
        import django

        django.setup()
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


@pytest.fixture
def api_key() -> str:
    """The key the backend under test accepts."""
    from django.conf import settings

    return str(settings.INTERNAL_API_KEYS[0])


@pytest.fixture
def make_org(db: None) -> Callable[[], str]:
    """Creates organizations with unique ids (the view's org cache never sees a reused id)."""
    from backend.internal_api.models import Organization

    def make() -> str:
        return str(Organization.objects.create(pk=f"org-{uuid.uuid4().hex[:12]}").pk)

    return make


@pytest.fixture
def org(make_org: Callable[[], str]) -> str:
    """One organization for the test."""
    return make_org()


class Api:
    """The Django test client with the API's headers filled in; JSON in, response out."""

    def __init__(self, client: Any, api_key: str, org_id: str) -> None:
        self.client = client
        self.api_key = api_key
        self.org_id = org_id

    def headers(self, org_id: str | None = None, **extra: str) -> dict[str, str]:
        """Authorization and organization headers, plus any extra ones."""
        return {
            "Authorization": f"Bearer {self.api_key}",
            "X-Organization-ID": org_id or self.org_id,
            **extra,
        }

    def call(
        self,
        method: str,
        path: str,
        body: Any = None,
        *,
        org_id: str | None = None,
        headers: dict[str, str] | None = None,
        raw: bytes | str | None = None,
        content_type: str = "application/json",
    ) -> Any:
        """Send one request to ``/internal/v1/<path>``."""
        import json

        data: Any = raw if raw is not None else (json.dumps(body) if body is not None else None)
        kwargs: dict[str, Any] = {"headers": self.headers(org_id) if headers is None else headers}
        if data is not None:
            kwargs.update(data=data, content_type=content_type)
        return getattr(self.client, method.lower())(f"/internal/v1/{path}", **kwargs)


@pytest.fixture
def api(client: Any, api_key: str, org: str) -> Api:
    """An API caller for ``org``."""
    return Api(client, api_key, org)
