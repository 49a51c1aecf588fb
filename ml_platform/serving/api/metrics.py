"""The API's Prometheus metrics (`ServingMetrics`, one registry per app) and the ASGI middleware
that counts and times every HTTP request, labelled by the route template that matched."""

from __future__ import annotations

import time
from typing import Any

from ml_platform.serving.prediction_log import PredictionLogWriter

# The `path` label of requests no route matched (404s, scanners): one label, not one per URL.
UNMATCHED_PATH = "other"


class ServingMetrics:
    """The Prometheus metrics of one app (own registry, so several apps can live in one process)."""

    def __init__(self) -> None:
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, ProcessCollector

        self.registry = CollectorRegistry()
        r = self.registry
        ProcessCollector(registry=r)  # process_cpu_seconds_total: the cost asset's serving CPU
        self.http_requests = Counter(
            "ml_platform_http_requests",
            "HTTP requests by route and status code",
            ["path", "status"],
            registry=r,
        )
        self.http_latency = Histogram(
            "ml_platform_http_request_duration_seconds",
            "HTTP request latency in the app, by route",
            ["path"],
            buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5),
            registry=r,
        )
        self.predictions = Counter(
            "ml_platform_predictions",
            "Predictions made, by model version and decision",
            ["model_version", "decision"],
            registry=r,
        )
        self.prediction_errors = Counter(
            "ml_platform_prediction_errors", "Predictions that failed, by reason", ["reason"], registry=r
        )
        self.score = Histogram(
            "ml_platform_prediction_score",
            "Distribution of predicted fraud probabilities",
            buckets=(0.001, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.3, 0.5, 0.7, 0.9, 1.0),
            registry=r,
        )
        self.unknown_entities = Counter(
            "ml_platform_unknown_entities",
            "Predictions for a card holder or merchant unknown online",
            registry=r,
        )
        self.unseen_values = Counter(
            "ml_platform_unseen_values",
            "Predictions with a categorical value the model never saw, by input column",
            ["column"],
            registry=r,
        )
        self.batch_rows = Histogram(
            "ml_platform_scoring_batch_rows",
            "Rows scored together (micro-batching)",
            buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024),
            registry=r,
        )
        self.stage_seconds = Histogram(
            "ml_platform_scoring_stage_seconds",
            "Where a prediction's time goes: queue (waiting for the batcher), features (the online "
            "store read), score (request features + model), per batch",
            ["stage"],
            buckets=(0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25),
            registry=r,
        )
        self.model_version = Gauge(
            "ml_platform_model_version", "Model version serving now (0: none)", registry=r
        )
        self.model_info = Gauge(
            "ml_platform_model_info", "1 for the version serving now", ["model_version", "scorer"], registry=r
        )
        self.model_swaps = Counter("ml_platform_model_swaps", "Champion swaps since start", registry=r)
        self.feedback = Counter(
            "ml_platform_feedback",
            "Rewards received by POST /feedback, by outcome (accepted, unknown, duplicate, invalid)",
            ["outcome"],
            registry=r,
        )
        self._info_labels: tuple[str, str] | None = None
        self._children: dict[tuple, Any] = {}

    def attach_log(self, writer: PredictionLogWriter | None) -> None:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        if writer is None:
            return

        class _LogCollector:
            def collect(self):
                yield GaugeMetricFamily(
                    "ml_platform_prediction_log_pending",
                    "Log entries waiting for Redis",
                    value=writer.pending,
                )
                for name, value, text in (
                    ("written", writer.written, "Log entries written to the stream"),
                    ("dropped", writer.dropped, "Log entries dropped (buffer full while Redis was down)"),
                    ("errors", writer.errors, "Failed writes to the log stream"),
                ):
                    yield CounterMetricFamily(f"ml_platform_prediction_log_{name}", text, value=value)

        self.registry.register(_LogCollector())

    def set_model(self, model: Any) -> None:
        """The serving model's gauges (`model` a ServingModel, or None)."""
        self.model_version.set(model.version if model else 0)
        labels = (str(model.version), model.scoring.name) if model else None
        if self._info_labels and self._info_labels != labels:
            self.model_info.labels(*self._info_labels).set(0)
        if labels:
            self.model_info.labels(*labels).set(1)
        self._info_labels = labels

    def child(self, metric: Any, *labels: str) -> Any:
        """A labelled child, cached (labels() costs a dict lookup + lock each call)."""
        key = (id(metric), labels)
        found = self._children.get(key)
        if found is None:
            found = self._children[key] = metric.labels(*labels)
        return found

    def exposition(self) -> tuple[bytes, str]:
        """(Prometheus text, its content type)."""
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return generate_latest(self.registry), CONTENT_TYPE_LATEST


class HttpMetricsMiddleware:
    """Counts every HTTP request by route and status, and times it (a plain ASGI middleware:
    Starlette's BaseHTTPMiddleware costs far more per request).

    The `path` label is the template of the route that matched (the router records it in the
    request's scope), so a new endpoint is labelled without a list to edit, and a URL no route
    matches is labelled `other` rather than growing the label set."""

    def __init__(self, app, metrics: ServingMetrics):
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500

        async def send_with_status(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_with_status)
        finally:
            route = scope.get("route")
            path = getattr(route, "path", None) or UNMATCHED_PATH
            m = self.metrics
            m.child(m.http_requests, path, str(status)).inc()
            m.child(m.http_latency, path).observe(time.perf_counter() - started)
