"""``python -m backend.workers.shared check``: the backend part says which of URL, key,
organization or network is wrong (exit 1), 2 for an invalid configuration, 0 when all work."""

from __future__ import annotations

import os
import socket
import ssl
import subprocess
import sys
import threading
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


# --- the scheme does not match what the backend's port speaks (issue 9) ------------------


def test_https_url_to_a_plain_http_backend(
    good_env: dict[str, str], tmp_path: Path, live_backend: LiveBackend
) -> None:
    https_url = live_backend.url.replace("http://", "https://")
    result = run_check({**good_env, "DJANGO_APP_BACKEND_URL": https_url}, tmp_path)
    assert result.returncode == 1
    assert result.stderr.startswith("NETWORK:")
    assert "speaks plain HTTP, not TLS" in result.stderr
    assert f"write DJANGO_APP_BACKEND_URL={live_backend.url}" in result.stderr


@pytest.fixture
def tls_server(tmp_path: Path) -> Iterator[str]:
    """A TLS server on loopback (self-signed) that answers nothing: an http:// URL's target."""
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
         "-nodes", "-keyout", str(key), "-out", str(cert), "-days", "1", "-subj", "/CN=localhost"],
        check=True, capture_output=True, timeout=60,
    )
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    listener = socket.create_server(("127.0.0.1", 0))
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            try:
                with context.wrap_socket(conn, server_side=True) as tls:
                    tls.settimeout(5)
                    tls.recv(1024)
            except (OSError, ssl.SSLError):
                conn.close()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{listener.getsockname()[1]}"
    finally:
        stop.set()
        listener.close()
        thread.join(10)


def test_http_url_to_a_tls_port(good_env: dict[str, str], tmp_path: Path, tls_server: str) -> None:
    result = run_check({**good_env, "DJANGO_APP_BACKEND_URL": tls_server}, tmp_path)
    assert result.returncode == 1
    assert result.stderr.startswith("NETWORK:")
    assert "speaks TLS, not plain HTTP" in result.stderr
    assert "write DJANGO_APP_BACKEND_URL=" + tls_server.replace("http", "https") in result.stderr


def test_nothing_listening_gets_no_scheme_hint(good_env: dict[str, str], tmp_path: Path) -> None:
    with FaultServer() as gone:
        url = gone.url.replace("http://", "https://")
    result = run_check({**good_env, "DJANGO_APP_BACKEND_URL": url}, tmp_path)
    assert result.returncode == 1
    assert "Is the backend running" in result.stderr and "speaks" not in result.stderr


def test_the_verdict_comes_last_when_both_streams_share_one_output(
    good_env: dict[str, str], tmp_path: Path, live_backend: LiveBackend
) -> None:
    https_url = live_backend.url.replace("http://", "https://")
    clean = {k: v for k, v in os.environ.items()
             if k.upper() not in _CONFIG_NAMES and k != "PYTHONUNBUFFERED"}  # as in a shell
    result = subprocess.run(
        [sys.executable, "-m", "backend.workers.shared", "check"],
        env={**clean, "PYTHONPATH": str(REPO), "API_TIMEOUT": "5", **good_env,
             "DJANGO_APP_BACKEND_URL": https_url},
        cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=60,
        check=False,
    )
    lines = result.stdout.strip().splitlines()
    assert result.returncode == 1
    assert lines[-1].startswith("NETWORK:"), lines[-3:]
    assert lines[0] == "{" and "configuration OK" in lines[:-1]
