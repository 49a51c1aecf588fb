"""The real-time prediction API against a real Redis (127.0.0.1:6379, a unique key prefix) and a
real MLflow registry (SQLite in a temp dir): online/offline parity, validation, unknown entities,
Redis outages, metrics, hot reload, the prediction log and its drain to Parquet."""

from __future__ import annotations

import math
import random
import time
from datetime import UTC, datetime, timedelta

import numpy as np
import pandas as pd
import pytest

from ml_platform import features as fr
from ml_platform.registry import CHAMPION
from ml_platform.serving.api import ServingConfig, create_app
from ml_platform.serving.api.testing import InProcessClient
from ml_platform.serving.prediction_log import ENTRY_FIELD, FEATURE_PREFIX, prediction_stream_key
from ml_platform.serving.prediction_log_drain import drain_prediction_log
from ml_platform.serving.prediction_log_reader import read_prediction_log
from ml_platform.serving.scoring import assemble_features

# Run a second time in the production profile (make test-production).
pytestmark = pytest.mark.integration

try:  # ml_platform_tests on sys.path (rootdir conftest) or imported as a package
    from fixtures_platform import TcpProxy, serving_settings, tiny_platform
except ImportError:
    from ml_platform_tests.fixtures_platform import TcpProxy, serving_settings, tiny_platform  # noqa: F401


@pytest.fixture(scope="module")
def client(tiny_platform):
    app = create_app(tiny_platform.settings, ServingConfig(poll_interval_s=0.2))
    with InProcessClient(app) as c:
        yield c


def _state(client):
    return client.app.state.serving


def offline_probabilities(
    platform, version: int, transactions: list[dict]
) -> tuple[np.ndarray, pd.DataFrame]:
    """The offline computation of the same predictions: point-in-time features from the offline
    store at `feature_lookup_time(event_timestamp)`, request features by assemble_features, then
    the scikit-learn Pipeline (no fast path anywhere)."""
    model, contract = platform.registry.load_model(version)
    tx = pd.DataFrame(transactions)
    tx[fr.EVENT_TS] = pd.to_datetime(tx[fr.EVENT_TS], utc=True, format="ISO8601")
    entity_df = tx[["user_id", "merchant_id"]].assign(
        **{fr.EVENT_TS: fr.feature_lookup_time(tx[fr.EVENT_TS])}
    )
    historical = platform.store.get_historical_features(entity_df, list(contract.feature_refs))
    frame = assemble_features(tx, historical[list(contract.feature_columns)])
    X = contract.model_input(frame)
    return model.predict_proba(X)[:, 1], X


def _requests_for_known_entities(platform, n: int, seed: int = 0) -> list[dict]:
    """n transactions of real card holder / merchant pairs, at various times today (after every
    generated event), with varied categories, countries, devices, channels and amounts."""
    rng = random.Random(seed)
    pairs = platform.events[["user_id", "merchant_id"]].drop_duplicates().sample(n=n - 1, random_state=seed)
    pairs = [platform.known_pair(), *pairs.itertuples(index=False)]
    midnight = datetime.now(UTC).replace(hour=0, minute=0, second=0, microsecond=0)
    elapsed = (datetime.now(UTC) - midnight).total_seconds()
    return [
        platform.transaction(
            transaction_id=f"parity-{i}",
            user_id=int(u),
            merchant_id=int(m),
            merchant_category=rng.choice(
                ["grocery", "electronics", "travel", "gift_cards", "brand_new_category"]
            ),
            amount=round(rng.lognormvariate(3.5, 1.2), 2),
            country=rng.choice(["DE", "FR", "US", "GB", "NL"]),
            device=rng.choice(["ios", "android", "desktop"]),
            channel=rng.choice(["online", "pos"]),
            event_timestamp=(midnight + timedelta(seconds=rng.uniform(1, max(elapsed - 1, 2)))).isoformat(),
        )
        for i, (u, m) in enumerate(pairs)
    ]


