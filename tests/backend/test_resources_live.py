"""Declared resources under real concurrency: a gunicorn backend (SQLite, and PostgreSQL where
transactions really run at once), requests racing from threads over HTTP.

Two workers updating one file execution (or one workflow execution) with the same
``If-Match``: exactly one applies, the other gets 412 and re-reads. Concurrent batches of one
execution: its file counts are those of its files afterwards (each batch recounts in its own
transaction), also while claims, heartbeats, releases and status changes of the execution race
with them (PostgreSQL: no deadlock, no 5xx).
"""

from __future__ import annotations

import json
import random
import threading
import urllib.error
import urllib.request
from collections.abc import Callable
from functools import partial
from typing import Any

import pytest

from tests.live_backend import LiveBackend

BACKENDS = ["live_backend", pytest.param("live_backend_pg", marks=pytest.mark.postgres)]
ROUNDS = 5


def call(
    backend: LiveBackend, method: str, path: str, body: Any = None, **headers: str
) -> tuple[int, Any, str]:
    """One request; (status, parsed JSON body or None, ETag or "")."""
    request = urllib.request.Request(
        f"{backend.url}/internal/v1/{path}",
        data=json.dumps(body).encode() if body is not None else None,
        method=method,
        headers={**backend.headers(), "Content-Type": "application/json", **headers},
    )
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            raw = response.read()
            return response.status, json.loads(raw) if raw else None, response.headers["ETag"]
    except urllib.error.HTTPError as error:
        raw = error.read()
        return error.code, json.loads(raw) if raw else None, error.headers.get("ETag", "")


