"""Footprint, start-up and throughput of the example worker against two baselines, in one run.

Workers, all ``celery worker`` prefork with 4 processes on the same Redis broker:

(a) the example worker (``backend.workers.shared.example_worker``), reaching the backend
    over HTTP;
(b) a bare Celery worker with a no-op task (the floor any Celery worker pays);
(c) a worker that sets up the Django backend and does the example task's work through
    the ORM (the same ``apply_status`` transitions the backend applies);
(b2) for comparison, (b) with the one memory measure every worker of ours gets (``gc.freeze()``
    before the pool forks).

Printed: total PSS (main process plus children, from ``/proc/<pid>/smaps_rollup``), idle
after start and again after the throughput rounds, and time from launch to Celery's "ready"
line for each; end to end executions per second for (a) and (c) against gunicorn +
PostgreSQL, in alternating rounds (the median of each); the imports that cost most in
``python -X importtime`` of the example worker. Targets: PSS(a) <= 1.2 x PSS(b), PSS(a) <
PSS(c), throughput(a) / throughput(c) >= 1.2 (issue 10: the example worker claims, finishes
in one call, and that is all it asks of the backend).

Needs Redis and PostgreSQL on localhost. Run: ``.venv/bin/python benchmarks/bench_worker.py``.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
import uuid
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from tests.conftest import free_port, service_up  # noqa: E402
from tests.live_backend import LiveBackend  # noqa: E402

CONCURRENCY = 4
# Workers (a) and (b) run with what a worker-only install has (``pip install .``, no Django,
# none of the test tools' extras such as rich): the worker venv when there is one.
WORKER_PYTHON = os.environ.get("WORKER_PYTHON") or next(
    (str(p) for p in [REPO_ROOT / ".venv-worker" / "bin" / "python"] if p.exists()),
    sys.executable,
)
EXECUTIONS = 300
ROUNDS = 5
WARMUP = 50
TARGET_THROUGHPUT_RATIO = 1.2
IDLE_SETTLE = 3.0
BROKER = "redis://127.0.0.1:6379/14"

COMMON_CONF = """
CONF = {
    "broker_url": os.environ["CELERY_BROKER_URL"],
    "task_serializer": "json", "accept_content": ["json"],
    "task_acks_late": True, "task_reject_on_worker_lost": True,
    "worker_prefetch_multiplier": 1, "worker_concurrency": 4,
    "task_default_queue": os.environ["WORKER_NAME"], "task_ignore_result": True,
    "worker_send_task_events": False,
}
"""

BARE_WORKER = """
import os
from celery import Celery
{conf}
app = Celery("bench_bare")
app.config_from_object(CONF)

@app.task(name="bench.noop")
def noop(*args, **kwargs):
    return None
{freeze}"""

# (b2): the bare worker with our workers' one memory measure (gc.freeze), for comparison.
FREEZE = """
from celery import signals
import gc

@signals.worker_init.connect
def freeze(**_):
    gc.freeze()
"""

ORM_WORKER = """
import os, time
import django
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "backend.settings")
django.setup()
from celery import Celery
from backend.internal_api.models import TERMINAL_STATUSES, WorkflowExecution
from backend.internal_api.transitions import apply_status
{conf}
app = Celery("bench_orm")
app.config_from_object(CONF)
WORK = float(os.environ.get("EXAMPLE_WORK_SECONDS", "0"))
FILES = int(os.environ.get("EXAMPLE_FILES", "1"))

@app.task(name="example_worker.process_execution")
def process_execution(execution_id, organization_id=None):
    started = time.monotonic()
    execution = WorkflowExecution.objects.get(pk=execution_id, organization_id=organization_id)
    if execution.status in TERMINAL_STATUSES:
        return {{"execution_id": execution_id, "status": execution.status}}
    apply_status(organization_id, execution_id, "IN_PROGRESS", attempts=1)
    files = []
    for i in range(FILES):
        time.sleep(WORK / FILES)
        files.append({{"file": f"file-{{i}}", "pages": 1}})
    WorkflowExecution.objects.filter(pk=execution_id).update(
        result={{"files": files}}, total_files=FILES, successful_files=FILES, failed_files=0)
    apply_status(organization_id, execution_id, "COMPLETED",
                 execution_time=round(time.monotonic() - started, 6))
    return {{"execution_id": execution_id, "status": "COMPLETED"}}
