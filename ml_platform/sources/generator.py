"""Synthetic card transactions for the fraud use case, reproducible from a seed.

Legit spending follows each card holder's habits (favourite merchants, usual amounts, active
hours, own device); fraud breaks them (account-takeover bursts, card testing), so behavioural
features really help. Labels arrive late, as in production: a chargeback 1-30 days after a fraud,
a legit label once `label_maturity_days` have passed; labels not yet arrived at `as_of` are NULL.

Any one day is a pure function of (config, date): the day's random stream is seeded from
(seed, date, chunk), so a daily partition can be regenerated alone. Large days are produced in
chunks of at most `chunk_rows` rows, written as several part files.

The population (users, merchants, vocabulary) is in `population`, the raw layout and writing in
`raw_events`. This module (~500 lines) keeps the three behaviours (legit spending, account
takeover, card testing) with the day assembly: they draw from one random stream in a fixed order,
and any one changed alone would change every later draw of the day.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import date, datetime, timedelta
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from ml_platform.atomic_files import write_parquet_atomic
from ml_platform.settings import SyntheticDefaults
from ml_platform.sources.population import (
    BASE_CATEGORIES,
    CHANNELS,
    COUNTRIES,
    DEVICES,
    FAVOURITE_WEIGHTS,
    HOME_COUNTRIES,
    MERCHANT_CATEGORIES,
    N_FAVOURITES,
    USER_DEVICES,
    Population,
    build_population,
)
from ml_platform.sources.raw_events import (  # the raw layout; re-exported for existing importers
    TRANSACTION_COLUMNS,
    TRANSACTIONS_ARROW_SCHEMA,
    USERS_ARROW_SCHEMA,
    parse_date,
    transactions_partition,
    write_partition,
)

__all__ = [
    "CHANNELS",
    "COUNTRIES",
    "DEVICES",
    "MERCHANT_CATEGORIES",
    "TRANSACTIONS_ARROW_SCHEMA",
    "TRANSACTION_COLUMNS",
    "USERS_ARROW_SCHEMA",
    "DriftScenario",
    "GeneratorConfig",
    "generate_day",
    "generate_users",
    "iter_day_chunks",
    "parse_date",
    "transactions_partition",
    "write_dataset",
    "write_day",
    "write_partition",
    "write_range",
    "write_users",
]

_POS_TERMINAL, _UNKNOWN_DEVICE = len(USER_DEVICES), len(USER_DEVICES) + 1
_POS, _CONTACTLESS, _ONLINE = 0, 1, 2
FRAUD_PATTERNS = ("account_takeover", "card_testing")
_DAY_S = 86400.0
_MAX_AMOUNT = 50_000.0
MAX_CHARGEBACK_DELAY_DAYS = 30  # a fraud is disputed 1 to this many days after the event


@dataclass(frozen=True)
class DriftScenario:
    """A change in the world from `start_date` on: amounts scaled, new merchant categories, another fraud pattern."""

    start_date: date
    amount_scale: float = 1.5
    new_categories: tuple[str, ...] = ("crypto_exchange", "digital_wallet")
    new_category_share: float = 0.08  # share of legit transactions going to the new categories
    fraud_pattern: str | None = "card_testing"  # the fraud pattern that dominates after the drift (None: unchanged)

    def __post_init__(self) -> None:
        object.__setattr__(self, "start_date", parse_date(self.start_date, "DriftScenario.start_date"))
        object.__setattr__(self, "new_categories", tuple(self.new_categories))
        if self.amount_scale <= 0:
            raise ValueError(f"DriftScenario.amount_scale must be > 0, got {self.amount_scale}")
        if not 0 <= self.new_category_share < 1:
            raise ValueError(
                f"DriftScenario.new_category_share must be in [0, 1), got {self.new_category_share}"
            )
        if self.fraud_pattern is not None and self.fraud_pattern not in FRAUD_PATTERNS:
            raise ValueError(
                f"DriftScenario.fraud_pattern {self.fraud_pattern!r} is not one of {FRAUD_PATTERNS}"
            )
        clash = sorted(set(self.new_categories) & set(BASE_CATEGORIES))
        if clash:
            raise ValueError(
                f"DriftScenario.new_categories {clash} already exist before the drift; name new ones"
            )


@dataclass(frozen=True)
class GeneratorConfig:
    """What to generate: population size, period, volumes, fraud rate, label delays, optional drift."""

    seed: int = SyntheticDefaults.seed
    n_users: int = SyntheticDefaults.n_users
    n_merchants: int = SyntheticDefaults.n_merchants
    txns_per_user_per_day: float = SyntheticDefaults.txns_per_user_per_day
    start: date = date(2024, 1, 1)
    days: int = 30
    fraud_rate: float = SyntheticDefaults.fraud_rate  # target share of fraudulent transactions
    label_maturity_days: int = SyntheticDefaults.label_maturity_days  # a legit label is confirmed this long after
    as_of: datetime | None = None  # labels arriving later are NULL; default: end of the last day
    drift: DriftScenario | None = None
    chunk_rows: int = 500_000  # a day larger than this is produced (and written) in several parts

    def __post_init__(self) -> None:
        object.__setattr__(self, "start", parse_date(self.start, "GeneratorConfig.start"))
        if self.as_of is not None:
            object.__setattr__(self, "as_of", _as_utc(self.as_of, "GeneratorConfig.as_of").to_pydatetime())
        min_merchants = len(HOME_COUNTRIES) * len(BASE_CATEGORIES)
        checks = [
            (self.n_users >= 1, f"n_users must be >= 1, got {self.n_users}"),
            (
                self.n_merchants >= min_merchants,
                f"n_merchants must be >= {min_merchants} (one per home country and category), got {self.n_merchants}",
            ),
            (
                self.txns_per_user_per_day > 0,
                f"txns_per_user_per_day must be > 0, got {self.txns_per_user_per_day}",
            ),
            (self.days >= 1, f"days must be >= 1, got {self.days}"),
            (0 <= self.fraud_rate < 0.5, f"fraud_rate must be in [0, 0.5), got {self.fraud_rate}"),
            (
                self.label_maturity_days >= 0,
                f"label_maturity_days must be >= 0, got {self.label_maturity_days}",
            ),
            (self.chunk_rows >= 1000, f"chunk_rows must be >= 1000, got {self.chunk_rows}"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(f"GeneratorConfig: {message}")

    @property
    def end(self) -> date:
        """The last generated day (inclusive)."""
        return self.start + timedelta(days=self.days - 1)

    @property
    def labels_as_of(self) -> pd.Timestamp:
        """Labels arriving after this instant are not known yet (NULL)."""
        if self.as_of is not None:
            return pd.Timestamp(self.as_of)
        return pd.Timestamp(self.end + timedelta(days=1), tz="UTC")

    def dates(self) -> list[date]:
        return [self.start + timedelta(days=i) for i in range(self.days)]

    def drifted(self, day: date) -> bool:
        return self.drift is not None and day >= self.drift.start_date


def _as_utc(value, what: str) -> pd.Timestamp:
    try:
        ts = pd.Timestamp(value)
    except (ValueError, TypeError):
        raise ValueError(f"{what}: {value!r} is not a timestamp; use e.g. 2024-01-31T00:00:00Z") from None
    return ts.tz_localize("UTC") if ts.tzinfo is None else ts.tz_convert("UTC")


def _pop(config: GeneratorConfig) -> tuple[Population, list[str]]:
    """The config's population (users, merchants) and category vocabulary."""
    drift_categories = config.drift.new_categories if config.drift else ()
    return build_population(config.seed, config.n_users, config.n_merchants, drift_categories)


