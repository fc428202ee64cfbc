"""The backend README's "How a team adds its own" example runs as written.

Its Python block is cut where its comments say (``# models.py``, ``# api.py``,
``# backend/internal_api/urls.py``) into a temporary Django app ``invoices`` beside a settings
module that adds it to the backend's; the urls part is appended to a copy of
``backend/internal_api/urls.py`` (its ``...`` are the patterns already there).
``manage.py makemigrations`` writes the app's migration, and the real backend (gunicorn)
serves it; the worker's client then uses ``client.resource("invoices")`` as the README says.
"""

from __future__ import annotations

import json
import re
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from backend.workers.shared import (
    APIValidationError,
    ConflictError,
    InternalAPIClient,
    InternalAPIError,
)
from tests.e2e.harness import REPO_ROOT, client_config
from tests.e2e.readme_snippets import code_blocks
from tests.live_backend import LiveBackend

pytestmark = pytest.mark.timeout(180)

README = REPO_ROOT / "backend" / "internal_api" / "README.md"
APP = "invoices"
SETTINGS = f"""
from backend.settings import *  # noqa: F403 - the backend's settings, plus the team's app

INSTALLED_APPS = [*INSTALLED_APPS, {APP!r}]  # noqa: F405
ROOT_URLCONF = "invoice_urls"
"""
OPERATIONS = {"invoices_list", "invoices_create", "invoices_read", "invoices_update",
              "invoices_batch"}


def example_parts() -> dict[str, str]:
    """The README example's parts by the file its comment names: ``models.py``, ``api.py``
    and ``urls.py``, each the lines from its comment to the next part's."""
    (block,) = [b.text for b in code_blocks(README)
                if b.language == "python" and "INVOICES = Resource(" in b.text]
    parts: dict[str, list[str]] = {}
    current: list[str] = []
    for line in block.splitlines():
        named = re.match(r"# (?:\S+/)?(models|api|urls)\.py\b", line)
        if named:
            current = parts.setdefault(f"{named.group(1)}.py", [])
        current.append(line)
    assert set(parts) == {"models.py", "api.py", "urls.py"}, sorted(parts)
    return {name: "\n".join(lines) + "\n" for name, lines in parts.items()}


def write_project(folder: Path) -> None:
    """The team's app, its settings and URL modules in ``folder`` (on ``PYTHONPATH``)."""
    parts = example_parts()
    app = folder / APP
    app.mkdir()
    (app / "__init__.py").write_text("")
    (app / "models.py").write_text(parts["models.py"])
    (app / "api.py").write_text(parts["api.py"])
    (folder / "invoice_settings.py").write_text(SETTINGS)
    # The team's edit of backend/internal_api/urls.py: the README's part appended to it.
    urls_part = parts["urls.py"].replace("[...,", "[*urlpatterns,", 1)
    assert urls_part != parts["urls.py"], "the urls part extends the patterns already there"
    internal_urls = (REPO_ROOT / "backend" / "internal_api" / "urls.py").read_text()
    (folder / "invoice_api_urls.py").write_text(f"{internal_urls}\n{urls_part}")
    root_urls = (REPO_ROOT / "backend" / "urls.py").read_text()
    mounted = 'include("backend.internal_api.urls")'
    assert mounted in root_urls
    (folder / "invoice_urls.py").write_text(
        root_urls.replace(mounted, 'include("invoice_api_urls")'))


@pytest.fixture(scope="module")
def invoices_backend(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveBackend]:
    """The real backend serving the README's invoices (SQLite: the declared resources' own
    suites run on both databases), its migration made first by ``manage.py makemigrations``."""
    folder = tmp_path_factory.mktemp("invoices-project")
    write_project(folder)
    backend = LiveBackend(data_dir=folder / "data", extra_env={
        "DJANGO_SETTINGS_MODULE": "invoice_settings",
        "PYTHONPATH": f"{folder}:{REPO_ROOT}",
    })
    try:
        made = backend.manage("makemigrations", APP)
        assert "Create model Invoice" in made, made
        yield backend.start()
    finally:
        backend.close()


