"""The Kubernetes path (deploy/k8s/): the definitions load with ML_PLATFORM_EXECUTOR=k8s and the
shipped executor config, as `dagster definitions validate` checks them; the shipped dagster.yaml's
run launcher config is valid K8sRunLauncher config; a wrong field is named."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent
DEPLOY = REPO / "deploy" / "k8s"


def validate(env_extra: dict[str, str]) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ML_PLATFORM_", "MLFLOW_", "REDIS_URL"))}
    env.update(env_extra)
    dagster = Path(sys.executable).parent / "dagster"
    return subprocess.run([str(dagster), "definitions", "validate", "-w", str(REPO / "workspace.yaml")],
                          env=env, cwd=REPO, capture_output=True, text=True, timeout=300, check=False)


def test_the_shipped_k8s_executor_config_is_accepted_by_dagster_definitions_validate(tmp_path):
    (tmp_path / "home").mkdir()
    ok = validate({"ML_PLATFORM_EXECUTOR": "k8s", "ML_PLATFORM_K8S_EXECUTOR_CONFIG": str(DEPLOY / "executor.yaml"),
                   "ML_PLATFORM_DATA_DIR": str(tmp_path / "data"), "DAGSTER_HOME": str(tmp_path / "home")})
    assert ok.returncode == 0, ok.stdout[-2000:] + ok.stderr[-3000:]



def test_a_wrong_field_in_the_executor_config_is_named_when_the_definitions_load(tmp_path):
    """What `dagster definitions validate` runs (build_definitions -> executor_for), in process."""
    from ml_platform.defs.pipeline import build_definitions
    from ml_platform.settings import load_settings

    bad = tmp_path / "bad.yaml"
    bad.write_text((DEPLOY / "executor.yaml").read_text() + "job_namespaces: typo\n")
    settings = load_settings({"ML_PLATFORM_EXECUTOR": "k8s", "ML_PLATFORM_K8S_EXECUTOR_CONFIG": str(bad),
                              "ML_PLATFORM_DATA_DIR": str(tmp_path / "data")})
    with pytest.raises(ValueError, match=rf"{bad}: .*job_namespaces"):
        build_definitions(settings)


def test_the_shipped_dagster_yaml_uses_postgres_and_a_valid_k8s_run_launcher():
    from dagster._config import validate_config
    from dagster_k8s import K8sRunLauncher

    instance = yaml.safe_load((DEPLOY / "dagster.yaml").read_text())
    assert instance["storage"]["postgres"]["postgres_url"] == {"env": "ML_PLATFORM_DAGSTER_POSTGRES_URL"}
    launcher = instance["run_launcher"]
    assert (launcher["module"], launcher["class"]) == ("dagster_k8s", "K8sRunLauncher")
    checked = validate_config(K8sRunLauncher.config_type(), launcher["config"])
    assert checked.success, [e.message for e in checked.errors]
    broken = validate_config(K8sRunLauncher.config_type(), {**launcher["config"], "job_imag": "x"})
    assert not broken.success and "job_imag" in " ".join(e.message for e in broken.errors)
