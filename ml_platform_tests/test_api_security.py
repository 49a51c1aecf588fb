"""The API's guards on a real tiny platform: the optional bearer token (401 on the mutating
endpoints once set, on every endpoint but health and metrics with auth_scope="all") and the body
size limit (413, declared or streamed)."""

from __future__ import annotations

import pytest
from fixtures_platform import tiny_platform  # noqa: F401  (module fixture)
from pydantic import SecretStr

from ml_platform.serving.api import ServingConfig, create_app
from ml_platform.serving.api.testing import InProcessClient

# Run a second time in the production profile (make test-production).
pytestmark = pytest.mark.integration

TOKEN = "t0k-" + "x" * 28
FEEDBACK = {"prediction_id": "never-made", "reward": 1}


@pytest.fixture(scope="module")
def guarded(tiny_platform):  # noqa: F811
    settings = tiny_platform.settings.model_copy(update={"api_token": SecretStr(TOKEN)})
    with InProcessClient(create_app(settings, ServingConfig(poll_interval_s=60, max_body_bytes=4096))) as c:
        yield c


@pytest.fixture(scope="module")
def guarded_all(tiny_platform):  # noqa: F811
    settings = tiny_platform.settings.model_copy(update={"api_token": SecretStr(TOKEN)})
    with InProcessClient(create_app(settings, ServingConfig(poll_interval_s=60, auth_scope="all"))) as c:
        yield c


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def test_without_a_token_configured_no_endpoint_asks_for_one(tiny_platform):  # noqa: F811
    with InProcessClient(create_app(tiny_platform.settings, ServingConfig(poll_interval_s=60))) as c:
        assert c.post("/feedback", json=FEEDBACK).status_code == 404  # reached the handler: unknown id
        assert c.post("/predict", json=tiny_platform.transaction()).status_code == 200


def test_mutating_endpoints_need_the_token_once_it_is_set(guarded, tiny_platform):  # noqa: F811
    for path, body in (("/feedback", FEEDBACK), ("/feedback/batch", {"feedback": [FEEDBACK]})):
        missing = guarded.post(path, json=body)
        assert missing.status_code == 401, (path, missing.text)
        assert missing.headers["www-authenticate"] == "Bearer"
        assert missing.json()["error"] == "unauthorized" and "Authorization: Bearer" in missing.json()["message"]
        assert guarded.post(path, json=body, headers=bearer(TOKEN[:-1] + "y")).status_code == 401
        assert guarded.post(path, json=body, headers={"Authorization": TOKEN}).status_code == 401  # no scheme
        assert guarded.post(path, json=body, headers=bearer(TOKEN)).status_code in (200, 404)
    # scoring and health stay open in the default scope
    assert guarded.post("/predict", json=tiny_platform.transaction()).status_code == 200
    assert guarded.get("/health").status_code == 200


def test_scope_all_guards_scoring_and_reads_but_not_health_or_metrics(guarded_all, tiny_platform):  # noqa: F811
    body = tiny_platform.transaction()
    for method, path, kwargs in (("post", "/predict", {"json": body}), ("get", "/model", {}),
                                 ("get", "/experiments", {}),
                                 ("post", "/predict/batch", {"json": {"transactions": [body]}})):
        assert getattr(guarded_all, method)(path, **kwargs).status_code == 401, path
        assert getattr(guarded_all, method)(path, headers=bearer(TOKEN), **kwargs).status_code == 200, path
    for path in ("/health", "/health/ready", "/metrics"):
        assert guarded_all.get(path).status_code == 200, path


def test_a_body_over_the_limit_is_refused_with_413_declared_or_streamed(guarded, tiny_platform):  # noqa: F811
    one = tiny_platform.transaction()
    small = {"transactions": [one] * 5}  # ~1.6 kB: under the 4 kB limit
    assert guarded.post("/predict/batch", json=small).status_code == 200
    big = {"transactions": [one] * 40}  # ~13 kB
    refused = guarded.post("/predict/batch", json=big)
    assert refused.status_code == 413
    assert refused.json()["error"] == "payload_too_large" and "at most 4096" in refused.json()["message"]
    import json

    payload = json.dumps(big).encode()

    async def chunks():  # no Content-Length: the limit is enforced while the body streams in
        for start in range(0, len(payload), 1000):
            yield payload[start : start + 1000]

    streamed = guarded.post("/predict/batch", content=chunks(), headers={"content-type": "application/json"})
    assert streamed.status_code == 413 and "more than 4096" in streamed.json()["message"]