def generate_users(config: GeneratorConfig) -> pd.DataFrame:
    """The card holders' profile table (contract: user_id, home_country, account_age_days, updated_at).

    The profile is a snapshot taken at the start of the period, so it is valid for every event."""
    pop, _ = _pop(config)
    n = config.n_users
    return pd.DataFrame(
        {
            "user_id": np.arange(1, n + 1, dtype="int64"),
            "home_country": pd.array(pa.array(COUNTRIES).take(pa.array(pop.user_home)), dtype="str"),
            "account_age_days": pop.user_age_days.astype("int64"),
            "updated_at": pd.DatetimeIndex(
                np.full(n, np.datetime64(config.start.isoformat(), "us"))
            ).tz_localize("UTC"),
        }
    )


# --- One day of transactions ---


def _day_plan(config: GeneratorConfig, day: date) -> tuple[float, float, float, int]:
    """(legit rows, account-takeover episodes, card-testing episodes, chunks) expected for `day`."""
    weekend = 1.15 if day.weekday() >= 5 else 1.0
    legit = config.n_users * config.txns_per_user_per_day * weekend
    fraud_rows = legit * config.fraud_rate / (1.0 - config.fraud_rate)
    ato_share = 0.7
    if config.drifted(day) and config.drift.fraud_pattern is not None:
        ato_share = 0.2 if config.drift.fraud_pattern == "card_testing" else 0.9
    ato_episodes = fraud_rows * ato_share / _ATO_MEAN_LEN
    testing_episodes = fraud_rows * (1 - ato_share) / _TESTING_MEAN_LEN
    chunks = max(1, math.ceil((legit + fraud_rows) * 1.05 / config.chunk_rows))
    return legit, ato_episodes, testing_episodes, chunks


