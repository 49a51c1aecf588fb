"""Old import path of the fast scorer, now the `ml_platform.serving.scorer` package: kept so
existing importers (`from ml_platform.serving.fast_scorer import build_scoring_path, EVENT_US`)
keep working. New code imports from `ml_platform.serving.scorer`."""

from ml_platform.serving.scorer import (
    EVENT_US,
    PARITY_SAMPLE_ROWS,
    PARITY_TOLERANCE,
    SCORERS,
    PipelineLayout,
    Scored,
    ScoringPath,
    UnsupportedModel,
    build_scoring_path,
    parity_sample,
    supports,
)
from ml_platform.serving.scorer.columns import model_input_columns as columnar_model_inputs
from ml_platform.serving.scorer.columns import request_columns_from_rows as columns_from_rows

__all__ = [
    "EVENT_US",
    "PARITY_SAMPLE_ROWS",
    "PARITY_TOLERANCE",
    "SCORERS",
    "PipelineLayout",
    "Scored",
    "ScoringPath",
    "UnsupportedModel",
    "build_scoring_path",
    "columnar_model_inputs",
    "columns_from_rows",
    "parity_sample",
    "supports",
]
