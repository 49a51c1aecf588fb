"""`ml-platform` run as a user runs it: the installed console script in a subprocess, with the
settings in the environment (own data dir, own Redis key prefix), checked against what it did."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from importlib.metadata import version
from pathlib import Path

import pytest

try:
    from fixtures_platform import TEST_REDIS_URL, delete_project_keys
except ImportError:  # ml_platform_tests imported as a package
    from ml_platform_tests.fixtures_platform import TEST_REDIS_URL, delete_project_keys

CLI = Path(sys.executable).parent / "ml-platform"  # the venv's console script
COMMANDS = {"celery-worker", "demo", "experiment", "mlflow-server", "monitor", "publish", "rollback", "rollout", "serve", "services",
            "stream", "ui"}


def run_cli(*args: str, env: dict[str, str] | None = None, cwd: Path | None = None) -> subprocess.CompletedProcess:
    full_env = {k: v for k, v in os.environ.items() if not k.startswith(("ML_PLATFORM_", "MLFLOW_", "REDIS_URL"))}
    full_env.update({"COLUMNS": "80", **(env or {})})  # an 80-column terminal
    return subprocess.run(
        [str(CLI), *args], check=False, env=full_env, cwd=cwd, capture_output=True, text=True, timeout=180
    )


@pytest.fixture()
def platform_env(tmp_path):
    """Env of a platform of its own: data dir under tmp_path, Redis keys under a unique project."""
    project = f"test_cli_{uuid.uuid4().hex[:10]}"
    env = {"ML_PLATFORM_DATA_DIR": str(tmp_path / "data"), "ML_PLATFORM_PROJECT": project, "REDIS_URL": TEST_REDIS_URL}
    yield env


@pytest.fixture()
def redis_project(client, platform_env):
    project = platform_env["ML_PLATFORM_PROJECT"]
    yield client, project
    delete_project_keys(client, project)


def test_version_is_the_installed_distribution_version(tmp_path):
    out = run_cli("--version", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == f"ml-platform, version {version('ml_platform')}"


def test_top_level_help_lists_every_command_on_whole_lines(tmp_path):
    out = run_cli("--help", cwd=tmp_path)  # from another directory: nothing depends on the cwd
    assert out.returncode == 0, out.stderr
    listed = {}
    in_commands = False
    for line in out.stdout.splitlines():
        if line.strip() == "Commands:":
            in_commands = True
        elif in_commands and line.strip():
            name, _, text = line.strip().partition(" ")
            listed[name] = text.strip()
    assert set(listed) == COMMANDS
    # every command has its one-line help, whole (click cuts a long first docstring line with "...")
    assert all(text and not text.endswith("...") for text in listed.values()), listed


def _register_two_versions(data_dir: Path) -> None:
    """A registry under data_dir with v1 (the first champion) and v2 (the champion now)."""
    from threadpoolctl import threadpool_limits

    from ml_platform.registry import CHAMPION, ModelRegistry
    from ml_platform.training import time_split, train_model

    try:
        from test_training import FAST, synthetic_training_frame
    except ImportError:
        from ml_platform_tests.test_training import FAST, synthetic_training_frame

    registry = ModelRegistry(f"sqlite:///{data_dir / 'mlflow' / 'mlflow.db'}", "fraud_detector")
    split = time_split(synthetic_training_frame(n=1500, seed=3), train_frac=0.6, val_frac=0.2)
    with threadpool_limits(limits=1):
        for params in (FAST, {**FAST, "max_iter": 10}):
            model, contract = train_model(split.train, split.validation, params=params)
            v = registry.log_and_register(model, contract, metrics={}, params=params, data_version="d",
                                          code_version="test")
            registry.set_alias(CHAMPION, v.version, who="test", why="promoted", action="promote")
    assert registry.champion().version == 2


def test_rollback_moves_the_champion_back_and_records_why(platform_env, tmp_path):
    from ml_platform.registry import ModelRegistry

    data_dir = Path(platform_env["ML_PLATFORM_DATA_DIR"])
    (data_dir / "mlflow").mkdir(parents=True)
    _register_two_versions(data_dir)
    out = run_cli("rollback", "--reason", "canary errors", "--who", "oncall", env=platform_env, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert "fraud_detector: champion v2 -> v1 (canary errors)" in out.stdout
    registry = ModelRegistry(f"sqlite:///{data_dir / 'mlflow' / 'mlflow.db'}", "fraud_detector")
    assert registry.champion().version == 1
    last = registry.alias_history("champion")[-1]
    assert (last["to_version"], last["who"], last["why"]) == (1, "oncall", "canary errors")

    # v1 has no previous champion: a clear error, exit code 1, nothing moved.
    again = run_cli("rollback", "--reason", "again", env=platform_env, cwd=tmp_path)
    assert again.returncode == 1 and "Error:" in again.stderr
    assert registry.champion().version == 1


def test_monitor_before_any_champion_fails_saying_so_and_a_bad_date_is_a_usage_error(platform_env, tmp_path):
    out = run_cli("monitor", "--date", "2026-01-31", env=platform_env, cwd=tmp_path)
    assert out.returncode == 1
    assert "has no champion yet: run the training pipeline first" in out.stderr
    assert "Monitoring 2026-01-31" in out.stdout  # the table of what did run (here: nothing)
    bad = run_cli("monitor", "--date", "31/01/2026", env=platform_env, cwd=tmp_path)
    assert bad.returncode == 2 and "'31/01/2026' does not match the format '%Y-%m-%d'" in bad.stderr


def _stream_events(client, project: str) -> list[dict]:
    return [json.loads(fields[b"event"]) for _, fields in client.xrange(f"{project}:stream:transactions")]


def test_publish_generate_puts_n_parseable_events_on_the_worker_stream(platform_env, redis_project, tmp_path):
    from ml_platform.serving.stream import parse_event  # the worker's own parser

    client, project = redis_project
    out = run_cli("publish", "--generate", "37", "--day", "2026-01-15", env=platform_env, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert f"Published 37 events to {project}:stream:transactions" in out.stdout
    events = _stream_events(client, project)
    assert len(events) == 37
    assert len({e["transaction_id"] for e in events}) == 37
    assert all(e["event_timestamp"].startswith("2026-01-15") for e in events)
    for e in events:
        parse_event(json.dumps(e).encode())  # the worker accepts every one (raises otherwise)
    # A second publish adds new events (new ids), it is not a replay of the first.
    assert run_cli("publish", "--generate", "5", env=platform_env, cwd=tmp_path).returncode == 0
    again = _stream_events(client, project)
    assert len(again) == 42 and len({e["transaction_id"] for e in again}) == 42


def test_publish_from_a_csv_file_keeps_its_rows_and_order(platform_env, redis_project, tmp_path):
    from ml_platform.sources.generator import GeneratorConfig, generate_day

    client, project = redis_project
    frame = generate_day(GeneratorConfig(n_users=300, n_merchants=120, start="2026-02-01", days=1), "2026-02-01")
    mine = frame.head(20)[["transaction_id", "user_id", "merchant_id", "merchant_category", "amount", "country",
                           "device", "channel", "event_timestamp"]]
    path = tmp_path / "events.csv"
    mine.to_csv(path, index=False)
    out = run_cli("publish", "--from", str(path), env=platform_env, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    events = _stream_events(client, project)
    assert [e["transaction_id"] for e in events] == mine["transaction_id"].tolist()
    assert [e["amount"] for e in events] == mine["amount"].tolist()
    assert [e["user_id"] for e in events] == mine["user_id"].tolist()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ((), "give exactly one of --from PATH or --generate N"),
        (("--generate", "0"), "Invalid value for '--generate'"),
        (("--generate", "3", "--from", "x.csv"), "give exactly one of --from PATH or --generate N"),
        (("--from", "missing.parquet"), "No events at"),
        (("--from", "no_amount.csv"), "missing required column(s) ['amount']"),
        (("--from", "bad_user.csv"), "column 'user_id' has 1 value(s) that are not whole numbers"),
        (("--generate", "3", "--day", "yesterday"), "Invalid value for '--day'"),
    ],
)
def test_publish_bad_input_is_a_usage_error_naming_it(platform_env, redis_project, tmp_path, args, message):
    client, project = redis_project
    header = "transaction_id,user_id,merchant_id,merchant_category,amount,country,device,channel,event_timestamp"
    (tmp_path / "no_amount.csv").write_text(header.replace("amount,", "") + "\nt1,1,2,grocery,DE,ios,pos,2026-01-01T00:00:00Z\n")
    (tmp_path / "bad_user.csv").write_text(header + "\nt1,alice,2,grocery,5.0,DE,ios,pos,2026-01-01T00:00:00Z\n")
    out = run_cli("publish", *args, env=platform_env, cwd=tmp_path)
    assert out.returncode == 2, (out.stdout, out.stderr)
    assert message in " ".join(out.stderr.split()), out.stderr
    assert client.exists(f"{project}:stream:transactions") == 0  # nothing was published