"""


def pss_bytes(pid: int) -> int:
    """Proportional set size of one process, from ``/proc/<pid>/smaps_rollup``."""
    text = Path(f"/proc/{pid}/smaps_rollup").read_text()
    match = re.search(r"^Pss:\s+(\d+) kB", text, re.M)
    assert match, f"no Pss line for pid {pid}"
    return int(match.group(1)) * 1024


def tree_pss(pid: int) -> tuple[int, int]:
    """Total PSS of a process and all its descendants, and how many processes that is."""
    import psutil

    pids = [pid, *(p.pid for p in psutil.Process(pid).children(recursive=True))]
    return sum(pss_bytes(p) for p in pids), len(pids)


class Worker:
    """One ``celery worker`` subprocess (its own process group), timed until ready."""

    def __init__(self, label: str, python: str, app: str, env: dict[str, str], cwd: Path,
                 log: Path):
        self.label = label
        self.env = env
        self.log = log
        command = [python, "-m", "celery", "-A", app, "worker",
                   "--pool=prefork", f"--concurrency={CONCURRENCY}", "--loglevel=INFO",
                   f"--queues={env['WORKER_NAME']}", f"--hostname={env['WORKER_NAME']}@%h"]
        started = time.monotonic()
        with open(log, "wb") as out:
            self.proc = subprocess.Popen(command, env=env, cwd=cwd, stdout=out,
                                         stderr=subprocess.STDOUT, start_new_session=True)
        deadline = started + 90
        while b"ready." not in log.read_bytes():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"{label} did not start:\n{log.read_text()[-3000:]}")
            time.sleep(0.02)
        self.startup = time.monotonic() - started

    def footprint(self) -> tuple[int, int]:
        """Total PSS and process count after the worker has idled a moment."""
        time.sleep(IDLE_SETTLE)
        return tree_pss(self.proc.pid)

    def stop(self) -> None:
        """Warm shutdown; the process group is killed if it lingers."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(30)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(10)


