"""The two 60-day scenarios of test_scenarios, started as early as the session allows.

They are the user's commands (`ml-platform demo --scenario drift|quiet` on the CI population), run
as two processes side by side. `conftest.pytest_collection_finish` starts them as soon as the
session knows it will run test_scenarios (under pytest-xdist, its controller, before the workers
start: `conftest.pytest_sessionstart`), so they run while the rest of the suite does; the module's
fixture waits for them (`finish`: each writes its exit status to a file, so any process of the
session can wait). Each uses its own data directory and Redis key prefix, removed at the end.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import redis
from fixtures_platform import REPO_ROOT, TEST_REDIS_URL, delete_project_keys, unique_project

NAMES = ("drift", "quiet")
# A quarter of the demo's card holders at a 3 % fraud rate: about the demo's frauds a day (the
# labels a retrain waits for arrive as in the demo) on a quarter of its transactions.
CI_POPULATION = ["--users", "1200", "--fraud-rate", "0.03"]
TIMEOUT_S = 1800


@dataclass
class ScenarioRuns:
    root: Path
    project: str
    started_at: float = field(default_factory=time.monotonic)
    pids: dict[str, int] = field(default_factory=dict)  # each scenario's process group (its `sh`)
    procs: dict[str, subprocess.Popen] = field(default_factory=dict)  # in the process that started them

    def log_path(self, name: str) -> Path:
        return self.root / f"{name}.log"

    def exit_path(self, name: str) -> Path:
        return self.root / f"{name}.exit"


_RUNS: ScenarioRuns | None = None
# Set by the process that started the scenarios (a plain pytest, or pytest-xdist's controller) for
# the processes it starts: the root folder, whose runs.json says the rest. A worker running
# test_scenarios finds the running scenarios there.
HANDOFF_ENV = "ML_PLATFORM_TEST_SCENARIOS"


def start() -> ScenarioRuns:
    """Start both scenarios (once per test session; a pytest-xdist worker finds the controller's)."""
    global _RUNS
    if _RUNS is not None:
        return _RUNS
    if os.environ.get(HANDOFF_ENV):
        root = Path(os.environ[HANDOFF_ENV])
        saved = json.loads((root / "runs.json").read_text())
        _RUNS = ScenarioRuns(root, saved["project"], time.monotonic() - (time.time() - saved["started"]),
                             {k: int(v) for k, v in saved["pids"].items()})
        return _RUNS
    runs = ScenarioRuns(Path(tempfile.mkdtemp(prefix="ml-platform-scenarios-")), unique_project("test_scenario"))
    for name in NAMES:
        env = {**os.environ, "ML_PLATFORM_DATA_DIR": str(runs.root / name), "REDIS_URL": TEST_REDIS_URL,
               "ML_PLATFORM_PROJECT": runs.project, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
        for var in ("DAGSTER_HOME", "MLFLOW_TRACKING_URI", "ML_PLATFORM_EVENTS_PATH", "ML_PLATFORM_LABELS_PATH"):
            env.pop(var, None)
        # `sh` writes the command's exit status where any process of the session can read it
        command = [sys.executable, "-m", "ml_platform.cli", "demo", "--scenario", name, *CI_POPULATION]
        with open(runs.log_path(name), "w") as log:
            proc = subprocess.Popen(
                ["sh", "-c", 'exit_file="$1"; shift; "$@"; echo $? > "$exit_file"', "sh",
                 str(runs.exit_path(name)), *command],
                cwd=REPO_ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        runs.procs[name], runs.pids[name] = proc, proc.pid
    (runs.root / "runs.json").write_text(json.dumps({"project": runs.project, "started": time.time(),
                                                     "pids": runs.pids}))
    os.environ[HANDOFF_ENV] = str(runs.root)  # for pytest-xdist's workers, started after this
    _RUNS = runs
    return runs


def finish(runs: ScenarioRuns) -> dict[str, dict]:
    """Wait for both; {name: {exit, log, report, data_dir}} (report None when none was written)."""
    deadline = runs.started_at + TIMEOUT_S
    out = {}
    for name in NAMES:
        while not runs.exit_path(name).exists() and time.monotonic() < deadline:
            time.sleep(1.0)
        if not runs.exit_path(name).exists():
            _kill(runs.pids[name])
        status = runs.exit_path(name).read_text().strip() if runs.exit_path(name).exists() else ""
        report_path = runs.root / name / "reports" / f"scenario_{name}.json"
        out[name] = {
            "exit": int(status) if status.lstrip("-").isdigit() else None,
            "log": runs.log_path(name).read_text(),
            "report": json.loads(report_path.read_text()) if report_path.exists() else None,
            "data_dir": runs.root / name / "scenarios" / name,
        }
    return out


def cleanup(runs: ScenarioRuns) -> None:
    """Stop what still runs, delete the scenarios' Redis keys and folder (idempotent)."""
    global _RUNS
    for name, pid in runs.pids.items():
        proc = runs.procs.get(name)
        running = proc.poll() is None if proc is not None else not runs.exit_path(name).exists()
        if running:
            _kill(pid)
    for proc in runs.procs.values():  # reaped by the process that started them
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(10)
    client = redis.Redis.from_url(TEST_REDIS_URL)
    try:
        for name in NAMES:
            delete_project_keys(client, f"{runs.project}-scenario-{name}")
    finally:
        client.close()
    shutil.rmtree(runs.root, ignore_errors=True)
    _RUNS = None


def _kill(pgid: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signal.SIGKILL)
