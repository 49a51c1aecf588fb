"""The ML lifecycle as Dagster software-defined assets.

sources:   raw_transactions (daily partitions, one run for any range), users
features:  one offline table per aggregated feature view (DuckDB SQL compiled from declarations)
training:  training_set (gated by a blocking pandera check) -> trained_model -> model_evaluation
           -> registered_model (MLflow version, `challenger`, promoted to `champion` if better)
serving:   online_features (Redis, with the online/offline skew check), batch_predictions (daily),
           prediction_log (the API's log and the stream worker's outputs drained to Parquet; batch writes its own days)

Each body is a few lines over the domain library; metadata makes every step inspectable in the UI.
Why one module of ~470 lines: the graph reads top to bottom in one place (each asset's upstream
is visible next to it); the logic is in the domain library, so splitting would only scatter keys.
"""

# No `from __future__ import annotations` here: Dagster reads the context/config annotations.

import datetime as dt
import warnings
from typing import Any

import dagster as dg

from ml_platform import features as fr
from ml_platform.defs.resources import EventSourceResource, FeatureStoreResource, MLflowRegistryResource
from ml_platform.defs.source_assets import source_asset, view_assets
from ml_platform.redaction import redact_url

PARTITIONS_START = "2025-01-01"
daily_partitions = dg.DailyPartitionsDefinition(start_date=PARTITIONS_START, end_offset=0)
# Every partitioned asset runs any range of days as one run: one policy for all, so a job that
# selects several of them (daily_scoring) has one consistent backfill policy.
ONE_RUN_PER_RANGE = dg.BackfillPolicy.single_run()
# Still needed in Dagster 1.13: `@asset(backfill_policy=...)` warns that the parameter is beta.
warnings.filterwarnings("ignore", message="Parameter `backfill_policy`", category=dg.BetaWarning)

RAW_CHECK = "raw_transactions_valid"
TRAINING_CHECK = "training_set_valid"


def _check_result(report, asset_key: str, check_name: str) -> dg.AssetCheckResult:
    return dg.AssetCheckResult(
        asset_key=asset_key,
        check_name=check_name,
        passed=report.ok,
        severity=dg.AssetCheckSeverity.ERROR,
        description=report.summary(),
        metadata=report.to_metadata(),
    )


def _as_of_for(dates: list[dt.date]) -> dt.datetime:
    """Labels are known up to the end of the latest generated day (and never past now)."""
    end = dt.datetime.combine(max(dates) + dt.timedelta(days=1), dt.time(), tzinfo=dt.UTC)
    return min(end, dt.datetime.now(dt.UTC))


@dg.asset(
    group_name="sources",
    kinds={"parquet"},
    description="Card-holder profiles (home country, account age): the user_profile feature view's source.",
)
def users(feature_store: FeatureStoreResource, event_source: EventSourceResource) -> dg.MaterializeResult:
    from ml_platform.sources.generator import write_users

    # Profiles are a snapshot dated at the first partition, so they are valid for every event.
    config = event_source.generator_config(start=dt.date.fromisoformat(PARTITIONS_START), days=1)
    path = write_users(config, feature_store.raw_dir)
    return dg.MaterializeResult(metadata={"path": dg.MetadataValue.path(str(path)), "users": config.n_users})


