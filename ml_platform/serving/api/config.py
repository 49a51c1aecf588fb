"""The serving process's knobs (`ServingConfig`): scorer choice, polling, batching, Redis timeouts."""

from __future__ import annotations

from dataclasses import dataclass

from ml_platform.registry import CHAMPION
from ml_platform.serving.prediction_log import DEFAULT_MAXLEN


@dataclass(frozen=True)
class ServingConfig:
    """Knobs of the serving process (defaults fit one uvicorn worker on a small machine)."""

    scorer: str = "auto"  # "auto" (fast path where supported and parity holds), "treelite", "sklearn"
    alias: str = CHAMPION
    poll_interval_s: float = 1.0  # how often the registry's aliases are checked
    max_batch_rows: int = 256  # rows scored together at most (micro-batching)
    max_request_rows: int = 1000  # rows one /predict/batch call may send
    redis_socket_timeout_s: float = 0.5  # a hung Redis fails a request after this long ...
    redis_connect_timeout_s: float = 0.25
    redis_retries: int = 1  # ... times (1 + retries); redis-py's default takes ~4 s to fail
    experiment_refresh_s: float = 0.5  # how often the active experiment and its posteriors are re-read
    shadow_max_pending: int = 4  # shadow batches waiting at most; beyond, shadow rows are dropped (counted)
    max_feedback_rows: int = 10_000  # rewards one POST /feedback/batch may send
    # Larger request bodies get 413 (a full /predict/batch of max_request_rows is ~0.3 MB, a full
    # /feedback/batch ~0.8 MB).
    max_body_bytes: int = 2 * 2**20
    # With ML_PLATFORM_API_TOKEN set: "mutating" asks for it on POST /feedback*, "all" on every
    # endpoint but health and metrics.
    auth_scope: str = "mutating"
    # Keep a local copy of every model served, so a restart during a registry outage still serves
    # the champion it served last (serving.model_cache).
    model_cache: bool = True
    prediction_log: bool = True
    prediction_log_maxlen: int = DEFAULT_MAXLEN
    # The app owns its process (run_server sets this): freeze the start-up heap out of the garbage
    # collector and shorten the GIL switch interval. Off for an app embedded elsewhere (tests).
    tune_process: bool = False

    def __post_init__(self) -> None:
        from ml_platform.serving.scorer import SCORERS

        if self.scorer not in SCORERS:
            raise ValueError(f"ServingConfig.scorer must be one of {SCORERS}, got {self.scorer!r}")
        from ml_platform.serving.api.security import AUTH_SCOPES

        if self.auth_scope not in AUTH_SCOPES:
            raise ValueError(f"ServingConfig.auth_scope must be one of {AUTH_SCOPES}, got {self.auth_scope!r}")
        if self.max_body_bytes < 1024:
            raise ValueError(f"ServingConfig.max_body_bytes must be >= 1024, got {self.max_body_bytes}")
        if self.poll_interval_s <= 0 or self.max_batch_rows < 1 or self.max_request_rows < 1:
            raise ValueError(
                "ServingConfig: poll_interval_s must be > 0, max_batch_rows and max_request_rows >= 1 "
                f"(got {self.poll_interval_s}, {self.max_batch_rows}, {self.max_request_rows})"
            )