@pytest.fixture
def client(invoices_backend: LiveBackend) -> Iterator[InternalAPIClient]:
    """A client of the backend's organization."""
    config = client_config(invoices_backend, invoices_backend.org_id)
    with InternalAPIClient(config) as client:
        yield client


def answers_to(backend: LiveBackend, method: str, path: str) -> list[int]:
    """The statuses the backend's access lines record for ``method path``, in order."""
    statuses = []
    for line in backend.logs().splitlines():
        if not line.startswith("{"):
            continue
        entry = json.loads(line)
        if entry.get("method") == method and entry.get("path") == path:
            statuses.append(int(entry["status"]))
    return statuses


def test_invoices_are_created_listed_read_and_moved(
    invoices_backend: LiveBackend, client: InternalAPIClient
) -> None:
    invoices = client.resource("invoices")
    execution = client.create_workflow_execution(f"wf-invoice-{uuid.uuid4().hex[:8]}")
    created = invoices.create(execution_id=execution.id, number="INV-1")
    assert created["status"] == "OPEN" and created["number"] == "INV-1"
    assert created["organization_id"] == invoices_backend.org_id
    assert created["execution_id"] == str(execution.id)

    open_numbers = [i["number"] for i in invoices.list(status="OPEN")]
    assert "INV-1" in open_numbers
    assert "INV-1" not in [i["number"] for i in invoices.list(status="PAID")]

    path = f"/internal/v1/invoices/{created['id']}/"
    first, second = invoices.get(created["id"]), invoices.get(created["id"])
    assert first == second == created
    assert answers_to(invoices_backend, "GET", path) == [304, 304]  # the create's copy kept

    paid = invoices.update(created["id"], status="PAID", if_match=second.etag)
    assert paid["status"] == "PAID" and paid.etag != second.etag
    assert invoices.get(created["id"])["status"] == "PAID"
    with pytest.raises(ConflictError) as illegal:
        invoices.update(created["id"], status="VOID")
    assert (illegal.value.status, illegal.value.error_code) == (409, "illegal_transition")
    assert invoices.get(created["id"])["status"] == "PAID"

    batch = invoices.batch([{"execution_id": execution.id, "number": f"INV-{n}"}
                            for n in (2, 3)])
    assert [(i["number"], i["status"]) for i in batch] == [("INV-2", "OPEN"), ("INV-3", "OPEN")]
    assert {"INV-2", "INV-3"} <= {i["number"] for i in invoices.list(status="OPEN")}


def test_another_organizations_execution_is_refused(
    invoices_backend: LiveBackend, client: InternalAPIClient
) -> None:
    other = f"org-other-{uuid.uuid4().hex[:8]}"
    invoices_backend.create_organization(other)
    foreign = client.create_workflow_execution("wf-foreign", organization_id=other)
    invoices = client.resource("invoices")
    with pytest.raises(APIValidationError) as refused:
        invoices.create(execution_id=foreign.id, number="INV-X")
    assert refused.value.status == 400
    assert refused.value.detail == "execution_id: no such workflow execution"
    with pytest.raises(APIValidationError) as in_batch:
        invoices.batch([{"execution_id": foreign.id, "number": "INV-Y"}])
    assert in_batch.value.detail == "items[0].execution_id: no such workflow execution"
    assert not [i for i in invoices.list() if i["number"] in ("INV-X", "INV-Y")]


def test_delete_is_not_served_and_the_schema_names_the_operations(
    invoices_backend: LiveBackend, client: InternalAPIClient
) -> None:
    invoices = client.resource("invoices")
    execution = client.create_workflow_execution("wf-invoice-delete")
    created = invoices.create(execution_id=execution.id, number="INV-D")
    with pytest.raises(InternalAPIError) as refused:
        invoices.delete(created["id"])
    assert refused.value.status == 405
    assert invoices.get(created["id"])["number"] == "INV-D"

    request = urllib.request.Request(f"{invoices_backend.url}/internal/v1/schema/?format=json",
                                     headers=invoices_backend.headers())
    with urllib.request.urlopen(request, timeout=15) as answer:
        schema: dict[str, Any] = json.load(answer)
    operations = {operation["operationId"] for name, item in schema["paths"].items()
                  if name.startswith("/internal/v1/invoices/") for operation in item.values()}
    assert operations == OPERATIONS