def _same(a, b) -> bool:
    a_null = a is None or (isinstance(a, float) and math.isnan(a))
    b_null = b is None or (isinstance(b, float) and math.isnan(b))
    if a_null or b_null:
        return a_null and b_null
    if isinstance(a, str) or isinstance(b, str):
        return a == b
    return float(a) == float(b)


# --------------------------------------------------------------------------- parity


def test_predictions_equal_the_offline_computation_for_the_same_entities_and_times(client, tiny_platform):
    transactions = _requests_for_known_entities(tiny_platform, 25)
    resp = client.post("/predict/batch?include_features=true", json={"transactions": transactions})
    assert resp.status_code == 200, resp.text
    predictions = resp.json()["predictions"]
    expected, X = offline_probabilities(tiny_platform, 2, transactions)
    assert [p["transaction_id"] for p in predictions] == [t["transaction_id"] for t in transactions]
    threshold = tiny_platform.registry.get_contract(2).decision_threshold
    for i, p in enumerate(predictions):
        assert p["model_version"] == 2 and p["scorer"] == "compiled+treelite"
        assert abs(p["probability"] - expected[i]) < 1e-9, (i, p["probability"], expected[i])
        assert p["decision"] == ("fraud" if expected[i] >= threshold else "legit")
        assert p["threshold"] == threshold
        assert not p["flags"]["unknown_entity"]
        mismatched = {
            c: (p["features"][c], X[c].iloc[i])
            for c in X.columns
            if not _same(p["features"][c], X[c].iloc[i])
        }
        assert not mismatched, f"row {i}: online != offline for {mismatched}"
    # The looked-up features are real: the newest event's card holder has history.
    assert predictions[0]["features"]["txn_count_30d"] >= 1
    # /predict gives the same answer as the batch row, with its own prediction id.
    single = client.post("/predict", json=transactions[3]).json()
    assert single["probability"] == predictions[3]["probability"]
    assert single["prediction_id"] != predictions[3]["prediction_id"]
    assert "features" not in single


def test_unknown_entity_is_flagged_and_scored_with_null_features(client, tiny_platform):
    body = tiny_platform.transaction(user_id=10**12, transaction_id="new-card")
    resp = client.post("/predict?include_features=true", json=body)
    assert resp.status_code == 200, resp.text
    p = resp.json()
    assert p["flags"]["unknown_entity"] is True and p["flags"]["unknown_user"] is True
    assert p["flags"]["unknown_merchant"] is False
    assert sorted(p["flags"]["missing_views"]) == [
        "user_merchant_stats",
        "user_profile",
        "user_transaction_stats",
    ]
    assert p["features"]["txn_count_30d"] is None and p["features"]["home_country"] is None
    assert p["features"]["is_foreign"] is None and p["features"]["amount_to_user_mean_30d"] is None
    assert p["features"]["merchant_txn_count_24h"] is not None  # the merchant is known
    expected, _ = offline_probabilities(tiny_platform, 2, [body])
    assert abs(p["probability"] - expected[0]) < 1e-9


# --------------------------------------------------------------------------- validation


@pytest.mark.parametrize(
    ("change", "field", "fragment"),
    [
        ({"amount": -5}, "amount", "greater than 0"),
        ({"amount": 0}, "amount", "greater than 0"),
        ({"country": "DEU"}, "country", "at most 2 characters"),
        ({"country": "de"}, "country", "matching [A-Z]{2}"),
        ({"device": "fax"}, "device", "one of ['ios'"),
        ({"user_id": "abc"}, "user_id", "integer"),
        ({"user_id": 2**64}, "user_id", "less than or equal"),
        ({"event_timestamp": "yesterday"}, "event_timestamp", "ISO-8601"),
        ({"ammount": 5}, "ammount", "Extra inputs"),
        ({"transaction_id": ""}, "transaction_id", "at least 1"),
    ],
)
def test_bad_input_is_a_422_naming_the_field(client, tiny_platform, change, field, fragment):
    body = tiny_platform.transaction(**change)
    resp = client.post("/predict", json=body)
    assert resp.status_code == 422
    out = resp.json()
    assert out["error"] == "invalid_request"
    assert [e["field"] for e in out["errors"]] == [field]
    assert fragment in out["errors"][0]["message"] and out["message"].startswith(f"{field}: ")


