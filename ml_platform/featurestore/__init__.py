"""Feature store: definitions (Feast vocabulary), the DuckDB offline store and point-in-time joins,
the online store (`featurestore.online`: the `OnlineStore` protocol and `RedisOnlineStore`) and
the offline -> online materialization (`materialize_online`).

from ml_platform.featurestore import FeatureStore
store = FeatureStore(data_dir)
store.apply([*ENTITIES, *FEATURE_VIEWS])
store.materialize_offline("user_transaction_stats")
training_rows = store.get_historical_features(entity_df, MODEL_FEATURE_REFS)
store.materialize()                                   # offline -> online (Redis)
store.get_online_features(MODEL_FEATURE_REFS, [{"user_id": 7, "merchant_id": 3}])
"""

from ml_platform.featurestore.aggregation import AGGREGATE_SQL, compile_aggregation_sql
from ml_platform.featurestore.definitions import (
    AGGREGATION_FUNCTIONS,
    Aggregation,
    Bool,
    Entity,
    FeatureView,
    Field,
    FileSource,
    Float32,
    Float64,
    Int32,
    Int64,
    String,
    UnixTimestamp,
    ValueType,
    parse_feature_ref,
)
from ml_platform.featurestore.store import FeatureStore, NotMaterializedError

__all__ = [
    "AGGREGATE_SQL",
    "AGGREGATION_FUNCTIONS",
    "Aggregation",
    "Bool",
    "Entity",
    "FeatureStore",
    "FeatureView",
    "Field",
    "FileSource",
    "Float32",
    "Float64",
    "Int32",
    "Int64",
    "NotMaterializedError",
    "String",
    "UnixTimestamp",
    "ValueType",
    "compile_aggregation_sql",
    "parse_feature_ref",
]
