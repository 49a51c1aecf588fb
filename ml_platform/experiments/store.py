"""An experiment's state in Redis, shared by every serving process, the stream worker, the CLI
and the Dagster assets: configs, the arms' posteriors, the decisions awaiting a reward, feedback.

Keys (all under `<project>:`; `<name>` the experiment; on Redis Cluster hash-tagged, keys.py):
  experiments:active             the experiment the API routes by (at most one per project)
  experiment:<name>              hash: config (JSON), status, started_at/by, stopped_at/by, why
  experiment:<name>:posterior    hash: <arm>:s, <arm>:f (successes, failures; discounted)
  experiment:<name>:counts       hash: <arm>:n rewards, <arm>:sum their total, <arm>:served decisions,
                                 feedback:accepted, feedback:duplicate (feedback that names no
                                 decision, unknown or invalid, names no experiment either: the
                                 API counts it in ml_platform_feedback_total{outcome}; 0 here)
  experiment:<name>:sticky       hash: user_id -> "<arm>|<selection probability>" (sticky experiments)
  experiment:<name>:label-days   hash: label day -> rewards applied (label rewards, once per day)
  xd:<prediction_id>             hash: e (experiment), a (arm), p (selection probability), r (reward,
                                 once given); expires `feedback_ttl_s` after the decision

Every update is one Lua script (atomic in Redis: no read-then-write between processes, so two API
processes rewarding the same arm never lose a count). A reward for a decision already rewarded is
refused (`duplicate`): each decision counts once.

On Redis Cluster (a RedisCluster client) the keys are hash-tagged (keys.py): everything but the
decisions in one slot per project. A reward then reads its decision first (its own slot), and
applies itself in one script in the experiments' slot, which refuses a second reward by a marker
key (`rewarded:<name>:<prediction_id>`, SET NX, living as long as the decision) instead of the
decision's `r` field: still each decision once, and the posterior, counts and marker change
together. What is atomic on a cluster: docs/experiments.md, "Redis Cluster".
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from ml_platform.experiments.config import ExperimentConfig, check_reward
from ml_platform.experiments.keys import ExperimentKeys
from ml_platform.experiments.scripts import CLUSTER_FEEDBACK, FEEDBACK, LABEL_DAY, STICK
from ml_platform.experiments.thompson import Posterior, selection_probabilities

RUNNING, STOPPED = "running", "stopped"
# POST /feedback's outcomes: accepted, or why not (the API answers 404 / 409 / 422 for these)
ACCEPTED, UNKNOWN, DUPLICATE, INVALID = "accepted", "unknown", "duplicate", "invalid"
FEEDBACK_OUTCOMES = (ACCEPTED, UNKNOWN, DUPLICATE, INVALID)
FEEDBACK_CHUNK = 1000  # rewards per cluster feedback script
NO_EXPIRY_MARKER_MS = 30 * 86400 * 1000  # a marker's TTL for a decision without one (never written so)


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


@dataclass(frozen=True)
class ArmStats:
    arm: str
    version: int
    mean: float  # posterior mean of the reward rate
    std: float
    samples: int  # rewards received
    reward_sum: float
    served: int  # decisions made with this arm
    traffic_share: float  # served / all decisions
    selection_probability: float  # P(the next decision picks it)

    def to_dict(self) -> dict[str, Any]:
        return {
            "version": self.version,
            "mean": round(self.mean, 6),
            "std": round(self.std, 6),
            "samples": self.samples,
            "reward_sum": round(self.reward_sum, 6),
            "served": self.served,
            "traffic_share": round(self.traffic_share, 6),
            "selection_probability": round(self.selection_probability, 6),
        }


class ExperimentStore:
    """One project's experiments in Redis. `client` is a redis.Redis (or a RedisCluster: the
    cluster key layout, keys.py); `async_client` (optional) a redis.asyncio.Redis (or its cluster
    client) for the API's request path (decisions, feedback)."""

    def __init__(self, client: Any, project: str, async_client: Any = None):
        from ml_platform.featurestore.redis_cluster import is_cluster_client

        self.client = client
        self.async_client = async_client
        self.project = project
        self.keys = ExperimentKeys(project, cluster=is_cluster_client(client))
        self.prefix = self.keys.experiment_prefix
        feedback = CLUSTER_FEEDBACK if self.keys.cluster else FEEDBACK
        self._feedback = client.register_script(feedback)
        self._label_day = client.register_script(LABEL_DAY)
        self._stick = client.register_script(STICK)
        if async_client is not None:
            self._afeedback = async_client.register_script(feedback)
            self._astick = async_client.register_script(STICK)

    # ---- keys

    @property
    def active_key(self) -> str:
        return self.keys.active

    def key(self, name: str, part: str | None = None) -> str:
        return self.keys.experiment(name, part)

    def decision_key(self, prediction_id: str) -> str:
        return self.keys.decision(prediction_id)

    # ---- lifecycle

    def start(self, config: ExperimentConfig, *, who: str, now: float | None = None) -> None:
        """Record `config` and make it the project's active experiment. Refused (ValueError) when
        another experiment is active or this name was used before (its evidence would mix in)."""
        now = time.time() if now is None else now
        active = self.active()
        if active is not None:
            raise ValueError(f"experiment {active!r} is running; stop it before starting {config.name!r}")
        if self.client.exists(self.key(config.name)):
            raise ValueError(
                f"an experiment named {config.name!r} exists already (status {self.status(config.name)}); "
                "choose a new name"
            )
        fields = {
            "config": json.dumps(config.to_dict()),
            "status": RUNNING,
            "started_at": now,
            "started_by": who,
            "discount": config.discount,
            "revision": 1,
        }
        with self.client.pipeline(transaction=True) as pipe:
            pipe.hset(self.key(config.name), mapping=fields)
            pipe.set(self.active_key, config.name)
            pipe.execute()

    def update(self, config: ExperimentConfig, *, who: str, why: str) -> None:
        """Replace a running experiment's routing (a rollout's next stage); the evidence stays."""
        if self.status(config.name) != RUNNING:
            raise ValueError(f"experiment {config.name!r} is not running")
        with self.client.pipeline(transaction=True) as pipe:
            pipe.hset(
                self.key(config.name),
                mapping={"config": json.dumps(config.to_dict()), "discount": config.discount,
                         "updated_by": who, "updated_why": why, "updated_at": time.time()},
            )  # fmt: skip
            pipe.hincrby(self.key(config.name), "revision", 1)
            pipe.execute()

    def stop(self, name: str, *, who: str, why: str = "", now: float | None = None) -> None:
        """Stop routing by `name` (the API serves the champion alone again); its evidence stays."""
        if self.status(name) is None:
            raise KeyError(f"no experiment named {name!r}")
        now = time.time() if now is None else now
        with self.client.pipeline(transaction=True) as pipe:
            pipe.hset(self.key(name), mapping={"status": STOPPED, "stopped_at": now, "stopped_by": who, "why": why})
            pipe.hincrby(self.key(name), "revision", 1)
            pipe.execute()
        # only clear the pointer if it still names this experiment
        self.client.eval(
            "if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end return 0",
            1,
            self.active_key,
            name,
        )
        self.client.delete(self.key(name, "sticky"))

    def delete(self, name: str) -> None:
        """Remove every key of experiment `name` (tests, and reusing a name on purpose)."""
        self.client.delete(*(self.key(name, p) for p in (None, "posterior", "counts", "sticky", "label-days")))
        if self.keys.cluster:  # its reward markers (on one node the decisions hold them, expiring)
            from ml_platform.featurestore.online import unlink_matching

            unlink_matching(self.client, self.keys.rewarded(name, "*"))
        self.client.eval(
            "if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end return 0",
            1,
            self.active_key,
            name,
        )

    # ---- reading

    def active(self) -> str | None:
        name = self.client.get(self.active_key)
        return _text(name) if name is not None else None

    def status(self, name: str) -> str | None:
        value = self.client.hget(self.key(name), "status")
        return _text(value) if value is not None else None

    def meta(self, name: str) -> dict[str, str]:
        return {_text(k): _text(v) for k, v in self.client.hgetall(self.key(name)).items()}

    def config(self, name: str) -> ExperimentConfig:
        raw = self.client.hget(self.key(name), "config")
        if raw is None:
            raise KeyError(f"no experiment named {name!r}")
        return ExperimentConfig.from_dict(json.loads(raw))

    def names(self) -> list[str]:
        out = []
        for key in self.client.scan_iter(match=self.prefix + "*", count=500):
            rest = _text(key)[len(self.prefix) :]
            if ":" not in rest:
                out.append(rest)
        return sorted(out)

    def revision(self, name: str) -> int:
        value = self.client.hget(self.key(name), "revision")
        return int(value) if value is not None else 0

    def read_posterior(self, config: ExperimentConfig) -> Posterior:
        raw = self.client.hgetall(self.key(config.name, "posterior"))
        return posterior_of(config, raw)

    def stats(self, name: str, rng: np.random.Generator | None = None) -> dict[str, ArmStats]:
        """Per arm: posterior mean, std, rewards received, decisions served, traffic share, and the
        probability that the next decision picks it (a bandit's `get_stats()`)."""
        config = self.config(name)
        with self.client.pipeline(transaction=True) as pipe:
            pipe.hgetall(self.key(name, "posterior"))
            pipe.hgetall(self.key(name, "counts"))
            raw_post, raw_counts = pipe.execute()
        posterior = posterior_of(config, raw_post)
        counts = {_text(k): float(v) for k, v in raw_counts.items()}
        served = [int(counts.get(f"{arm}:served", 0)) for arm in config.arms]
        total = sum(served)
        if config.routing == "fixed":
            probs = np.asarray([config.weights[a] for a in config.arms])
        else:
            probs = selection_probabilities(posterior, rng or np.random.default_rng(), config.exploration_floor)
        mean, std = posterior.mean(), posterior.std()
        return {
            arm: ArmStats(
                arm=arm,
                version=version,
                mean=float(mean[i]),
                std=float(std[i]),
                samples=int(counts.get(f"{arm}:n", 0)),
                reward_sum=float(counts.get(f"{arm}:sum", 0.0)),
                served=served[i],
                traffic_share=served[i] / total if total else 0.0,
                selection_probability=float(probs[i]),
            )
            for i, (arm, version) in enumerate(config.arms.items())
        }

    def feedback_counts(self, name: str) -> dict[str, int]:
        raw = self.client.hgetall(self.key(name, "counts"))
        counts = {_text(k): int(float(v)) for k, v in raw.items()}
        return {o: counts.get(f"feedback:{o}", 0) for o in FEEDBACK_OUTCOMES}

    # ---- the request path (async client)

    def _decisions(self, pipe, name, prediction_ids, arms, probabilities, ttl_s) -> None:
        served: dict[str, int] = {}
        for pid, arm, p in zip(prediction_ids, arms, probabilities):
            key = self.decision_key(pid)
            pipe.hset(key, mapping={"e": name, "a": arm, "p": round(float(p), 6)})
            pipe.expire(key, ttl_s)
            served[arm] = served.get(arm, 0) + 1
        counts = self.key(name, "counts")
        for arm, n in served.items():
            pipe.hincrby(counts, f"{arm}:served", n)

    async def record_decisions(
        self,
        name: str,
        prediction_ids: Sequence[str],
        arms: Sequence[str],
        probabilities: Sequence[float],
        ttl_s: int,
    ) -> None:
        """Remember which arm served each prediction (and its selection probability), so a reward
        arriving later goes to that arm; count the decisions per arm. One pipeline."""
        async with self.async_client.pipeline(transaction=False) as pipe:
            self._decisions(pipe, name, prediction_ids, arms, probabilities, ttl_s)
            await pipe.execute()

    def record_decisions_sync(self, name, prediction_ids, arms, probabilities, ttl_s: int) -> None:
        """`record_decisions` with the sync client (the stream worker)."""
        with self.client.pipeline(transaction=False) as pipe:
            self._decisions(pipe, name, prediction_ids, arms, probabilities, ttl_s)
            pipe.execute()

    async def stick(self, name: str, users: Sequence[int], proposals: Sequence[str]) -> list[str]:
        """Sticky assignment: each user's arm ("<arm>|<p>"), the proposal for a user seen first."""
        args: list[Any] = []
        for user, proposal in zip(users, proposals):
            args += [int(user), proposal]
        out = await self._astick(keys=[self.key(name, "sticky")], args=args)
        return [_text(v) for v in out]

    async def feedback(self, items: Iterable[tuple[str, float]]) -> list[tuple[str, str]]:
        """Apply rewards by prediction id, each atomically: [(outcome, arm)], outcome one of
        ACCEPTED, UNKNOWN (no decision: never made, not in an experiment, or expired), DUPLICATE."""
        items = list(items)
        if self.keys.cluster:
            async with self.async_client.pipeline(transaction=False) as pipe:
                self._read_decisions(pipe, items)
                results, calls = self._cluster_calls(items, await pipe.execute())
            for keys, args, where in calls:
                self._cluster_results(results, where, await self._afeedback(keys=keys, args=args))
            return results
        async with self.async_client.pipeline(transaction=False) as pipe:
            for pid, reward in items:
                await self._afeedback(keys=[self.decision_key(pid)], args=[reward, self.prefix], client=pipe)
            results = await pipe.execute()
        return [(_text(r[0]), _text(r[1])) for r in results]

    def feedback_sync(self, items: Iterable[tuple[str, float]]) -> list[tuple[str, str]]:
        """`feedback` with the sync client (tools, benchmarks)."""
        items = [(pid, check_reward(r)) for pid, r in items]
        if self.keys.cluster:
            with self.client.pipeline(transaction=False) as pipe:
                self._read_decisions(pipe, items)
                results, calls = self._cluster_calls(items, pipe.execute())
            for keys, args, where in calls:
                self._cluster_results(results, where, self._feedback(keys=keys, args=args))
            return results
        with self.client.pipeline(transaction=False) as pipe:
            for pid, reward in items:
                self._feedback(keys=[self.decision_key(pid)], args=[reward, self.prefix], client=pipe)
            results = pipe.execute()
        return [(_text(r[0]), _text(r[1])) for r in results]

    # ---- feedback on Redis Cluster: read the decisions, then one script per experiment

    def _read_decisions(self, pipe, items: Sequence[tuple[str, float]]) -> None:
        for pid, _ in items:
            pipe.hmget(self.decision_key(pid), ["e", "a"])
            pipe.pttl(self.decision_key(pid))

    def _cluster_calls(self, items: Sequence[tuple[str, float]], found: Sequence[Any]) -> tuple[list, list]:
        """From the decisions read: the results so far (UNKNOWN filled in) and the scripts to run
        in the experiments' slot, (keys, args, [(item index, arm)]) per experiment and chunk, the
        items in their order. A reward's marker lives as long as its decision (+1 s), so while the
        decision can be found a second reward is refused, and after it the reward is unknown."""
        results: list[Any] = [None] * len(items)
        by_experiment: dict[str, list[tuple[int, str, float, str, int]]] = {}
        for i, (pid, reward) in enumerate(items):
            (name, arm), ttl = found[2 * i], int(found[2 * i + 1])
            if name is None:
                results[i] = (UNKNOWN, "")
                continue
            marker_ms = NO_EXPIRY_MARKER_MS if ttl == -1 else max(ttl, 0) + 1000
            by_experiment.setdefault(_text(name), []).append((i, pid, reward, _text(arm), marker_ms))
        calls = []
        for name, rows in by_experiment.items():
            for s in range(0, len(rows), FEEDBACK_CHUNK):
                chunk = rows[s : s + FEEDBACK_CHUNK]
                keys = [self.key(name), self.key(name, "posterior"), self.key(name, "counts")]
                keys += [self.keys.rewarded(name, pid) for _, pid, _, _, _ in chunk]
                args: list[Any] = []
                for _, _, reward, arm, marker_ms in chunk:
                    args += [marker_ms, arm, reward]
                calls.append((keys, args, [(i, arm) for i, _, _, arm, _ in chunk]))
        return results, calls

    @staticmethod
    def _cluster_results(results: list, where: Sequence[tuple[int, str]], outcomes: Sequence[Any]) -> None:
        for (i, arm), outcome in zip(where, outcomes):
            results[i] = (_text(outcome), arm)

    # ---- label rewards (the experiment_rewards asset)

    def apply_label_day(self, name: str, day: str, rewards: Sequence[tuple[str, float]]) -> int | None:
        """Apply one label day's rewards [(arm, reward)] atomically, once: returns how many were
        applied, or None when that day was applied before (a re-run adds nothing)."""
        config = self.config(name)
        args: list[Any] = [day, config.discount]
        for arm, reward in rewards:
            if arm not in config.arms:
                raise ValueError(f"arm {arm!r} is not an arm of experiment {name!r} ({config.arm_names})")
            args += [arm, check_reward(reward)]
        keys = [self.key(name, "posterior"), self.key(name, "counts"), self.key(name, "label-days")]
        applied = int(self._label_day(keys=keys, args=args))
        return None if applied < 0 else applied

    def label_days(self, name: str) -> dict[str, int]:
        return {_text(k): int(v) for k, v in self.client.hgetall(self.key(name, "label-days")).items()}


def posterior_of(config: ExperimentConfig, raw: Mapping[Any, Any]) -> Posterior:
    values = {_text(k): float(v) for k, v in raw.items()}
    return Posterior.from_counts(
        [max(values.get(f"{arm}:s", 0.0), 0.0) for arm in config.arms],
        [max(values.get(f"{arm}:f", 0.0), 0.0) for arm in config.arms],
        config.prior,
    )
