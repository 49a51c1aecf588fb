"""Training: the model contract, leak-free training sets, the model itself and its evaluation."""

from ml_platform.training.contract import ModelContract
from ml_platform.training.dataset import TimeSplit, build_training_frame, data_version, time_split
from ml_platform.training.evaluate import calibration_table, classification_metrics, evaluate
from ml_platform.training.model import DEFAULT_PARAMS, choose_threshold, fraud_probability, train_model

__all__ = [
    "DEFAULT_PARAMS",
    "ModelContract",
    "TimeSplit",
    "build_training_frame",
    "calibration_table",
    "choose_threshold",
    "classification_metrics",
    "data_version",
    "evaluate",
    "fraud_probability",
    "time_split",
    "train_model",
]
