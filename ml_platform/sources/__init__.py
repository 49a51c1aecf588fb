"""Raw data sources: the synthetic transaction generator and a file importer, both writing the
raw contract (raw/transactions/date=YYYY-MM-DD/part-*.parquet, raw/users/users.parquet)."""

from ml_platform.sources.files import EventsFormatError, coerce_events, import_events, load_events
from ml_platform.sources.generator import (
    TRANSACTION_COLUMNS,
    DriftScenario,
    GeneratorConfig,
    generate_day,
    generate_users,
    iter_day_chunks,
    transactions_partition,
    write_dataset,
    write_day,
    write_partition,
    write_range,
    write_users,
)

__all__ = [
    "TRANSACTION_COLUMNS",
    "DriftScenario",
    "EventsFormatError",
    "GeneratorConfig",
    "coerce_events",
    "generate_day",
    "generate_users",
    "import_events",
    "iter_day_chunks",
    "load_events",
    "transactions_partition",
    "write_dataset",
    "write_day",
    "write_partition",
    "write_range",
    "write_users",
]