def base_env(backend: LiveBackend, name: str, org: str) -> dict[str, str]:
    """Environment shared by the three workers (one queue each)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CELERY_", "EXAMPLE_"))}
    env.update({
        "CELERY_BROKER_URL": BROKER, "WORKER_NAME": name,
        "INTERNAL_SERVICE_API_KEY": backend.api_key, "DJANGO_APP_BACKEND_URL": backend.url,
        "ORGANIZATION_ID": org, "MAX_CONCURRENT_TASKS": str(CONCURRENCY),
        "METRICS_PORT": str(free_port()), "HEALTH_HOST": "127.0.0.1", "LOG_LEVEL": "INFO",
        "EXAMPLE_WORK_SECONDS": "0", "EXAMPLE_FILES": "1", "ENV_FILE": os.devnull,
        "PYTHONPATH": str(REPO_ROOT), "DATABASE_URL": backend.database_url,
    })
    # Celery sets Django up by itself when this is set: only worker (c) may see it.
    env.pop("DJANGO_SETTINGS_MODULE", None)
    return env


def run_throughput(backend: LiveBackend, worker: Worker, org: str,
                   count: int = EXECUTIONS) -> float:
    """Executions per second, from sending ``count`` tasks to the last of their executions
    COMPLETED in the database."""
    import psycopg
    from celery import Celery

    from backend.workers.shared import InternalAPIClient, WorkerConfig

    config = WorkerConfig(_env_file=None, internal_service_api_key=backend.api_key,
                          django_app_backend_url=backend.url, organization_id=org)
    with InternalAPIClient(config) as client:
        ids = []
        for n in range(count):
            execution = client.create_workflow_execution(f"bench-{n % 7}", total_files=1)
            client.update_workflow_execution_status(execution.id, "QUEUED")
            ids.append(execution.id)
    producer = Celery("bench_producer")
    producer.conf.update(broker_url=BROKER, task_serializer="json", accept_content=["json"])
    with psycopg.connect(backend.database_url, autocommit=True) as db:
        started = time.monotonic()
        with producer.producer_or_acquire() as prod:
            for execution_id in ids:
                producer.send_task("example_worker.process_execution", args=[execution_id],
                                   kwargs={"organization_id": org},
                                   queue=worker.env["WORKER_NAME"], producer=prod)
        deadline = started + 300
        while True:
            row = db.execute(
                "SELECT count(*) FROM internal_api_workflowexecution "
                "WHERE id = ANY(%s) AND status = 'COMPLETED'",
                ([uuid.UUID(i) for i in ids],)).fetchone()
            done = int(row[0]) if row else 0
            if done >= count:
                break
            if time.monotonic() > deadline:
                raise RuntimeError(f"{worker.label}: only {done}/{count} completed")
            time.sleep(0.05)
        return count / (time.monotonic() - started)


def import_costs(env: dict[str, str], top: int = 12) -> tuple[float, list[tuple[float, str]], str]:
    """Import time of the example worker (ms), the costliest packages in it, and which
    Django modules got imported (kombu imports ``django.utils.functional`` when Django is
    installed; the worker-only environment has no Django at all).

    ``-X importtime``'s self times are summed per top-level package (``celery``, ``kombu``,
    ``pydantic``, ...), so each line says what one dependency costs at start-up.
    """
    done = subprocess.run(
        [WORKER_PYTHON, "-X", "importtime", "-c",
         "import sys, backend.workers.shared.example_worker as w; "
         "print(' '.join(sorted(m for m in sys.modules if m.split('.')[0] == 'django')))"],
        env=env, cwd=REPO_ROOT, capture_output=True, text=True, check=True,
    )
    per_package: dict[str, float] = {}
    for line in done.stderr.splitlines():
        match = re.match(r"import time:\s+(\d+) \|\s+\d+ \| \s*(\S+)", line)
        if match:
            root = match.group(2).split(".")[0]
            if match.group(2).startswith("backend.workers.shared"):
                root = match.group(2)
            per_package[root] = per_package.get(root, 0.0) + int(match.group(1)) / 1000
    ranked = sorted(((ms, name) for name, ms in per_package.items()), reverse=True)
    return sum(per_package.values()), ranked[:top], done.stdout.strip()


def mib(value: int) -> str:
    """Bytes as MiB with one decimal."""
    return f"{value / 2**20:.1f} MiB"


def main() -> int:
    """Run every measurement and print the figures and ratios."""
    for service in ("redis", "postgres"):
        if not service_up(service):
            print(f"bench_worker: {service} is not running on localhost", file=sys.stderr)
            return 1
    with tempfile.TemporaryDirectory(prefix="bench-worker-") as folder:
        return measure(Path(folder))


def measure(tmp: Path) -> int:
    """Start each worker from modules written into ``tmp``, measure, print."""
    conf = textwrap.dedent(COMMON_CONF)
    (tmp / "bench_bare.py").write_text(BARE_WORKER.format(conf=conf, freeze=""))
    (tmp / "bench_frozen.py").write_text(BARE_WORKER.format(conf=conf, freeze=FREEZE))
    (tmp / "bench_orm.py").write_text(ORM_WORKER.format(conf=conf))
    with LiveBackend.postgres(workers=2) as backend:
        run_id = uuid.uuid4().hex[:6]
        orgs = {k: f"bench-{k}-{run_id}" for k in ("a", "c")}
        for org in orgs.values():
            backend.create_organization(org)
        specs = {
            "a": ("example worker", WORKER_PYTHON, "backend.workers.shared.example_worker",
                  orgs["a"]),
            "b": ("bare Celery", WORKER_PYTHON, "bench_bare", orgs["a"]),
            "b2": ("bare + gc.freeze", WORKER_PYTHON, "bench_frozen", orgs["a"]),
            "c": ("Django ORM worker", sys.executable, "bench_orm", orgs["c"]),
        }
        results: dict[str, dict[str, Any]] = {}
        running: dict[str, Worker] = {}
        try:
            for key, (label, python, app, org) in specs.items():
                env = base_env(backend, f"bench-{key}-{run_id}", org)
                env["PYTHONPATH"] = f"{REPO_ROOT}{os.pathsep}{tmp}"
                print(f"({key}) {label}: starting ...", file=sys.stderr, flush=True)
                worker = Worker(label, python, app, env, tmp, tmp / f"{key}.log")
                running[key] = worker
                pss, processes = worker.footprint()
                results[key] = {"label": label, "startup": worker.startup, "pss": pss,
                                "processes": processes, "rates": []}
                if key not in ("a", "c"):
                    running.pop(key).stop()
            # (a) and (c) stay up (idle in turn) for alternating throughput rounds, after an
            # untimed warm-up round each (first connections, first imports in each child).
            for key in ("a", "c"):
                run_throughput(backend, running[key], specs[key][3], WARMUP)
            for n in range(ROUNDS):
                for key in ("a", "c"):
                    print(f"round {n + 1}/{ROUNDS}: ({key}) ...", file=sys.stderr, flush=True)
                    results[key]["rates"].append(
                        run_throughput(backend, running[key], specs[key][3]))
            for key in ("a", "c"):
                results[key]["throughput"] = statistics.median(results[key]["rates"])
                results[key]["pss_after"] = running[key].footprint()[0]
        finally:
            for worker in running.values():
                worker.stop()
        import_env = base_env(backend, "bench-import", orgs["a"])
        total_ms, costly, django_modules = import_costs(import_env)

    print(f"$ python benchmarks/bench_worker.py {' '.join(sys.argv[1:])}".rstrip())
    print(f"workers: prefork, concurrency {CONCURRENCY}, broker {BROKER}; "
          f"backend gunicorn (2 gthread workers) + PostgreSQL")
    print(f"(a), (b) and the import timing run on {WORKER_PYTHON}; (c) on {sys.executable}")
    print(f"{'worker':<22}{'start-up':>10}{'PSS total':>14}{'procs':>7}{'exec/s':>10}")
    for key in ("a", "b", "b2", "c"):
        r = results[key]
        rate = f"{r['throughput']:.1f}" if "throughput" in r else "-"
        print(f"({key}){'' if len(key) > 1 else ' '}{r['label']:<17}{r['startup']:>9.2f}s"
              f"{mib(r['pss']):>14}"
              f"{r['processes']:>7}{rate:>10}")
    a, b, c = results["a"], results["b"], results["c"]
    print(f"PSS (a)/(b) = {a['pss'] / b['pss']:.2f}  (target <= 1.2); "
          f"(a)/(b2) = {a['pss'] / results['b2']['pss']:.2f} (both with gc.freeze)")
    print(f"PSS (a)/(c) = {a['pss'] / c['pss']:.2f}  (target < 1)")
    print(f"PSS after the throughput rounds: (a) {mib(a['pss_after'])}, (c) {mib(c['pss_after'])}"
          f" ((a)/(c) = {a['pss_after'] / c['pss_after']:.2f})")
    print(f"start-up (a)/(b) = {a['startup'] / b['startup']:.2f}, "
          f"(a)/(c) = {a['startup'] / c['startup']:.2f}")
    ratios = [x / y for x, y in zip(a["rates"], c["rates"], strict=True)]
    print(f"throughput (a)/(c) = {a['throughput'] / c['throughput']:.2f}  (target >= "
          f"{TARGET_THROUGHPUT_RATIO}), medians of {ROUNDS} alternating rounds of {EXECUTIONS} "
          f"executions each, no simulated work; per round "
          f"{', '.join(f'{r:.2f}' for r in ratios)}; exec/s (a) "
          f"{', '.join(f'{r:.1f}' for r in a['rates'])}, (c) "
          f"{', '.join(f'{r:.1f}' for r in c['rates'])}")
    print(f"python -X importtime, example worker: {total_ms:.0f} ms of imports in all "
          "(self time per package, costliest first):")
    for ms, name in costly:
        print(f"  {ms:8.1f} ms  {name}")
    print(f"Django modules in the example worker's process: {django_modules or 'none'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
