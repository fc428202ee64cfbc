"""docs/migrating.md's two Celery tasks, executions per second: the ORM task against its
client twin, in one run against one backend (gunicorn, 2 ``gthread`` workers, PostgreSQL on
loopback, a fresh database dropped afterwards).

The guide's code blocks are taken as ``tests/e2e/test_migrating.py`` takes them, and run in
the environments it runs them in (the ORM task on this interpreter with the backend's settings
and database, the client task on the worker venv without Django), but with Celery's
``.apply()`` rather than through a broker and a worker (whose polling would be timed too),
each in one long-lived process that imports its task module once: only the loop over a
round's executions is timed. Every execution holds the e2e test's four files. Rounds
alternate the order of the two (the machine is shared and noisy); printed: the median
executions per second of each and the median ratio client / ORM.

Run: ``.venv/bin/python benchmarks/bench_migration.py``; needs PostgreSQL on 127.0.0.1:5432.
"""

from __future__ import annotations

import importlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import IO, Any

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

# The e2e test's extraction of the guide's blocks and its files, loaded at run time: a static
# import would have mypy check the test module, which mypy's configuration leaves out.
_E2E = importlib.import_module("tests.e2e.test_migrating")
FILES: list[dict[str, Any]] = _E2E.FILES
WORKER_PYTHON: Path = _E2E.WORKER_PYTHON

EXECUTIONS = 40
ROUNDS = 5
WARMUP = 5
# One process per task: imports its module once, then for each line of execution ids on stdin
# applies the task to each and answers the loop's seconds on a line of its own.
RUNNER = """
import json, sys, time
sys.path.insert(0, sys.argv[1])
module = __import__(sys.argv[2])
for line in sys.stdin:
    ids = json.loads(line)
    started = time.perf_counter()
    states = {module.process_files.apply(args=[i, sys.argv[3]]).state for i in ids}
    print("BENCH", time.perf_counter() - started, *states, flush=True)
"""


class Runner:
    """One task's long-lived process: ``run(ids)`` applies the task to each, timed inside."""

    def __init__(
        self, python: str, module: str, folder: Path, org: str, env: dict[str, str]
    ) -> None:
        self.module = module
        self._log = (folder / f"{module}.log").open("wb")
        self.proc = subprocess.Popen(
            [python, "-c", RUNNER, str(folder), module, org],
            env=env,
            cwd=folder,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._log,
            text=True,
        )

    def run(self, ids: list[str]) -> float:
        """Seconds the process took to run the task over ``ids``."""
        stdin: IO[str] | None = self.proc.stdin
        stdout: IO[str] | None = self.proc.stdout
        assert stdin is not None and stdout is not None
        stdin.write(json.dumps(ids) + "\n")
        stdin.flush()
        for line in stdout:  # the task's own log lines may come first
            if line.startswith("BENCH "):
                _, seconds, *states = line.split()
                if states != ["SUCCESS"]:
                    raise SystemExit(f"bench_migration: {self.module} ended {states}")
                return float(seconds)
        raise SystemExit(f"bench_migration: {self.module} exited (see {self._log.name})")

    def close(self) -> None:
        """End of input: the process ends."""
        if self.proc.stdin:
            self.proc.stdin.close()
        self.proc.wait(30)
        self._log.close()


def _executions(client: Any, count: int) -> list[str]:
    """``count`` new executions, each with the e2e test's files (one batch each)."""
    ids = []
    for n in range(count):
        execution = client.create_workflow_execution(f"bench-migrate-{n % 7}")
        client.resource("file-executions").batch(
            [{"execution_id": execution.id, **item} for item in FILES]
        )
        ids.append(execution.id)
    return ids


def main() -> None:
    """Measure and print."""
    from backend.workers.shared import InternalAPIClient
    from tests.conftest import service_up
    from tests.e2e.harness import client_config
    from tests.live_backend import LiveBackend

    if not service_up("postgres"):
        raise SystemExit("bench_migration: PostgreSQL is not running on 127.0.0.1:5432")
    orm_source, client_source = _E2E.guide_tasks()
    rates: dict[str, list[float]] = {"orm": [], "client": []}
    ratios: list[float] = []
    with (
        tempfile.TemporaryDirectory(prefix="bench-migration-") as folder,
        LiveBackend.postgres(workers=2, threads=8, log_level="WARNING") as backend,
    ):
        tmp = Path(folder)
        (tmp / "orm_tasks.py").write_text(orm_source)
        (tmp / "client_tasks.py").write_text(client_source)
        org = backend.org_id
        orm_env = {k: v for k, v in backend.env.items() if not k.startswith("LOG_")}
        worker_env = {
            k: v
            for k, v in os.environ.items()
            if k not in ("DJANGO_SETTINGS_MODULE", "DATABASE_URL")
        }
        worker_env.update(
            {
                "INTERNAL_SERVICE_API_KEY": backend.api_key,
                "DJANGO_APP_BACKEND_URL": backend.url,
                "ORGANIZATION_ID": org,
                "WORKER_DATA_DIR": folder,
                "PYTHONPATH": str(REPO_ROOT),
                "ENV_FILE": os.devnull,
                "LOG_LEVEL": "WARNING",
            }
        )
        python = str(WORKER_PYTHON) if WORKER_PYTHON.exists() else sys.executable
        runners = {
            "orm": Runner(sys.executable, "orm_tasks", tmp, org, orm_env),
            "client": Runner(python, "client_tasks", tmp, org, worker_env),
        }
        try:
            with InternalAPIClient(client_config(backend, org)) as client:
                for runner in runners.values():  # untimed: imports, first connections
                    runner.run(_executions(client, WARMUP))
                for round_no in range(ROUNDS):
                    order = ("orm", "client") if round_no % 2 == 0 else ("client", "orm")
                    pair: dict[str, float] = {}
                    for mode in order:
                        ids = _executions(client, EXECUTIONS)
                        pair[mode] = EXECUTIONS / runners[mode].run(ids)
                        rates[mode].append(pair[mode])
                    ratios.append(pair["client"] / pair["orm"])
                    print(
                        f"round {round_no + 1}/{ROUNDS}: orm {pair['orm']:.1f}/s, "
                        f"client {pair['client']:.1f}/s",
                        file=sys.stderr,
                        flush=True,
                    )
        finally:
            for runner in runners.values():
                runner.close()

    print(
        f"backend: gunicorn 2 gthread workers x 8 threads, PostgreSQL; median of {ROUNDS} "
        f"rounds of {EXECUTIONS} executions x {len(FILES)} files, Celery .apply()"
    )
    labels = {
        "orm": f"ORM task ({Path(sys.executable).parent.parent.name})",
        "client": f"client task ({Path(python).parent.parent.name})",
    }
    for mode, label in labels.items():
        print(f"  {label:<28}{statistics.median(rates[mode]):9.1f} executions/s")
    print(f"  {'client / ORM':<28}{statistics.median(ratios):9.2f} x")


if __name__ == "__main__":
    main()