_ATO_MAX, _ATO_P = 10, 0.35
_ATO_MEAN_LEN = 1 + (1 - _ATO_P) / _ATO_P  # ~2.86 (geometric, clipping ignored)
_TESTING_MIN, _TESTING_MAX, _CASH_OUT = 3, 10, 0.5
_TESTING_MEAN_LEN = (_TESTING_MIN + _TESTING_MAX) / 2 + _CASH_OUT


def _rows(user, merchant, amount, seconds, channel, device, fraud: bool, probe=None) -> dict[str, np.ndarray]:
    """One kind of activity as columns (codes, not strings yet); `probe` marks card-testing probes."""
    n = len(user)
    return {
        "user": user,
        "merchant": merchant,
        "amount": amount,
        "seconds": seconds,
        "channel": channel,
        "device": device,
        "fraud": np.full(n, fraud),
        "probe": np.zeros(n, dtype=bool) if probe is None else probe,
    }


def _burst_offsets(rng, lens: np.ndarray, mean_gap_s: float) -> tuple[np.ndarray, np.ndarray]:
    """(episode of each row, seconds since the episode's first row) for bursts of `lens` rows."""
    rows = np.repeat(np.arange(len(lens)), lens)
    first = np.cumsum(lens) - lens
    gaps = rng.exponential(mean_gap_s, len(rows))
    gaps[first] = 0.0
    offsets = np.cumsum(gaps)
    return rows, offsets - np.repeat(offsets[first], lens)


_TRAVEL_PER_10K = 150  # 1.5% of card holders are abroad on a given day


def _hash(values: np.ndarray, salt: int) -> np.ndarray:
    """A cheap deterministic integer hash (splitmix64 finaliser) of `values` and `salt`."""
    x = values.astype("uint64") * np.uint64(0x9E3779B97F4A7C15) + np.uint64(salt & 0xFFFFFFFF)
    x ^= x >> np.uint64(30)
    x *= np.uint64(0xBF58476D1CE4E5B9)
    x ^= x >> np.uint64(27)
    x *= np.uint64(0x94D049BB133111EB)
    x ^= x >> np.uint64(31)
    return (x >> np.uint64(1)).astype("int64")


