"""The synthetic world's vocabulary and population: merchant categories, countries, devices and
channels, and the card holders and merchants themselves (a pure function of the seed, cached).

`generator` draws each day's transactions from this population.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import numpy as np

from ml_platform.transactions import CHANNELS, DEVICES, KNOWN_MERCHANT_CATEGORIES

# --- Vocabulary ---
# category: (share of merchants, log-amount offset vs the user's usual spend, share of online merchants)
CATEGORY_PROFILES: dict[str, tuple[float, float, float]] = {
    "grocery": (0.20, 0.0, 0.03),
    "restaurants": (0.16, -0.3, 0.10),
    "fuel": (0.09, 0.2, 0.0),
    "pharmacy": (0.05, -0.4, 0.05),
    "clothing": (0.07, 0.4, 0.35),
    "entertainment": (0.05, -0.1, 0.40),
    "utilities": (0.04, 0.6, 0.80),
    "online_retail": (0.13, 0.2, 1.0),
    "travel": (0.04, 1.6, 0.60),
    "electronics": (0.06, 1.1, 0.40),
    "gaming": (0.05, -0.7, 1.0),
    "jewelry": (0.015, 1.5, 0.20),
    "gift_cards": (0.015, 0.3, 0.70),
}
BASE_CATEGORIES: tuple[str, ...] = tuple(CATEGORY_PROFILES)
# The vocabularies are the transaction contract's: the world draws categories, devices and
# channels by index into them, so the profiles above list the contract's first categories in order.
MERCHANT_CATEGORIES: tuple[str, ...] = KNOWN_MERCHANT_CATEGORIES
DRIFT_CATEGORIES: tuple[str, ...] = MERCHANT_CATEGORIES[len(BASE_CATEGORIES) :]  # appear with drift only
assert MERCHANT_CATEGORIES[: len(BASE_CATEGORIES)] == BASE_CATEGORIES, "profiles must follow the contract's order"
_DRIFT_CATEGORY_PROFILE = (0.0, 0.8, 1.0)
RISKY_CATEGORIES = ("electronics", "jewelry", "gaming", "gift_cards", "online_retail", "travel")
CARD_TESTING_CATEGORIES = ("gaming", "gift_cards", "online_retail")

HOME_COUNTRIES = ("US", "GB", "DE", "FR", "ES", "IT", "NL", "CA")
_HOME_WEIGHTS = np.array([0.30, 0.14, 0.14, 0.12, 0.09, 0.08, 0.06, 0.07])
OTHER_COUNTRIES = ("BR", "MX", "IN", "NG", "RO", "TR", "PH", "VN", "AE", "TH")
COUNTRIES: tuple[str, ...] = HOME_COUNTRIES + OTHER_COUNTRIES

# DEVICES and CHANNELS come from the contract; a card holder's own device is one of the first four.
USER_DEVICES = DEVICES[:4]
_USER_DEVICE_WEIGHTS = np.array([0.35, 0.35, 0.2, 0.1])
assert DEVICES[len(USER_DEVICES) :] == ("pos_terminal", "unknown") and CHANNELS == ("pos", "contactless", "online")



# --- Population: users and merchants, a pure function of the seed ---


class MerchantPool:
    """Weighted merchant sampling, globally or within a given country (vectorized)."""

    def __init__(
        self, merchant_idx: np.ndarray, merchant_country: np.ndarray, weights: np.ndarray, n_countries: int
    ):
        country = merchant_country[merchant_idx]
        order = np.lexsort((merchant_idx, country))
        self.idx = merchant_idx[order]
        country = country[order]
        w = weights[self.idx].astype("float64")
        self.cdf = np.cumsum(w)
        counts = np.bincount(country, minlength=n_countries)
        self.has_country = counts > 0
        ends = np.cumsum(counts)
        starts = ends - counts
        prev = np.where(starts > 0, self.cdf[np.maximum(starts - 1, 0)], 0.0)
        total = np.where(counts > 0, self.cdf[np.maximum(ends - 1, 0)] - prev, 1.0)
        within = (self.cdf - np.repeat(prev, counts)) / np.repeat(total, counts)
        self.key = country + np.minimum(within, 1.0)

    def pick(self, rng: np.random.Generator, n: int) -> np.ndarray:
        u = rng.random(n) * self.cdf[-1]
        return self.idx[np.minimum(np.searchsorted(self.cdf, u, side="right"), len(self.idx) - 1)]

    def pick_in(self, rng: np.random.Generator, countries: np.ndarray) -> np.ndarray:
        """One merchant per requested country (any country if the pool has none there)."""
        u = rng.random(len(countries)) * (1 - 1e-9)
        pos = np.searchsorted(self.key, countries + u, side="right")
        out = self.idx[np.minimum(pos, len(self.idx) - 1)]
        missing = ~self.has_country[countries]
        if missing.any():
            out[missing] = self.pick(rng, int(missing.sum()))
        return out


@dataclass(frozen=True)
class Population:
    # users (index i is user_id i + 1)
    user_home: np.ndarray  # country code
    user_mu: np.ndarray  # log of usual spend
    user_peak_hour: np.ndarray
    user_device: np.ndarray
    user_activity_cdf: np.ndarray
    user_age_days: np.ndarray
    user_victim_cdf: np.ndarray  # young accounts are taken over more often
    user_favourites: np.ndarray  # (n_users, K) merchant index
    # merchants (index j is merchant_id j + 1)
    merchant_category: np.ndarray
    merchant_country: np.ndarray
    merchant_online: np.ndarray
    merchant_offset: np.ndarray  # log-amount offset
    n_base_merchants: int
    everyday: MerchantPool  # base merchants, by popularity
    risky: MerchantPool
    risky_online: MerchantPool
    card_testing: MerchantPool
    drift_merchants: MerchantPool | None
    card_testing_drift: MerchantPool | None


N_FAVOURITES = 6
FAVOURITE_WEIGHTS = np.array([0.3, 0.22, 0.17, 0.13, 0.1, 0.08])


@functools.lru_cache(maxsize=4)
def build_population(
    seed: int, n_users: int, n_merchants: int, drift_categories: tuple[str, ...]
) -> tuple[Population, list[str]]:
    """Users and merchants (and the category vocabulary), a pure function of the seed; cached."""
    rng = np.random.default_rng([seed, 0xC0FFEE])
    categories = list(MERCHANT_CATEGORIES) + [c for c in drift_categories if c not in MERCHANT_CATEGORIES]
    cat_index = {c: i for i, c in enumerate(categories)}
    n_home = len(HOME_COUNTRIES)

    # Merchants: first one per (home country, base category) so every pool has every home country.
    grid_c, grid_k = np.meshgrid(np.arange(n_home), np.arange(len(BASE_CATEGORIES)), indexing="ij")
    shares = np.array([p[0] for p in CATEGORY_PROFILES.values()])
    rest = n_merchants - grid_c.size
    m_cat = np.concatenate([grid_k.ravel(), rng.choice(len(BASE_CATEGORIES), rest, p=shares / shares.sum())])
    home_or_other = rng.random(rest) < 0.85
    rest_country = np.where(
        home_or_other,
        rng.choice(n_home, rest, p=_HOME_WEIGHTS),
        n_home + rng.integers(0, len(OTHER_COUNTRIES), rest),
    )
    m_country = np.concatenate([grid_c.ravel(), rest_country])
    profiles = [CATEGORY_PROFILES.get(c, _DRIFT_CATEGORY_PROFILE) for c in categories]
    cat_offset = np.array([p[1] for p in profiles])
    cat_online = np.array([p[2] for p in profiles])
    m_online = rng.random(n_merchants) < cat_online[m_cat]
    m_offset = cat_offset[m_cat] + rng.normal(0.0, 0.25, n_merchants)
    popularity = rng.lognormal(0.0, 1.0, n_merchants)
    # Merchants of the drift's new categories exist from the start but are used only after it.
    # They come from their own random stream, so a drift scenario changes nothing before it starts.
    if drift_categories:
        drng = np.random.default_rng([seed, 0xD21F7])
        n_drift = max(len(drift_categories) * n_home, n_merchants // 20)
        d_cat = np.array([cat_index[drift_categories[i % len(drift_categories)]] for i in range(n_drift)])
        d_country = np.concatenate(
            [
                np.tile(np.arange(n_home), len(drift_categories)),
                drng.choice(n_home, n_drift - len(drift_categories) * n_home, p=_HOME_WEIGHTS),
            ]
        )
        m_cat = np.concatenate([m_cat, d_cat])
        m_country = np.concatenate([m_country, d_country])
        m_online = np.concatenate([m_online, drng.random(n_drift) < cat_online[d_cat]])
        m_offset = np.concatenate([m_offset, cat_offset[d_cat] + drng.normal(0.0, 0.25, n_drift)])
        popularity = np.concatenate([popularity, drng.lognormal(0.0, 1.0, n_drift)])
    n_all = len(m_cat)
    n_countries = len(COUNTRIES)
    base_idx = np.arange(n_merchants)
    risky_mask = np.isin(m_cat[:n_merchants], [cat_index[c] for c in RISKY_CATEGORIES])
    testing_mask = np.isin(m_cat[:n_merchants], [cat_index[c] for c in CARD_TESTING_CATEGORIES])
    everyday = MerchantPool(base_idx, m_country, popularity, n_countries)
    risky = MerchantPool(base_idx[risky_mask], m_country, popularity, n_countries)
    risky_online = MerchantPool(
        base_idx[risky_mask & m_online[:n_merchants]], m_country, popularity, n_countries
    )
    card_testing = MerchantPool(
        base_idx[testing_mask & m_online[:n_merchants]], m_country, popularity, n_countries
    )
    drift_pool = testing_drift = None
    if drift_categories:
        drift_idx = np.arange(n_merchants, n_all)
        drift_pool = MerchantPool(drift_idx, m_country, popularity, n_countries)
        testing_drift = MerchantPool(
            np.concatenate([base_idx[testing_mask & m_online[:n_merchants]], drift_idx]),
            m_country,
            popularity,
            n_countries,
        )

    # Users.
    home = rng.choice(n_home, n_users, p=_HOME_WEIGHTS)
    mu = rng.normal(math.log(30.0), 0.6, n_users)
    night_owl = rng.random(n_users) < 0.1
    peak = np.where(night_owl, rng.uniform(21.0, 26.0, n_users), rng.uniform(9.5, 20.0, n_users)) % 24
    device = rng.choice(len(USER_DEVICES), n_users, p=_USER_DEVICE_WEIGHTS)
    activity = rng.gamma(2.0, 0.5, n_users)
    age = np.minimum(rng.exponential(900.0, n_users), 7300.0).astype("int64") + 1
    victim_weight = np.where(age < 180, 3.0, 1.0) * (0.5 + activity)
    favourites = (
        everyday.pick_in(rng, np.repeat(home, N_FAVOURITES)).reshape(n_users, N_FAVOURITES).astype("int32")
    )
    return Population(
        user_home=home,
        user_mu=mu,
        user_peak_hour=peak,
        user_device=device,
        user_activity_cdf=np.cumsum(activity),
        user_age_days=age,
        user_victim_cdf=np.cumsum(victim_weight),
        user_favourites=favourites,
        merchant_category=m_cat,
        merchant_country=m_country,
        merchant_online=m_online,
        merchant_offset=m_offset,
        n_base_merchants=n_merchants,
        everyday=everyday,
        risky=risky,
        risky_online=risky_online,
        card_testing=card_testing,
        drift_merchants=drift_pool,
        card_testing_drift=testing_drift,
    ), categories