@dg.asset(
    group_name="sources",
    kinds={"parquet"},
    partitions_def=daily_partitions,
    backfill_policy=ONE_RUN_PER_RANGE,
    check_specs=[
        dg.AssetCheckSpec(
            RAW_CHECK,
            asset="raw_transactions",
            blocking=True,
            description="pandera schema of raw transaction events; a failure stops everything downstream",
        )
    ],
    description="Raw card-transaction events, one Parquet partition per day (synthetic or imported files).",
)
def raw_transactions(
    context: dg.AssetExecutionContext,
    feature_store: FeatureStoreResource,
    event_source: EventSourceResource,
):
    from ml_platform.sources import raw_events
    from ml_platform.validation import RAW_TRANSACTIONS_SCHEMA, validate

    dates = sorted(dt.date.fromisoformat(k) for k in context.partition_keys)
    raw_dir = feature_store.raw_dir
    if event_source.kind == "files":
        from ml_platform.sources.files import import_events

        if not event_source.import_path:
            raise dg.Failure("event_source.kind is 'files' but import_path is not set")
        # An import writes every day its files hold; this run validates the selected days.
        written = import_events(event_source.import_path, raw_dir)
    elif event_source.kind == "synthetic":
        from ml_platform.sources.generator import write_day

        config = event_source.generator_config(start=dates[0], days=len(dates), as_of=_as_of_for(dates))
        written = [write_day(config, d, raw_dir) for d in dates]
    else:
        raise dg.Failure(f"event_source.kind must be 'synthetic' or 'files', got {event_source.kind!r}")
    # Labels the feed already delivered for these days' events (a re-ingested day keeps them).
    from ml_platform.sources.labels import merge_into_raw, read_labels

    merge_into_raw(raw_dir, read_labels(raw_dir, since=dates[0]), days=dates)
    frame = raw_events.read_days(raw_dir, dates)
    report = validate(frame, RAW_TRANSACTIONS_SCHEMA, now=dt.datetime.now(dt.UTC))
    context.log.info(report.summary())
    yield dg.MaterializeResult(
        metadata={
            "rows": len(frame),
            "days": len(dates),
            "fraud_rate_known": float(frame[fr.LABEL].mean()) if frame[fr.LABEL].notna().any() else None,
            "labels_known": int(frame[fr.LABEL].notna().sum()),
            "files": len(written),
            "preview": dg.MetadataValue.md(f"```\n{frame.head(5).to_string(index=False)}\n```"),
        }
    )
    yield _check_result(report, "raw_transactions", RAW_CHECK)


def _feature_table_asset(view) -> dg.AssetsDefinition:
    @dg.asset(
        name=view.name,
        group_name="features",
        kinds={"duckdb", "parquet"},
        deps=[source_asset(view)],
        description=view.description,
        tags={"feature_view": view.name},
    )
    def _table(feature_store: FeatureStoreResource, spark: dg.ResourceParam[Any]) -> dg.MaterializeResult:
        store = feature_store.store()
        engine = feature_store.offline_engine(spark)  # DuckDB, or Spark through dagster-pyspark
        result = engine.materialize_offline(store, view.name)
        return dg.MaterializeResult(
            metadata={
                "engine": feature_store.engine,
                "rows": result["rows"],
                "path": dg.MetadataValue.path(str(result["path"])),
                "seconds": round(result["seconds"], 3),
                # full | incremental (rows from recomputed_from on) | unchanged (no source file changed)
                "mode": result["mode"],
                "recomputed_from": result.get("recomputed_from") or "",
                "entities": ", ".join(view.join_keys),
                "ttl": str(view.ttl),
                "features": dg.MetadataValue.json(view.feature_names),
                "sql": dg.MetadataValue.md(f"```sql\n{engine.aggregation_sql(store, view.name)}\n```"),
            }
        )

    return _table


feature_table_assets = [_feature_table_asset(v) for v in fr.FEATURE_VIEWS if v.aggregations]


@dg.asset(
    group_name="training",
    kinds={"duckdb", "parquet"},
    # The model's looked-up features, and the labelled events themselves (read from the raw data).
    deps=[*view_assets(fr.FEATURE_VIEWS), source_asset(fr.labels_source)],
    check_specs=[
        dg.AssetCheckSpec(
            TRAINING_CHECK,
            asset="training_set",
            blocking=True,
            description="pandera schema of the training set; a failure stops training (the champion stays)",
        )
    ],
    description="Labelled events known at the cut + point-in-time features + request-time features, split by time.",
)
def training_set(context: dg.AssetExecutionContext, feature_store: FeatureStoreResource):
    from ml_platform.monitoring.retrain_policy import EPISODE_TAG
    from ml_platform.training.pipeline import build_training_set
    from ml_platform.validation import TRAINING_SET_SCHEMA, validate

    # A retrain the sensor requested for a drift episode learns and is judged on the new world.
    drift_since = context.run.tags.get(EPISODE_TAG)
    try:
        built = build_training_set(feature_store.store(), feature_store.data_dir, drift_since=drift_since)
    except ValueError as exc:  # e.g. no mature post-drift rows yet: the message says which
        raise dg.Failure(f"training_set: {exc}") from exc
    report = validate(built.frame.drop(columns=["split"]), TRAINING_SET_SCHEMA, now=dt.datetime.now(dt.UTC))
    yield dg.MaterializeResult(
        metadata={
            "rows": len(built.frame),
            "positives": int(built.frame[fr.LABEL].sum()),
            "data_version": built.data_version,
            "as_of": built.as_of.isoformat(),
            "path": dg.MetadataValue.path(str(built.path)),
            "splits": dg.MetadataValue.json(built.split_summary),
            "split": f"drift split: the history before {drift_since} and half the mature rows after it to train"
            if drift_since else "time split 60/20/20",
            "feature_refs": dg.MetadataValue.json(list(fr.MODEL_FEATURE_REFS)),
        },
        data_version=dg.DataVersion(built.data_version),
    )
    yield _check_result(report, "training_set", TRAINING_CHECK)


