"""Training: the model contract, leak-free training sets, the model types, the model and its evaluation."""

from ml_platform.training.contract import ModelContract
from ml_platform.training.dataset import TimeSplit, build_training_frame, data_version, time_split
from ml_platform.training.evaluate import calibration_table, classification_metrics, evaluate
from ml_platform.training.model import DEFAULT_PARAMS, choose_threshold, fraud_probability, train_model
from ml_platform.training.model_types import DEFAULT_MODEL_TYPE, MODEL_TYPES, ModelType, get_model_type

__all__ = [
    "DEFAULT_MODEL_TYPE",
    "DEFAULT_PARAMS",
    "MODEL_TYPES",
    "ModelContract",
    "ModelType",
    "TimeSplit",
    "build_training_frame",
    "calibration_table",
    "choose_threshold",
    "classification_metrics",
    "data_version",
    "evaluate",
    "fraud_probability",
    "get_model_type",
    "time_split",
    "train_model",
]