def test_missing_fields_and_bad_batch_rows_are_named(client, tiny_platform):
    body = tiny_platform.transaction()
    del body["merchant_id"]
    out = client.post("/predict", json=body).json()
    assert [e["field"] for e in out["errors"]] == ["merchant_id"] and out["errors"][0]["type"] == "missing"
    rows = [tiny_platform.transaction(), tiny_platform.transaction(amount=-1)]
    out = client.post("/predict/batch", json={"transactions": rows}).json()
    assert [e["field"] for e in out["errors"]] == ["transactions.1.amount"]


def test_malformed_json_is_a_422_naming_the_body(client):
    resp = client.post("/predict", content=b'{"user_id": 1, oops}', headers={"content-type": "application/json"})
    assert resp.status_code == 422
    (error,) = resp.json()["errors"]
    assert (error["field"], error["type"]) == ("body", "json_invalid")  # not "15", a character offset
    assert "at character 15" in error["message"] and resp.json()["message"].startswith("body: JSON")
    resp = client.post("/predict/batch", content=b"[1, 2", headers={"content-type": "application/json"})
    assert resp.status_code == 422 and [e["field"] for e in resp.json()["errors"]] == ["body"]


def test_defaults_and_openapi_example(client, tiny_platform):
    body = tiny_platform.transaction(country="DE")
    del body["event_timestamp"]  # default: now
    p = client.post("/predict?include_features=true", json=body).json()
    assert p["features"]["country"] == "DE"
    assert p["features"]["hour_of_day"] == datetime.now(UTC).hour or p["features"]["hour_of_day"] == (
        (datetime.now(UTC) - timedelta(seconds=5)).hour
    )
    spec = client.get("/openapi.json").json()
    body_spec = spec["paths"]["/predict"]["post"]["requestBody"]["content"]["application/json"]
    (example,) = [e["value"] for e in body_spec["examples"].values()]
    resp = client.post("/predict", json=example)
    assert resp.status_code == 200, resp.text  # the documented example is a valid request
    # Amounts are cents: documented as multipleOf 0.01, a fraction of a cent refused by name.
    schema = spec["components"]["schemas"][body_spec["schema"]["$ref"].rsplit("/", 1)[-1]]
    assert schema["properties"]["amount"]["multipleOf"] == 0.01
    finer = client.post("/predict", json={**example, "amount": 12.345})
    assert finer.status_code == 422 and "amount" in finer.text and "at most 2 decimal places" in finer.text
    (batch_example,) = [
        e["value"]
        for e in spec["paths"]["/predict/batch"]["post"]["requestBody"]["content"]["application/json"][
            "examples"
        ].values()
    ]
    assert len(client.post("/predict/batch", json=batch_example).json()["predictions"]) == 2
    assert client.get("/docs").status_code == 200


# --------------------------------------------------------------------------- health and metrics


def test_health_readiness_and_metrics(client, tiny_platform):
    assert client.get("/health").json()["status"] == "ok"
    ready = client.get("/health/ready")
    assert ready.status_code == 200, ready.text
    checks = ready.json()["checks"]
    assert checks["model"] == {"ok": True, "version": 2, "scorer": "compiled+treelite", "error": None}
    assert checks["redis"]["ok"] and checks["online_store"]["not_materialized"] == []
    for _ in range(3):
        assert client.post("/predict", json=tiny_platform.transaction()).status_code == 200
    client.post("/predict", json=tiny_platform.transaction(amount=-1))
    text = client.get("/metrics").text
    requests = _metric(text, 'ml_platform_http_requests_total{path="/predict",status="200"}')
    assert requests >= 3
    assert _metric(text, 'ml_platform_http_requests_total{path="/predict",status="422"}') >= 1
    assert _metric(text, 'ml_platform_http_request_duration_seconds_count{path="/predict"}') >= requests
    assert 'ml_platform_http_request_duration_seconds_bucket{le="0.025",path="/predict"}' in text
    scored = _metric(text, "ml_platform_prediction_score_count")
    assert scored >= 3 and _metric(text, 'ml_platform_prediction_score_bucket{le="1.0"}') == scored
    assert _metric(text, "ml_platform_model_version") == 2.0
    assert _metric(text, 'ml_platform_model_info{model_version="2",scorer="compiled+treelite"}') == 1.0
    legit = _metric(text, 'ml_platform_predictions_total{decision="legit",model_version="2"}', default=0.0)
    fraud = _metric(text, 'ml_platform_predictions_total{decision="fraud",model_version="2"}', default=0.0)
    assert legit + fraud == scored
    assert "ml_platform_prediction_log_written_total" in text