class TrainingConfig(dg.Config):
    """Which model to train: a type of `ml_platform.training.model_types` and its parameters
    (validated over the type's defaults; an unknown name or value fails naming it)."""

    model_type: str | None = None  # None: settings.model_type (ML_PLATFORM_MODEL_TYPE, default HistGradientBoosting)
    params: dict[str, Any] = {}  # noqa: RUF012 - pydantic copies field defaults per instance
    random_state: int = 0


@dg.asset(
    group_name="training",
    kinds={"scikitlearn"},
    deps=["training_set"],
    description="The configured model type (HistGradientBoosting by default) fitted on the train split; "
    "threshold chosen on validation.",
)
def trained_model(config: TrainingConfig, feature_store: FeatureStoreResource) -> dg.MaterializeResult:
    from ml_platform.settings import load_settings
    from ml_platform.training.pipeline import train_candidate

    try:
        candidate = train_candidate(
            feature_store.data_dir,
            params=config.params,
            random_state=config.random_state,
            model_type=config.model_type or load_settings().model_type,
        )
    except ValueError as exc:  # a bad model_type / params.<name>: the message names it
        raise dg.Failure(f"trained_model config: {exc}") from exc
    return dg.MaterializeResult(
        metadata={
            "path": dg.MetadataValue.path(str(candidate.path)),
            "model_type": candidate.model_type,
            "data_version": candidate.data_version,
            "decision_threshold": candidate.contract.decision_threshold,
            "train_seconds": round(candidate.train_seconds, 2),
            "params": dg.MetadataValue.json(candidate.params),
            "input_columns": dg.MetadataValue.json(list(candidate.contract.input_columns)),
        }
    )


@dg.asset(
    group_name="training",
    kinds={"scikitlearn"},
    deps=["trained_model"],
    description="ROC AUC, PR AUC, precision/recall/F1 at the threshold and calibration on the held-out test split.",
)
def model_evaluation(feature_store: FeatureStoreResource) -> dg.MaterializeResult:
    from ml_platform.training.pipeline import evaluate_candidate

    result = evaluate_candidate(feature_store.data_dir)
    test = result["test"]
    calibration = test.get("calibration") or []
    return dg.MaterializeResult(
        metadata={
            **{k: dg.MetadataValue.float(float(test[k])) for k in ("roc_auc", "pr_auc", "precision", "recall",
                                                                  "f1", "brier") if test.get(k) is not None},
            "threshold": result["threshold"],
            "test_rows": test.get("rows"),
            "test_positives": test.get("positives"),
            "validation": dg.MetadataValue.json({k: v for k, v in result["validation"].items() if k != "calibration"}),
            "calibration": dg.MetadataValue.md(_calibration_md(calibration)),
        }
    )


def _calibration_md(rows: list[dict]) -> str:
    if not rows:
        return "no calibration table"
    keys = list(rows[0])
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    for r in rows:
        lines.append("| " + " | ".join(f"{r[k]:.4g}" if isinstance(r[k], float) else str(r[k]) for k in keys) + " |")
    return "\n".join(lines)


