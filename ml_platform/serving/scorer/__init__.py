"""Fast scoring of request rows and stream batches, proven equal to scikit-learn per model.

The reference path (`scoring.assemble_features` -> `ModelContract.model_input` -> the scikit-learn
Pipeline) costs ~10 ms per call whatever the row count. The fast path does the same three steps
without pandas: the model inputs assembled column-wise with the request-time features from
`features.request_features` (columns.py), the Pipeline's encoding as dict lookups (encoding.py),
the trees with treelite (trees.py: HistGradientBoosting and RandomForest; a model it does not
support, e.g. LogisticRegression, is scored by scikit-learn). `build_scoring_path` (path.py) keeps
each fast step only if it agrees with the reference on a sample made to cover every split, every
category, unknown categories, nulls and all 24 hours (parity.py); the reasons for any fallback
are logged and reported by /model and /health/ready.

    columns.py   column assembly (rows or columns -> model input columns)
    encoding.py  PipelineLayout (ColumnTransformer as lookups), known categories
    trees.py     the treelite scorer and which models it supports
    parity.py    the parity sample and input comparison
    path.py      ScoringPath, build_scoring_path
"""

from ml_platform.serving.scorer.columns import (
    EVENT_US,
    float_column,
    float_value,
    logged_inputs,
    model_input_columns,
    reference_model_input,
    request_columns_from_rows,
    rows_from_columns,
)
from ml_platform.serving.scorer.encoding import PipelineLayout, UnsupportedModel, known_categories
from ml_platform.serving.scorer.parity import PARITY_SAMPLE_ROWS, PARITY_TOLERANCE, parity_sample
from ml_platform.serving.scorer.path import SCORERS, Scored, ScoringPath, build_scoring_path
from ml_platform.serving.scorer.trees import (
    SUPPORTED_CLASSIFIERS,
    TreeliteScorer,
    supports,
    unsupported_reason,
)

__all__ = [
    "EVENT_US",
    "PARITY_SAMPLE_ROWS",
    "PARITY_TOLERANCE",
    "SCORERS",
    "SUPPORTED_CLASSIFIERS",
    "PipelineLayout",
    "Scored",
    "ScoringPath",
    "TreeliteScorer",
    "UnsupportedModel",
    "build_scoring_path",
    "float_column",
    "float_value",
    "known_categories",
    "logged_inputs",
    "model_input_columns",
    "parity_sample",
    "reference_model_input",
    "request_columns_from_rows",
    "rows_from_columns",
    "supports",
    "unsupported_reason",
]