def _metric(text: str, name: str, default: float | None = None) -> float:
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.rsplit(" ", 1)[1])
    if default is not None:
        return default
    raise AssertionError(f"metric {name} not found in:\n{text[:3000]}")


# --------------------------------------------------------------------------- outages


def test_redis_outage_is_a_503_and_the_service_recovers_by_itself(tiny_platform):
    proxy = TcpProxy()  # not started: the port refuses connections (Redis down)
    settings = tiny_platform.settings.model_copy(update={"redis_url": proxy.url_for(tiny_platform.settings.redis_url)})
    body = tiny_platform.transaction()
    app = create_app(settings, ServingConfig(poll_interval_s=60))
    try:
        with InProcessClient(app) as c:
            started = time.perf_counter()
            resp = c.post("/predict", json=body)
            assert time.perf_counter() - started < 1.5  # short timeouts, no 4 s of retries
            assert resp.status_code == 503 and resp.headers["retry-after"] == "1"
            assert resp.json()["error"] == "redis_unavailable" and "unreachable" in resp.json()["message"]
            assert c.get("/health").status_code == 200  # alive, just not ready
            ready = c.get("/health/ready")
            assert ready.status_code == 503 and ready.json()["checks"]["redis"]["ok"] is False

            proxy.start()  # Redis is back
            assert _eventually(lambda: c.post("/predict", json=body).status_code == 200)
            assert c.get("/health/ready").status_code == 200

            proxy.stop()  # an outage with connections open (a restart, a network cut)
            assert c.post("/predict", json=body).status_code == 503
            proxy.start()
            assert _eventually(lambda: c.post("/predict", json=body).status_code == 200)
            text = c.get("/metrics").text
            assert _metric(text, 'ml_platform_prediction_errors_total{reason="redis_unavailable"}') >= 2
    finally:
        proxy.stop()


def test_no_champion_is_a_503_naming_the_alias(tmp_path, tiny_platform):
    settings = serving_settings(tmp_path, tiny_platform.project)  # an empty MLflow store
    with InProcessClient(create_app(settings, ServingConfig(poll_interval_s=60))) as c:
        resp = c.post("/predict", json=tiny_platform.transaction())
        assert resp.status_code == 503 and resp.json()["error"] == "model_not_loaded"
        assert "'champion'" in resp.json()["message"]
        assert c.get("/health/ready").json()["checks"]["model"]["ok"] is False


def _eventually(check, timeout: float = 5.0, every: float = 0.1) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(every)
    return False


# --------------------------------------------------------------------------- hot reload


def test_alias_change_is_served_within_seconds_from_memory(client, tiny_platform):
    registry = tiny_platform.registry
    body = tiny_platform.transaction(transaction_id="reload")
    assert client.post("/predict", json=body).json()["model_version"] == 2
    assert 1 in _state(client).holder.loaded_versions()  # previous champion preloaded
    try:
        registry.set_alias(CHAMPION, 1, who="test", why="hot reload test", action="set")
        started = time.monotonic()
        assert _eventually(lambda: client.post("/predict", json=body).json()["model_version"] == 1, timeout=5)
        noticed = time.monotonic() - started
        p = client.post("/predict?include_features=true", json=body).json()
        expected, _ = offline_probabilities(tiny_platform, 1, [body])
        assert abs(p["probability"] - expected[0]) < 1e-9
        assert "merchant_txn_count_24h" not in p["features"]  # v1's contract reads only user views
        swap = client.get("/model").json()["swaps"][-1]
        assert (swap["from_version"], swap["to_version"], swap["preloaded"]) == (2, 1, True)
        assert swap["swap_seconds"] < 0.5 and noticed < 3.0
    finally:
        registry.set_alias(CHAMPION, 2, who="test", why="restore", action="set")
    assert _eventually(lambda: client.post("/predict", json=body).json()["model_version"] == 2)