@dg.asset(
    group_name="training",
    kinds={"mlflow"},
    deps=["model_evaluation"],
    description="The candidate registered in MLflow with lineage as `challenger`; promoted to `champion` "
    "only if it beats the champion on the same held-out data by the configured margin (for a retrain "
    "after drift: the held-out rows from the drift on).",
)
def registered_model(
    context: dg.AssetExecutionContext, feature_store: FeatureStoreResource, mlflow: MLflowRegistryResource
) -> dg.MaterializeResult:
    from ml_platform.monitoring.retrain_policy import EPISODE_TAG, REASON_TAG
    from ml_platform.training.pipeline import register_candidate

    # A retrain the sensor requested: judged on the rows after the drift, audited with its reason.
    tags = context.run.tags
    out = register_candidate(
        feature_store.data_dir, mlflow.registry(), metric=mlflow.promotion_metric, margin=mlflow.promotion_margin,
        compare_since=tags.get(EPISODE_TAG), reason=tags.get(REASON_TAG, ""),
    )
    return dg.MaterializeResult(metadata=registration_metadata(out))


def registration_metadata(out) -> dict:
    """What the UI shows of a registration (a `RegistrationResult`): the version, links to the MLflow
    model version and run (URLs when the tracking server is http(s), else the UI routes as text), the
    code and data versions and the promotion decision."""
    links = {
        "mlflow_model": (out.model_ui_url, out.model_ui_path),
        "mlflow_run": (out.run_ui_url, out.run_ui_path),
    }
    return {
        "model": out.model_name,
        "version": out.version,
        "model_type": out.model_type,
        "model_uri": out.model_uri,
        "run_id": out.run_id,
        **{k: dg.MetadataValue.url(url) if url else dg.MetadataValue.text(path) for k, (url, path) in links.items()},
        "code_version": out.code_version,
        "data_version": out.data_version,
        "champion_version": out.champion_version,
        "promoted": out.promoted,
        "reason": out.reason,
        "compared_on": out.compared_on,
        # The promotion gate's figures on those rows (None: no champion to compare with).
        "promotion_metric": out.decision.get("metric"),
        "challenger_metric": out.decision.get("challenger_metric"),
        "champion_metric": out.decision.get("champion_metric"),
        "tracking_uri": redact_url(out.tracking_uri),
    }


class OnlineMaterializationConfig(dg.Config):
    """`full` rebuilds each view in a new Redis version and flips to it atomically; `incremental`
    writes only entities whose features changed since the last run."""

    mode: str = "full"


@dg.asset(
    group_name="serving",
    kinds={"redis"},
    deps=view_assets(fr.FEATURE_VIEWS),
    description="Latest feature values per entity (within each view's TTL) loaded into the Redis online store.",
)
def online_features(config: OnlineMaterializationConfig, feature_store: FeatureStoreResource) -> dg.MaterializeResult:
    if config.mode not in ("full", "incremental"):
        raise dg.Failure(f"online_features: mode must be 'full' or 'incremental', got {config.mode!r}")
    store = feature_store.store()
    results = store.materialize(mode=config.mode)
    rows = sum(r["rows"] for r in results)
    seconds = sum(r["seconds"] for r in results)
    return dg.MaterializeResult(
        metadata={
            "rows_written": rows,
            "rows_per_s": round(rows / seconds) if seconds else None,
            "mode": config.mode,
            "project": feature_store.project,
            "views": dg.MetadataValue.json(
                {r["view"]: {"rows": r["rows"], "version": r["version"], "mode": r["mode"],
                             "seconds": round(r["seconds"], 3)} for r in results}
            ),
        }
    )


@dg.asset_check(
    asset=online_features,
    description="Samples entities and compares online values with the offline point-in-time values for the "
    "same moment; any mismatch (training-serving skew) fails with examples.",
)
def online_offline_skew(feature_store: FeatureStoreResource) -> dg.AssetCheckResult:
    from ml_platform.featurestore.skew import check_online_offline_skew

    report = check_online_offline_skew(feature_store.store(), sample_size=200)
    return dg.AssetCheckResult(
        passed=report.ok,
        severity=dg.AssetCheckSeverity.ERROR,
        description=report.summary(),
        metadata=report.to_metadata(),
    )