def race(backend: LiveBackend, requests: list[tuple[Any, ...]]) -> list[tuple[int, Any, str]]:
    """Send the requests (``(method, path, body, headers)``) at once, one thread each."""
    answers: list[Any] = [None] * len(requests)
    barrier = threading.Barrier(len(requests))

    def send(index: int) -> None:
        method, path, body, headers = requests[index]
        barrier.wait()
        answers[index] = call(backend, method, path, body, **headers)

    threads = [threading.Thread(target=send, args=(i,)) for i in range(len(requests))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return answers


def new_execution(backend: LiveBackend) -> str:
    code, body, _ = call(backend, "POST", "workflow-executions/", {"workflow_id": "race"})
    assert code == 201, body
    return str(body["id"])


@pytest.mark.parametrize("backend_fixture", BACKENDS)
@pytest.mark.parametrize("resource", ["file-executions", "workflow-executions"])
def test_of_two_updates_with_the_same_if_match_exactly_one_applies(
    backend_fixture: str, resource: str, request: pytest.FixtureRequest
) -> None:
    backend: LiveBackend = request.getfixturevalue(backend_fixture)
    execution_id = new_execution(backend)
    for _ in range(ROUNDS):
        if resource == "file-executions":
            body = {"execution_id": execution_id, "file_name": "f"}
            code, created, etag = call(backend, "POST", "file-executions/", body)
            assert code == 201 and etag, created
            path = f"file-executions/{created['id']}/"
        else:
            path = f"workflow-executions/{new_execution(backend)}/"
            code, _, etag = call(backend, "GET", path)
        updates = [
            ("PATCH", path, {"result": {"by": worker}}, {"If-Match": etag})
            for worker in ("a", "b")
        ]
        answers = race(backend, updates)
        assert sorted(code for code, _, _ in answers) == [200, 412], answers
        (winner,) = [body for code, body, _ in answers if code == 200]
        (loser,) = [body for code, body, _ in answers if code == 412]
        assert loser["error"] == "precondition_failed"
        # The loser re-reads: it sees the winner's write, and its version is the one answered.
        code, current, current_etag = call(backend, "GET", path)
        assert current == winner and current["result"] in ({"by": "a"}, {"by": "b"})
        code, _, _ = call(backend, "PATCH", path, {"result": None}, **{"If-Match": etag})
        assert code == 412
        code, _, _ = call(backend, "PATCH", path, {"result": None}, **{"If-Match": current_etag})
        assert code == 200


@pytest.mark.parametrize("backend_fixture", BACKENDS)
def test_each_of_racing_updates_is_answered_its_own_version(
    backend_fixture: str, request: pytest.FixtureRequest
) -> None:
    """A write's answer is read back under the row's lock: never another writer's version
    (whose ETag would let this writer's next If-Match pass over a change it never saw)."""
    backend: LiveBackend = request.getfixturevalue(backend_fixture)
    execution_id = new_execution(backend)
    body = {"execution_id": execution_id, "file_name": "f"}
    code, created, _ = call(backend, "POST", "file-executions/", body)
    assert code == 201, created
    path = f"file-executions/{created['id']}/"
    answered: list[tuple[str, str]] = []
    for round_ in range(3 * ROUNDS):
        names = [f"w{writer}-{round_}" for writer in range(12)]
        answers = race(backend, [("PATCH", path, {"file_name": name}, {}) for name in names])
        assert [code for code, _, _ in answers] == [200] * len(names), answers
        answered += [(name, answer["file_name"]) for name, (_, answer, _) in
                     zip(names, answers, strict=True)]
    assert [pair for pair in answered if pair[0] != pair[1]] == []


@pytest.mark.parametrize("backend_fixture", BACKENDS)
def test_concurrent_batches_keep_the_execution_counts_true(
    backend_fixture: str, request: pytest.FixtureRequest
) -> None:
    backend: LiveBackend = request.getfixturevalue(backend_fixture)
    execution_id = new_execution(backend)
    batches = [
        (
            "POST",
            "file-executions/batch/",
            {
                "items": [
                    {"execution_id": execution_id, "file_name": f"{b}-{i}", "status": status}
                    for i, status in enumerate(["COMPLETED", "ERROR", "SKIPPED", "PENDING"] * 5)
                ]
            },
            {},
        )
        for b in range(4)
    ]
    answers = race(backend, batches)
    assert [code for code, _, _ in answers] == [200] * 4, answers
    _, execution, _ = call(backend, "GET", f"workflow-executions/{execution_id}/")
    assert (execution["total_files"], execution["successful_files"]) == (80, 20)
    assert execution["failed_files"] == 20


FINAL = ["COMPLETED", "ERROR", "SKIPPED", "IN_PROGRESS"]


def file_rounds(
    backend: LiveBackend, execution_id: str, thread: int, last: threading.Barrier
) -> dict[str, str]:
    """One writer of files: rounds of a batch creating files ``PENDING`` and a batch moving
    them on (and creating more, ``COMPLETED``), the last one sent with the other writers'
    (``last``: the final recounts race too); every batch must be a 200. Returns the final
    status of each file it wrote."""
    statuses: dict[str, str] = {}
    for round_ in range(4):
        items = [{"execution_id": execution_id, "file_name": f"{thread}-{round_}-{i}"}
                 for i in range(10)]
        code, body, _ = call(backend, "POST", "file-executions/batch/", {"items": items})
        assert code == 200, body
        moves = [{"id": row["id"], "status": FINAL[i % 4]}
                 for i, row in enumerate(body["results"])]
        more = [{"execution_id": execution_id, "file_name": f"{thread}-{round_}-late-{i}",
                 "status": "COMPLETED"} for i in range(3)]
        if round_ == 3:
            last.wait(timeout=120)
        code, moved, _ = call(backend, "POST", "file-executions/batch/",
                              {"items": [*moves, *more]})
        assert code == 200, moved
        statuses.update({row["id"]: row["status"] for row in moved["results"]})
    return statuses


def lifecycle_rounds(backend: LiveBackend, execution_id: str, thread: int) -> list[int]:
    """One worker of the execution: claims (409 while another holds the lease), heartbeats,
    status changes and releases, in a random order of its own; the statuses answered."""
    path = f"workflow-executions/{execution_id}/"
    chance = random.Random(thread)
    codes = []
    for _ in range(12):
        code, claimed, _ = call(backend, "POST", f"{path}claim/", {"worker": f"w{thread}"})
        codes.append(code)
        if code != 200:
            code, _, _ = call(backend, "POST", f"{path}status/", {"status": "IN_PROGRESS"})
            codes.append(code)
            continue
        epoch = {"epoch": claimed["lease"]["epoch"]}
        steps = [("heartbeat/", epoch), ("status/", {"status": "IN_PROGRESS"})]
        chance.shuffle(steps)
        for step, body in [*steps, ("release/", {**epoch, "retry_in": 0})]:
            code, _, _ = call(backend, "POST", f"{path}{step}", body)
            codes.append(code)
    return codes


@pytest.mark.postgres
def test_file_batches_racing_the_execution_s_lifecycle_keep_the_counts_true(
    live_backend_pg: LiveBackend,
) -> None:
    backend = live_backend_pg
    log_start = len(backend.logs())
    execution_id = new_execution(backend)
    files: dict[str, str] = {}
    codes: list[int] = []
    problems: list[BaseException] = []
    barrier, last = threading.Barrier(10), threading.Barrier(6)

    def run(work: Callable[[], Any]) -> None:
        barrier.wait()
        try:
            outcome = work()
        except BaseException as problem:  # reported below, with every thread joined
            problems.append(problem)
            last.abort()  # no writer waits for one that failed
            return
        if isinstance(outcome, dict):
            files.update(outcome)
        else:
            codes.extend(outcome)

    works = [partial(file_rounds, backend, execution_id, t, last) for t in range(6)]
    works += [partial(lifecycle_rounds, backend, execution_id, t) for t in range(4)]
    threads = [threading.Thread(target=run, args=(work,)) for work in works]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not problems, problems
    # A claim while another worker holds the lease is 409 lease_held; a worker's later step
    # after its lease was taken over would be 409 lease_lost. Nothing else.
    assert set(codes) <= {200, 409} and 200 in codes, sorted(set(codes))
    assert len(files) == 6 * 4 * 13
    _, execution, _ = call(backend, "GET", f"workflow-executions/{execution_id}/")
    expected = (
        len(files),
        sum(status == "COMPLETED" for status in files.values()),
        sum(status == "ERROR" for status in files.values()),
    )
    found = (execution["total_files"], execution["successful_files"], execution["failed_files"])
    assert found == expected
    # The counts are those of the files as stored, too (one page: limit 500).
    code, page, _ = call(backend, "GET", f"file-executions/?execution_id={execution_id}&limit=500")
    assert code == 200 and {row["id"]: row["status"] for row in page["results"]} == files
    assert "deadlock" not in backend.logs()[log_start:].lower()
