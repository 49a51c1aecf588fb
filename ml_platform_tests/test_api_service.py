"""The prediction API's service behaviour against a real Redis and a real MLflow registry:
micro-batches with a bad request in them, the per-call row limit, a champion that fails to load,
and categorical values the model never saw."""

from __future__ import annotations

import asyncio
import json
import time

import pytest

from ml_platform.registry import CHAMPION
from ml_platform.serving.api import ServingConfig, create_app
from ml_platform.serving.api.testing import InProcessClient

# Run a second time in the production profile (make test-production).
pytestmark = pytest.mark.integration

try:  # ml_platform_tests on sys.path (rootdir conftest) or imported as a package
    from fixtures_platform import tiny_platform
except ImportError:
    from ml_platform_tests.fixtures_platform import tiny_platform  # noqa: F401


@pytest.fixture(scope="module")
def client(tiny_platform):
    app = create_app(tiny_platform.settings, ServingConfig(poll_interval_s=0.2, max_request_rows=3))
    with InProcessClient(app) as c:
        yield c


def _state(client):
    return client.app.state.serving


def _eventually(check, timeout: float = 5.0, every: float = 0.05) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(every)
    return False


def _seen_body(platform, **overrides):
    """A transaction whose categorical values all come from a training event."""
    event = platform.events.iloc[0]
    seen = {c: str(event[c]) for c in ("merchant_category", "device", "channel", "country")}
    return platform.transaction(**{**seen, **overrides})


# --------------------------------------------------------------------------- micro-batching


def test_a_bad_request_in_a_micro_batch_fails_alone_and_its_batch_mates_get_their_scores(client, tiny_platform):
    service = _state(client).service
    # three transactions with three different scores (a mix-up between mates would show): amounts
    # far apart, and the first three whose scores differ (tree models score nearby amounts alike)
    good, alone = [], []
    for i, amount in enumerate([3.0, 60.0, 450.0, 1800.0, 4900.0, 9.5, 150.0, 900.0]):
        t = tiny_platform.transaction(transaction_id=f"mate-{i}", amount=amount, channel=("online", "pos")[i % 2])
        p = client.post("/predict", json=t).json()["probability"]
        if p not in alone:
            good.append(t)
            alone.append(p)
        if len(good) == 3:
            break
    assert len(set(alone)) == 3, f"no three distinct scores among the candidate amounts: {alone}"

    rows = [{**t, "event_timestamp": client.portal.call(_parse_ts, t["event_timestamp"])} for t in good]
    bad = {**rows[0], "transaction_id": "bad", "event_timestamp": "not a time"}  # fails in scoring
    batches: list[int] = []
    real_score = service._score

    async def spy(jobs):
        batches.append(len(jobs))
        return await real_score(jobs)

    async def concurrently():
        return await asyncio.gather(
            service.predict([rows[0]]),
            service.predict([bad]),
            service.predict([rows[1], rows[2]]),
            return_exceptions=True,
        )

    service._score = spy
    try:
        first, failed, rest = client.portal.call(concurrently)
    finally:
        del service._score
    assert batches[0] == 3, batches  # the three requests were scored as one micro-batch ...
    assert batches[1:] == [1, 1, 1]  # ... which failed, so each was scored alone
    assert isinstance(failed, ValueError) and "not a time" in str(failed)
    got = [first[0], *rest]
    assert [p["transaction_id"] for p in got] == ["mate-0", "mate-1", "mate-2"]
    assert [p["probability"] for p in got] == alone
    text = client.get("/metrics").text
    assert 'ml_platform_prediction_errors_total{reason="internal_error"} 1.0' in text


async def _parse_ts(value: str):
    from datetime import datetime

    return datetime.fromisoformat(value)


# --------------------------------------------------------------------------- request limits


def test_a_batch_over_max_request_rows_is_a_4xx_naming_the_limit(client, tiny_platform):
    rows = [tiny_platform.transaction(transaction_id=f"limit-{i}") for i in range(4)]
    resp = client.post("/predict/batch", json={"transactions": rows})
    assert resp.status_code == 422
    out = resp.json()
    assert "max_request_rows=3" in out["message"] and "4 rows" in out["message"]
    assert out["errors"] == [
        {
            "field": "transactions",
            "message": "at most max_request_rows=3 rows per call",
            "type": "too_many_rows",
            "input": 4,
        }
    ]
    ok = client.post("/predict/batch", json={"transactions": rows[:3]})
    assert ok.status_code == 200 and len(ok.json()["predictions"]) == 3


