"""How a stream worker is configured: where it reads and writes, how it batches, claims and
deduplicates, and how it scores."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta

from ml_platform.settings import DEFAULT_STREAM_BATCH_SIZE, DEFAULT_STREAM_GROUP


@dataclass(frozen=True)
class StreamConfig:
    """Where the worker reads and writes, and how it batches, claims and deduplicates.

    Stream names default to `<project>:stream:transactions` (input), `:predictions` (output) and
    `:dead_letter`. `claim_idle_ms`: a pending entry idle this long belongs to a dead worker and is
    claimed (XAUTOCLAIM); `max_deliveries`: an entry claimed more often than this is dead-lettered
    (it keeps killing workers). `done_ttl_s`: how long an event id is remembered (replays within it
    are recognised). `seed_history`: on a cold start (no stream state yet) fold the raw events of
    the last windows into the buffers first, so aggregates include history.
    """

    input_stream: str | None = None
    output_stream: str | None = None
    dead_letter_stream: str | None = None
    group: str = DEFAULT_STREAM_GROUP
    consumer: str | None = None
    batch_size: int = DEFAULT_STREAM_BATCH_SIZE
    block_ms: int = 1000
    claim_idle_ms: int = 30_000
    claim_interval_s: float = 5.0
    max_deliveries: int = 10
    model_poll_s: float = 3.0
    done_ttl_s: int = 86400
    output_maxlen: int = 0
    seed_history: bool = True
    trim_slack: timedelta = timedelta(days=1)
    scorer: str = "auto"  # fast_scorer.build_scoring_path: "auto" (treelite if it agrees), "sklearn"
    # the model's input values in each prediction (`features`): the prediction log's inputs.
    # False: smaller outputs, and the log's stream rows have no inputs.
    include_features: bool = True
    pipeline: bool = True  # write batch N (online update + emit) while batch N+1 is read and folded

    def __post_init__(self) -> None:
        if not 1 <= self.batch_size <= 10_000:
            raise ValueError(f"StreamConfig.batch_size must be in [1, 10000], got {self.batch_size}")
        if self.claim_idle_ms < 0 or self.block_ms < 0:
            raise ValueError(
                f"StreamConfig.claim_idle_ms and block_ms must be >= 0, got {self.claim_idle_ms} and {self.block_ms}"
            )
        if self.done_ttl_s <= 0:
            raise ValueError(f"StreamConfig.done_ttl_s must be > 0, got {self.done_ttl_s}")