# --------------------------------------------------------------------------- prediction log


def test_every_prediction_is_logged_and_drained_to_parquet_exactly_once(client, tiny_platform, tmp_path):
    state = _state(client)
    stream = prediction_stream_key(tiny_platform.project)
    r = tiny_platform.redis
    assert client.portal.call(state.log.flush, 5.0)  # earlier tests' entries reach the stream ...
    drain_prediction_log(r, stream, tmp_path / "warmup")  # ... and are drained: the stream is empty
    transactions = [tiny_platform.transaction(transaction_id=f"log-{i}", amount=10.0 + i) for i in range(7)]
    ids = [client.post("/predict", json=t).json()["prediction_id"] for t in transactions[:4]]
    ids += [
        p["prediction_id"]
        for p in client.post("/predict/batch", json={"transactions": transactions[4:]}).json()["predictions"]
    ]
    assert client.portal.call(state.log.flush, 5.0)
    entries = r.xrange(stream)
    assert len(entries) == 7
    import json

    first = json.loads(entries[0][1][ENTRY_FIELD.encode()])
    assert first["prediction_id"] == ids[0] and first["transaction_id"] == "log-0" and first["amount"] == 10.0
    assert first["model_version"] == 2 and first["features"]["amount"] == 10.0
    answered = client.post("/predict", json=transactions[0]).json()  # the log's latency is the answer's
    assert client.portal.call(state.log.flush, 5.0)
    logged = json.loads(r.xrange(stream)[-1][1][ENTRY_FIELD.encode()])
    assert logged["prediction_id"] == answered["prediction_id"]
    assert logged["latency_ms"] == pytest.approx(answered["latency_ms"], abs=1e-3)
    r.xdel(stream, r.xrange(stream)[-1][0])
    assert set(first["features"]) == set(tiny_platform.registry.get_contract(2).input_columns)

    # A copy of the same entries (same ids) in a second stream: a drain that crashed after writing
    # its files and before trimming leaves exactly this behind.
    replay = stream + ":replay"
    for sid, fields in entries:
        r.xadd(replay, fields, id=sid)
    out_dir = tmp_path / "predictions_log"
    result = drain_prediction_log(r, stream, out_dir)
    assert result["rows"] == 7 and r.xlen(stream) == 0
    assert all("/source=api/date=" in f for f in result["files"])
    table = read_prediction_log(out_dir)
    assert sorted(table["prediction_id"]) == sorted(ids) and set(table["source"]) == {"api"}
    assert set(table["transaction_id"]) == {f"log-{i}" for i in range(7)}
    row = table.set_index("prediction_id").loc[ids[0]]
    assert row["model_version"] == 2 and row["decision"] in ("fraud", "legit") and row["amount"] == 10.0
    assert row["feature.amount"] == 10.0 and json.loads(row["flags"])["unknown_entity"] is False
    logged_inputs = {c.removeprefix(FEATURE_PREFIX) for c in table.columns if c.startswith(FEATURE_PREFIX)}
    assert logged_inputs == set(tiny_platform.registry.get_contract(2).input_columns)  # the model's inputs, typed
    assert str(table["predicted_at"].dtype) == "datetime64[us, UTC]"

    again = drain_prediction_log(r, replay, out_dir)
    assert again["rows"] == 0 and again["skipped"] == 7 and r.xlen(replay) == 0  # nothing written twice
    assert len(read_prediction_log(out_dir)) == 7
    assert drain_prediction_log(r, stream, out_dir)["rows"] == 0  # idempotent
    r.delete(replay)
