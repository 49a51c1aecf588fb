"""Model monitoring. Data drift: `detect_drift(reference_df, current_df)` (docs/monitoring_drift.md)."""

from ml_platform.monitoring.drift import DriftThresholds, detect_drift
from ml_platform.monitoring.drift_profile import ReferenceProfile
from ml_platform.monitoring.drift_report import ColumnDrift, DriftReport

__all__ = ["ColumnDrift", "DriftReport", "DriftThresholds", "ReferenceProfile", "detect_drift"]
