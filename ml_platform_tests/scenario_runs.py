"""The two 60-day scenarios of test_scenarios, started as early as the session allows.

They are the user's commands (`ml-platform demo --scenario drift|quiet` on the CI population), run
as two processes side by side. `conftest.pytest_collection_finish` starts them as soon as the
session knows it will run test_scenarios, so they run while the rest of the suite does (about
7 minutes of the two processes overlap the other tests on the 2 cores); the module's fixture waits
for them (`finish`). Each uses its own data directory and Redis key prefix, removed at the end.
"""

from __future__ import annotations

import json
import os
import shutil
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
    procs: dict[str, subprocess.Popen] = field(default_factory=dict)

    def log_path(self, name: str) -> Path:
        return self.root / f"{name}.log"


_RUNS: ScenarioRuns | None = None


def start() -> ScenarioRuns:
    """Start both scenarios (once per session)."""
    global _RUNS
    if _RUNS is not None:
        return _RUNS
    runs = ScenarioRuns(Path(tempfile.mkdtemp(prefix="ml-platform-scenarios-")), unique_project("test_scenario"))
    for name in NAMES:
        env = {**os.environ, "ML_PLATFORM_DATA_DIR": str(runs.root / name), "REDIS_URL": TEST_REDIS_URL,
               "ML_PLATFORM_PROJECT": runs.project, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
        for var in ("DAGSTER_HOME", "MLFLOW_TRACKING_URI", "ML_PLATFORM_EVENTS_PATH", "ML_PLATFORM_LABELS_PATH"):
            env.pop(var, None)
        with open(runs.log_path(name), "w") as log:
            runs.procs[name] = subprocess.Popen(
                [sys.executable, "-m", "ml_platform.cli", "demo", "--scenario", name, *CI_POPULATION],
                cwd=REPO_ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    _RUNS = runs
    return runs


def finish(runs: ScenarioRuns) -> dict[str, dict]:
    """Wait for both; {name: {exit, log, report, data_dir}} (report None when none was written)."""
    deadline = runs.started_at + TIMEOUT_S
    out = {}
    for name, proc in runs.procs.items():
        try:
            proc.wait(max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
        report_path = runs.root / name / "reports" / f"scenario_{name}.json"
        out[name] = {
            "exit": proc.returncode,
            "log": runs.log_path(name).read_text(),
            "report": json.loads(report_path.read_text()) if report_path.exists() else None,
            "data_dir": runs.root / name / "scenarios" / name,
        }
    return out


def cleanup(runs: ScenarioRuns) -> None:
    global _RUNS
    for proc in runs.procs.values():
        if proc.poll() is None:
            proc.kill()
    client = redis.Redis.from_url(TEST_REDIS_URL)
    try:
        for name in NAMES:
            delete_project_keys(client, f"{runs.project}-scenario-{name}")
    finally:
        client.close()
    shutil.rmtree(runs.root, ignore_errors=True)
    _RUNS = None