# --------------------------------------------------------------------------- unseen values


def _unseen_count(client, column: str) -> float:
    name = f'ml_platform_unseen_values_total{{column="{column}"}} '
    lines = [line for line in client.get("/metrics").text.splitlines() if line.startswith(name)]
    return float(lines[0].rsplit(" ", 1)[1]) if lines else 0.0


def test_categorical_values_the_model_never_saw_are_flagged(client, tiny_platform):
    counted = {c: _unseen_count(client, c) for c in ("merchant_category", "device")}
    seen = client.post("/predict", json=_seen_body(tiny_platform)).json()
    assert seen["flags"]["unseen_values"] == []
    new = client.post("/predict", json=_seen_body(tiny_platform, merchant_category="spaceships")).json()
    assert new["flags"]["unseen_values"] == ["merchant_category"]
    assert new["flags"]["unknown_entity"] is False  # the card holder and merchant are known
    two = client.post(
        "/predict/batch",
        json={
            "transactions": [
                _seen_body(tiny_platform, merchant_category="moon_base"),
                _seen_body(tiny_platform),
            ]
        },
    ).json()["predictions"]
    assert two[0]["flags"]["unseen_values"] == ["merchant_category"]
    assert two[1]["flags"]["unseen_values"] == []
    assert _unseen_count(client, "merchant_category") == counted["merchant_category"] + 2
    assert _unseen_count(client, "device") == counted["device"]  # device is a closed vocabulary: refused
    refused = client.post("/predict", json=_seen_body(tiny_platform, device="toaster"))
    assert refused.status_code == 422 and [e["field"] for e in refused.json()["errors"]] == ["device"]


# --------------------------------------------------------------------------- failed loads


def _register_unloadable_version(registry, root) -> int:
    """A registered version whose model cannot be loaded (saved as a pickle, which the platform's
    loader refuses): what a broken or foreign registration looks like to a server."""
    artifacts = root / "broken_model"
    artifacts.mkdir(exist_ok=True)
    (artifacts / "MLmodel").write_text(
        "flavors:\n  sklearn:\n    pickled_model: model.pkl\n    serialization_format: pickle\n"
    )
    (artifacts / "model.pkl").write_bytes(b"not a model")
    # logged into a run, as a tracking server requires of a version's source (a SQLite store does not)
    experiment = registry.client.get_experiment_by_name(registry.model_name) or registry.client.search_experiments()[0]
    run = registry.client.create_run(experiment.experiment_id)
    registry.client.log_artifacts(run.info.run_id, str(artifacts), "broken_model")
    registry.client.set_terminated(run.info.run_id)
    created = registry.client.create_model_version(
        name=registry.model_name, source=f"runs:/{run.info.run_id}/broken_model", run_id=run.info.run_id
    )
    return int(created.version)


def test_a_champion_that_fails_to_load_leaves_the_old_model_serving_and_is_reported(client, tiny_platform):
    registry = tiny_platform.registry
    body = tiny_platform.transaction(transaction_id="failed-load")
    before = client.post("/predict", json=body).json()
    assert before["model_version"] == 2
    broken = _register_unloadable_version(registry, tiny_platform.root)
    try:
        registry.set_alias(CHAMPION, broken, who="test", why="a broken registration", action="set")
        assert _eventually(lambda: client.get("/model").json()["last_error"] is not None)
        status = client.get("/model").json()
        assert f"v{broken}" in status["last_error"] and "pickle" in status["last_error"]
        assert status["serving"]["version"] == 2 and broken not in status["loaded_versions"]
        ready = client.get("/health/ready").json()["checks"]["model"]
        assert ready["ok"] is True and ready["version"] == 2 and f"v{broken}" in ready["error"]
        after = client.post("/predict", json=body)
        assert after.status_code == 200 and after.json()["model_version"] == 2
        assert after.json()["probability"] == before["probability"]
    finally:
        registry.set_alias(CHAMPION, 2, who="test", why="restore", action="set")
    assert json.loads(client.post("/predict", json=body).text)["model_version"] == 2