def _legit(rng, pop: Population, config: GeneratorConfig, day: date, n: int) -> dict[str, np.ndarray]:
    # Sorted draws: the same distribution, but the lookups walk the user arrays in order (cache
    # friendly for millions of users); rows are ordered by time at the end anyway.
    draws = np.sort(rng.random(n)) * pop.user_activity_cdf[-1]
    user = np.minimum(np.searchsorted(pop.user_activity_cdf, draws, side="right"), config.n_users - 1)
    home = pop.user_home[user]
    # 70% a favourite merchant, else a popular one (92% in the home country).
    fav_slot = np.minimum(
        np.searchsorted(np.cumsum(FAVOURITE_WEIGHTS), rng.random(n), side="right"), N_FAVOURITES - 1
    )
    merchant = pop.user_favourites[user, fav_slot].astype("int64")
    other = rng.random(n) >= 0.7
    n_other = int(other.sum())
    abroad = rng.random(n_other) < 0.08
    picked = pop.everyday.pick_in(rng, home[other])
    picked[abroad] = pop.everyday.pick(rng, int(abroad.sum()))
    merchant[other] = picked
    if config.drifted(day) and pop.drift_merchants is not None and config.drift.new_category_share > 0:
        new = rng.random(n) < config.drift.new_category_share
        merchant[new] = pop.drift_merchants.pick_in(rng, home[new])
    # Card holders travelling today (the same ones in every chunk of the day) pay abroad, at new
    # merchants, in another time zone and a bit more: legit activity that looks like fraud.
    trip = _hash(user, day.toordinal())
    travelling = (trip % 10_000) < _TRAVEL_PER_10K
    if travelling.any():
        destination = (home[travelling] + 1 + (trip[travelling] // 10_000) % (len(COUNTRIES) - 1)) % len(
            COUNTRIES
        )
        merchant[travelling] = pop.everyday.pick_in(rng, destination)
    jet_lag = np.where(travelling, ((trip // 1_000_000) % 13).astype("float64") - 6.0, 0.0)
    amount = np.exp(
        pop.user_mu[user] + pop.merchant_offset[merchant] + 0.4 * travelling + rng.normal(0.0, 0.55, n)
    )
    hour = (pop.user_peak_hour[user] + jet_lag + rng.normal(0.0, 3.0, n)) % 24
    seconds = np.minimum(hour * 3600.0, _DAY_S - 1e-3)
    online = pop.merchant_online[merchant]
    channel = np.where(online, _ONLINE, np.where(rng.random(n) < 0.45, _CONTACTLESS, _POS))
    other_device = rng.random(n) < 0.11
    device = np.where(other_device, rng.integers(0, len(USER_DEVICES), n), pop.user_device[user])
    device = np.where(rng.random(n) < 0.02, _UNKNOWN_DEVICE, device)
    device = np.where(online, device, _POS_TERMINAL)
    return _rows(user, merchant, amount, seconds, channel, device, fraud=False)


def _account_takeovers(
    rng, pop: Population, config: GeneratorConfig, n_episodes: int
) -> dict[str, np.ndarray]:
    """Bursts on a taken-over account: big amounts, new risky merchants, often foreign, at night, on another device."""
    e = n_episodes
    user = np.minimum(
        np.searchsorted(pop.user_victim_cdf, rng.random(e) * pop.user_victim_cdf[-1], side="right"),
        config.n_users - 1,
    )
    lens = np.minimum(rng.geometric(_ATO_P, e), _ATO_MAX)
    stealthy = rng.random(e) < 0.3  # blends in: home country, daytime, usual device, moderate amounts
    foreign = ~stealthy & (rng.random(e) < 0.6)
    night = ~stealthy & (rng.random(e) < 0.55)
    start_h = np.where(
        night, rng.uniform(0.0, 5.5, e), (pop.user_peak_hour[user] + rng.normal(0.0, 3.0, e)) % 24
    )
    new_device = np.where(rng.random(e) < 0.4, _UNKNOWN_DEVICE, rng.integers(0, len(USER_DEVICES), e))
    device_e = np.where(stealthy | (rng.random(e) < 0.15), pop.user_device[user], new_device)
    boost = np.where(stealthy, rng.normal(0.4, 0.5, e), rng.normal(1.3, 0.6, e))
    home = pop.user_home[user]
    foreign_country = rng.integers(0, len(COUNTRIES) - 1, e)
    foreign_country = foreign_country + (foreign_country >= home)

    rows, offsets = _burst_offsets(rng, lens, mean_gap_s=6 * 60.0)
    n = len(rows)
    seconds = np.minimum(start_h[rows] * 3600.0 + offsets, _DAY_S - 1e-3)  # a burst ends with the day
    # New merchants in risky categories: abroad, or at home and mostly online.
    abroad = foreign[rows]
    merchant = np.where(
        abroad, pop.risky.pick_in(rng, foreign_country[rows]), pop.risky.pick_in(rng, home[rows])
    )
    online_at_home = ~abroad & (rng.random(n) < 0.85)
    merchant = np.where(online_at_home, pop.risky_online.pick_in(rng, home[rows]), merchant)
    user_r = user[rows]
    amount = np.exp(
        pop.user_mu[user_r] + pop.merchant_offset[merchant] + boost[rows] + rng.normal(0.0, 0.4, n)
    )
    online = pop.merchant_online[merchant]
    channel = np.where(online, _ONLINE, np.where(rng.random(n) < 0.3, _CONTACTLESS, _POS))
    device = np.where(online, device_e[rows], _POS_TERMINAL)
    return _rows(user_r, merchant, amount, seconds, channel, device, fraud=True)


def _card_testing(
    rng, pop: Population, config: GeneratorConfig, day: date, n_episodes: int
) -> dict[str, np.ndarray]:
    """Stolen card numbers tested with several tiny online payments, sometimes followed by a cash-out."""
    e = n_episodes
    user = rng.integers(0, config.n_users, e)
    n_tests = rng.integers(_TESTING_MIN, _TESTING_MAX + 1, e)
    cash_out = rng.random(e) < _CASH_OUT
    lens = n_tests + cash_out
    pool = (
        pop.card_testing_drift
        if config.drifted(day) and pop.card_testing_drift is not None
        else pop.card_testing
    )
    test_merchant = pool.pick(rng, e)
    home = pop.user_home[user]
    cash_country = np.where(rng.random(e) < 0.7, rng.integers(0, len(COUNTRIES), e), home)
    cash_merchant = pop.risky_online.pick_in(rng, cash_country)
    start = rng.uniform(0.0, _DAY_S, e)
    device_e = np.where(rng.random(e) < 0.5, _UNKNOWN_DEVICE, rng.integers(0, len(USER_DEVICES), e))

    rows, offsets = _burst_offsets(rng, lens, mean_gap_s=45.0)
    n = len(rows)
    position = np.arange(n) - np.repeat(np.cumsum(lens) - lens, lens)
    is_cash = position >= n_tests[rows]
    seconds = np.minimum(start[rows] + offsets, _DAY_S - 1e-3)
    merchant = np.where(is_cash, cash_merchant[rows], test_merchant[rows])
    tiny = np.round(rng.uniform(0.5, 3.0, n), 2)
    big = np.exp(pop.user_mu[user[rows]] + pop.merchant_offset[merchant] + rng.normal(1.5, 0.5, n))
    amount = np.where(is_cash, big, tiny)
    online = pop.merchant_online[merchant]
    channel = np.where(online, _ONLINE, _POS)
    device = np.where(online, device_e[rows], _POS_TERMINAL)
    return _rows(user[rows], merchant, amount, seconds, channel, device, fraud=True, probe=~is_cash)


def _strings(vocabulary, codes: np.ndarray) -> pd.arrays.ArrowStringArray:
    return pd.array(pa.array(list(vocabulary)).take(pa.array(codes)), dtype="str")


def _chunk_frame(config: GeneratorConfig, day: date, chunk: int, n_chunks: int) -> pd.DataFrame:
    pop, categories = _pop(config)
    rng = np.random.default_rng([config.seed, day.toordinal(), chunk])
    legit_rows, ato_episodes, testing_episodes, _ = _day_plan(config, day)
    parts = [
        _legit(rng, pop, config, day, int(rng.poisson(legit_rows / n_chunks))),
        _account_takeovers(rng, pop, config, int(rng.poisson(ato_episodes / n_chunks))),
        _card_testing(rng, pop, config, day, int(rng.poisson(testing_episodes / n_chunks))),
    ]
    cols = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
    order = np.argsort(cols["seconds"], kind="stable")
    cols = {k: v[order] for k, v in cols.items()}
    n = len(order)
    merchant = cols["merchant"]
    amount = cols["amount"]
    if config.drifted(day):
        amount = amount * np.where(cols["probe"], 1.0, config.drift.amount_scale)  # probes stay tiny
    amount = np.clip(np.round(amount, 2), 0.01, _MAX_AMOUNT)

    day_start_us = int(pd.Timestamp(day, tz="UTC").value // 1000)
    event_us = day_start_us + (cols["seconds"] * 1e6).astype("int64")
    created_us = event_us + (rng.exponential(2.0, n) * 1e6).astype("int64") + 50_000

    # Labels: chargebacks for fraud (1-30 days), confirmation after the maturity period for legit.
    fraud = cols["fraud"]
    chargeback = fraud & (rng.random(n) >= 0.04)  # some fraud is never disputed
    chargeback |= ~fraud & (rng.random(n) < 0.0003)  # friendly fraud: a legit purchase disputed
    delay_days = np.clip(rng.lognormal(math.log(8.0), 0.6, n), 1.0, float(MAX_CHARGEBACK_DELAY_DAYS))
    label_us = np.where(
        chargeback,
        event_us + (delay_days * _DAY_S * 1e6).astype("int64"),
        event_us + int(config.label_maturity_days * _DAY_S * 1e6),
    )
    known = label_us <= config.labels_as_of.value // 1000
    is_fraud = pd.array(np.where(known, chargeback.astype("int64"), 0), dtype="Int64")
    is_fraud[~known] = pd.NA

    prefix = f"{day:%Y%m%d}-{chunk:03d}-"
    ids = pc.binary_join_element_wise(
        prefix, pc.utf8_lpad(pc.cast(pa.array(np.arange(n)), pa.string()), 8, "0"), ""
    )

    def ts(us: np.ndarray) -> pd.arrays.DatetimeArray:
        return pd.array(us.astype("datetime64[us]"), dtype="datetime64[us]").tz_localize("UTC")

    label_ts = ts(label_us)
    label_ts[~known] = pd.NaT
    return pd.DataFrame(
        {
            "transaction_id": pd.array(ids, dtype="str"),
            "user_id": cols["user"].astype("int64") + 1,
            "merchant_id": merchant.astype("int64") + 1,
            "merchant_category": _strings(categories, pop.merchant_category[merchant]),
            "amount": amount.astype("float64"),
            "country": _strings(COUNTRIES, pop.merchant_country[merchant]),
            "device": _strings(DEVICES, cols["device"]),
            "channel": _strings(CHANNELS, cols["channel"]),
            "event_timestamp": ts(event_us),
            "created_timestamp": ts(created_us),
            "is_fraud": is_fraud,
            "label_timestamp": label_ts,
        }
    )


def iter_day_chunks(config: GeneratorConfig, day: date | str) -> Iterator[pd.DataFrame]:
    """The day's transactions as one frame per chunk (at most ~`chunk_rows` rows each)."""
    day = parse_date(day, "day")
    n_chunks = _day_plan(config, day)[3]
    for chunk in range(n_chunks):
        yield _chunk_frame(config, day, chunk, n_chunks)


def generate_day(config: GeneratorConfig, day: date | str) -> pd.DataFrame:
    """All transactions of `day` in one frame; deterministic from (config, day) alone."""
    frames = list(iter_day_chunks(config, day))
    return frames[0] if len(frames) == 1 else pd.concat(frames, ignore_index=True)


# --- Writing the raw layout ---


def write_day(config: GeneratorConfig, day: date | str, raw_dir: str | Path) -> Path:
    """Generate `day` and write raw_dir/transactions/date=YYYY-MM-DD/part-*.parquet (atomic, overwrites)."""
    day = parse_date(day, "day")
    return write_partition(iter_day_chunks(config, day), raw_dir, day)


def write_range(
    config: GeneratorConfig, raw_dir: str | Path, start: date | str, end: date | str
) -> list[Path]:
    """Write every day from `start` to `end` (both included); one partition in memory at a time."""
    start, end = parse_date(start, "start"), parse_date(end, "end")
    if end < start:
        raise ValueError(f"end {end} is before start {start}")
    return [write_day(config, start + timedelta(days=i), raw_dir) for i in range((end - start).days + 1)]


def write_users(config: GeneratorConfig, raw_dir: str | Path) -> Path:
    """Write raw_dir/users/users.parquet atomically (temp file, then rename)."""
    table = pa.Table.from_pandas(generate_users(config), schema=USERS_ARROW_SCHEMA, preserve_index=False)
    return write_parquet_atomic(Path(raw_dir) / "users" / "users.parquet", table, compression="snappy")


def write_dataset(config: GeneratorConfig, raw_dir: str | Path) -> list[Path]:
    """Users plus every day of the configured period."""
    return [write_users(config, raw_dir), *write_range(config, raw_dir, config.start, config.end)]
