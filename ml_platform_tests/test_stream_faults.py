"""A stream worker process killed with SIGKILL in the middle of a batch: another worker process
takes its pending events over with XAUTOCLAIM and every event is scored exactly once in the
output, none lost (real `ml-platform stream` processes on the real Redis)."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from datetime import timedelta

import pytest
from fixtures_platform import SMALL_CONFIG, tiny_platform  # noqa: F401  (module fixture)

from ml_platform import features as fr
from ml_platform.serving.stream import publish_events, read_predictions, stream_names
from ml_platform.sources.generator import GeneratorConfig, generate_day

pytestmark = pytest.mark.integration
GROUP = "scorers"


def worker_env(platform) -> dict[str, str]:
    s = platform.settings
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ML_PLATFORM_", "MLFLOW_", "REDIS_URL"))}
    env.update(ML_PLATFORM_DATA_DIR=str(s.data_dir), MLFLOW_TRACKING_URI=s.mlflow_tracking_uri, REDIS_URL=s.redis_url,
               ML_PLATFORM_PROJECT=s.project, ML_PLATFORM_MODEL_NAME=s.model_name, OMP_NUM_THREADS="1")
    return env


def start_worker(platform, consumer: str, log, *args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "ml_platform.cli", "stream", "--consumer", consumer,
                             "--group", GROUP, *args], env=worker_env(platform), stdout=log, stderr=subprocess.STDOUT)


def test_a_worker_killed_mid_batch_is_taken_over_and_every_event_is_scored_once(tiny_platform, tmp_path):  # noqa: F811
    platform = tiny_platform
    cfg = dict(SMALL_CONFIG)
    days = cfg.pop("days")
    start = platform.events[fr.EVENT_TS].min().date()
    cfg["txns_per_user_per_day"] = 10.0  # the same population, a busy day
    day = generate_day(GeneratorConfig(start=start, days=days, **cfg), start + timedelta(days=days))
    events = day.head(3000).copy()
    assert len(events) == 3000
    names = stream_names(platform.project)
    publish_events(platform.redis, names.input, events)

    with open(tmp_path / "a.log", "w") as log_a:
        a = start_worker(platform, "A", log_a, "--batch-size", "100")
        try:
            deadline = time.monotonic() + 120
            while platform.redis.xlen(names.output) < 400:  # A is scoring: at least two batches out
                assert a.poll() is None, (tmp_path / "a.log").read_text()[-3000:]
                assert time.monotonic() < deadline, (tmp_path / "a.log").read_text()[-3000:]
                time.sleep(0.01)
            a.send_signal(signal.SIGKILL)  # no handler runs, nothing is acknowledged any more
            a.wait(timeout=10)
        finally:
            if a.poll() is None:
                a.kill()
    scored_by_a = platform.redis.xlen(names.output)
    pending = {c["name"].decode(): c["pending"] for c in platform.redis.xinfo_consumers(names.input, GROUP)}
    assert pending.get("A", 0) > 0, "A died between batches: nothing was in flight"  # killed mid-batch
    assert scored_by_a < len(events)

    with open(tmp_path / "b.log", "w") as log_b:
        b = start_worker(platform, "B", log_b, "--batch-size", "500", "--claim-idle-ms", "500", "--until-idle")
        assert b.wait(timeout=180) == 0, (tmp_path / "b.log").read_text()[-3000:]
    out = read_predictions(platform.redis, names.output)
    ids = [p["event_id"] for p in out]
    assert len(ids) == len(set(ids)), "an event was scored twice"
    assert set(ids) == set(events["transaction_id"]), "an event was lost"
    by = {p["consumer"] for p in out}
    assert by == {"A", "B"}
    assert platform.redis.xpending(names.input, GROUP)["pending"] == 0
    log = (tmp_path / "b.log").read_text()
    claimed = re.search(r"Stopped: .*'claimed': (\d+)", log)
    assert claimed and int(claimed.group(1)) >= pending["A"], log[-2000:]  # B took A's events over