@dg.asset(
    group_name="serving",
    kinds={"duckdb"},
    partitions_def=daily_partitions,
    backfill_policy=ONE_RUN_PER_RANGE,
    deps=[source_asset(fr.transactions_source), "registered_model", *view_assets(fr.FEATURE_VIEWS)],
    description="Every transaction of the day scored by the champion (on this machine, or on Spark with "
    "ML_PLATFORM_BATCH_ENGINE=spark) into the DuckDB `predictions` table "
    "(data/predictions.duckdb); each day is swapped in atomically (a range: day by day, in one run), and "
    "written to the prediction log (data/predictions_log/source=batch/date=YYYY-MM-DD/, replaced on re-scoring).",
)
def batch_predictions(
    context: dg.AssetExecutionContext,
    feature_store: FeatureStoreResource,
    mlflow: MLflowRegistryResource,
    spark: dg.ResourceParam[Any],
) -> dg.MaterializeResult:
    from pathlib import Path

    from ml_platform.serving.batch import score_partition
    from ml_platform.serving.scoring import load_champion

    model = load_champion(mlflow.registry())
    store = feature_store.store()
    # DuckDB on this machine, or (ML_PLATFORM_BATCH_ENGINE=spark) the `spark` resource's session
    score = spark.score_partition if feature_store.batch_engine == "spark" else score_partition
    days = []
    for day in sorted(context.partition_keys):
        out = score(
            store, model, day, duckdb_path=feature_store.predictions_db, log_dir=feature_store.predictions_log_dir
        )
        context.log.info(f"scored {day} ({feature_store.batch_engine}): {out['rows']} rows, "
                         f"{out['positives_flagged']} flagged")
        days.append(out)
    return dg.MaterializeResult(
        metadata={
            "rows": sum(d["rows"] for d in days),
            "positives_flagged": sum(d["positives_flagged"] for d in days),
            "model_version": model.version,
            "decision_threshold": float(model.contract.decision_threshold),
            "table": days[0]["table"],
            "duckdb_path": dg.MetadataValue.path(days[0]["duckdb_path"]),
            # the day's log file (a range: the batch folder of the log; each day's file is in "days")
            "log_path": dg.MetadataValue.path(
                days[0]["log_path"] if len(days) == 1 else str(Path(days[0]["log_path"]).parent.parent)
            ),
            "days": dg.MetadataValue.json(
                {d["day"]: {k: v for k, v in d.items() if k not in ("day", "table", "duckdb_path")} for d in days}
            ),
        }
    )


@dg.asset(
    group_name="serving",
    kinds={"redis", "parquet"},
    description="The prediction log for monitoring and label joins: the API's log stream (trimmed once on "
    "disk) and the stream worker's output stream (read by its own consumer group `prediction-log`, never "
    "trimmed) drained into data/predictions_log/source=<api|stream>/date=YYYY-MM-DD/ (batch scoring writes "
    "source=batch/). Read it with prediction_log_reader.read_prediction_log.",
)
def prediction_log(feature_store: FeatureStoreResource) -> dg.MaterializeResult:
    from ml_platform.serving.prediction_log import prediction_stream_key
    from ml_platform.serving.prediction_log_drain import drain_prediction_log, drain_stream_predictions
    from ml_platform.serving.stream.streams import stream_names

    client = feature_store.redis_client()
    log_dir = feature_store.predictions_log_dir
    drained = {
        "api": drain_prediction_log(client, prediction_stream_key(feature_store.project), log_dir),
        "stream": drain_stream_predictions(client, stream_names(feature_store.project).output, log_dir),
    }
    per_source = {
        source: {**{k: v for k, v in out.items() if k != "files" and v is not None}, "files": len(out["files"])}
        for source, out in drained.items()
    }
    return dg.MaterializeResult(
        metadata={
            "rows": sum(out["rows"] for out in drained.values()),
            "files": sum(len(out["files"]) for out in drained.values()),
            **{source: dg.MetadataValue.json(summary) for source, summary in per_source.items()},
            "path": dg.MetadataValue.path(str(log_dir)),
        }
    )
