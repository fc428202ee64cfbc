"""``INTERNAL_SERVICE_API_KEY`` as the backend reads it at start, in real processes.

A key that holds a character no ``Authorization`` header can carry is refused by every entry
point (``manage.py`` and gunicorn exit 2) with one line naming the variable and the key's
position, never the value; ASCII whitespace around a key is not part of it.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from tests.live_backend import REPO_ROOT, backend_python

SECRET = "swi-settings-Zq81xV"
REFUSED: list[tuple[str, bytes, str]] = [
    ("control character inside", f"{SECRET}\x01x".encode(), "key 1 of 1"),
    ("escape sequence", f"{SECRET}\x1b[31m".encode(), "key 1 of 1"),
    ("DEL", f"{SECRET}\x7f".encode(), "key 1 of 1"),
    ("tab inside", f"{SECRET}\tx".encode(), "key 1 of 1"),
    ("newline inside", f"{SECRET}\nx".encode(), "key 1 of 1"),
    ("carriage return inside", f"{SECRET}\rx".encode(), "key 1 of 1"),
    ("space inside", f"{SECRET} x".encode(), "key 1 of 1"),
    ("non-ASCII letter", f"{SECRET}é".encode(), "key 1 of 1"),
    ("non-ASCII digit", f"{SECRET}²".encode(), "key 1 of 1"),
    ("zero-width space", f"{SECRET}\u200b".encode(), "key 1 of 1"),
    ("no-break space at the end", f"{SECRET}\u00a0".encode(), "key 1 of 1"),
    ("next line (U+0085) at the end", f"{SECRET}\u0085".encode(), "key 1 of 1"),
    ("ideographic space at the start", f"\u3000{SECRET}".encode(), "key 1 of 1"),
    ("bytes that are not UTF-8", SECRET.encode() + b"\xff\xfe", "key 1 of 1"),
    ("second of two keys", f"good-key-1,{SECRET}\x02".encode(), "key 2 of 2"),
    ("third of three keys", f"a,b,{SECRET}\u00e9".encode(), "key 3 of 3"),
]
ACCEPTED: list[tuple[str, bytes]] = [
    ("plain", SECRET.encode()),
    ("trailing newline (ASCII whitespace around a key)", f"{SECRET}\n".encode()),
    ("spaces and tabs around keys", f" \t{SECRET} , other-key\r\n".encode()),
    ("every printable ASCII character but the comma", bytes(range(0x21, 0x7F)).replace(b",", b"")),
]


def _env(tmp_path: Path, key: bytes) -> dict[bytes, bytes]:
    env = {k: v for k, v in os.environb.items() if k != b"INTERNAL_SERVICE_API_KEY"}
    env[b"INTERNAL_SERVICE_API_KEY"] = key
    env[b"DATABASE_URL"] = f"sqlite:///{tmp_path}/db.sqlite3".encode()
    env[b"BACKEND_DATA_DIR"] = str(tmp_path).encode()
    return env


def _check(tmp_path: Path, key: bytes) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        [backend_python(), "manage.py", "check"],
        cwd=REPO_ROOT, env=_env(tmp_path, key), capture_output=True, timeout=60, check=False,
    )  # fmt: skip


@pytest.mark.parametrize(("case", "key", "position"), REFUSED, ids=[c[0] for c in REFUSED])
def test_a_key_with_a_character_a_header_cannot_carry_is_refused_at_start(
    case: str, key: bytes, position: str, tmp_path: Path
) -> None:
    done = _check(tmp_path, key)
    stderr = done.stderr.decode("utf-8", "backslashreplace")
    assert done.returncode == 2, stderr
    assert stderr.strip().count("\n") == 0, stderr
    assert stderr.startswith(f"backend: INTERNAL_SERVICE_API_KEY: {position} holds"), stderr
    assert "printable ASCII" in stderr
    assert SECRET not in stderr and SECRET.encode() not in done.stdout


@pytest.mark.parametrize(("case", "key"), ACCEPTED, ids=[c[0] for c in ACCEPTED])
def test_a_printable_ascii_key_is_accepted(case: str, key: bytes, tmp_path: Path) -> None:
    done = _check(tmp_path, key)
    assert done.returncode == 0, done.stderr.decode("utf-8", "backslashreplace")


def test_gunicorn_refuses_such_a_key_with_the_same_line(tmp_path: Path) -> None:
    done = subprocess.run(
        [
            backend_python(), "-m", "gunicorn", "-c", "python:backend.internal_api.gunicorn_conf",
            "--bind", "127.0.0.1:0", "--workers", "1",
        ],
        cwd=REPO_ROOT, env=_env(tmp_path, f"{SECRET}\x01".encode()), capture_output=True,
        timeout=60, check=False,
    )  # fmt: skip
    stderr = done.stderr.decode("utf-8", "backslashreplace")
    assert done.returncode == 2, stderr
    assert "backend: INTERNAL_SERVICE_API_KEY: key 1 of 1 holds" in stderr
    assert SECRET not in stderr
