"""The lifecycle the CLI and the Dagster sensor drive: experiments (start, status, stop) and staged
rollouts (start, advance, abort), with the registry checks and the alias moves they imply.

A rollout is an experiment of "fixed" routing whose config follows its stage: in the shadow stage
the champion serves every request and the candidate scores `shadow_share` of them in shadow; at
5 % / 50 % the candidate serves that share live; reaching the end of the last stage (100 %) makes
it champion (`ModelRegistry.promote`: audited, the old champion becomes `previous-champion`, which
every server keeps loaded). A breach, or an abort, stops the experiment: the routers of every
serving process see it within their refresh interval (0.5 s) and the champion alone answers again.

The rollout's state (`rollout.RolloutState`, every transition with who/what/when/why and its
evidence) is one JSON value in Redis, `<project>:rollout:<experiment>`; `<project>:rollout:active`
names the running one. Saves are compare-and-set on a revision: the sensor and an operator's abort
never overwrite each other. (On Redis Cluster both keys carry the project's experiments hash tag,
keys.py, so the compare-and-set is still one WATCH/MULTI on one master.)
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from ml_platform.experiments.config import ExperimentConfig, arm_name
from ml_platform.experiments.rollout import (
    COMPLETED,
    Evidence,
    RolloutPlan,
    RolloutState,
    Stage,
    Transition,
    abort,
    apply,
    describe,
    evaluate,
    start_rollout,
)

__all__ = ["ROLLOUT_PREFIX", "RolloutControl", "check_versions", "experiment_status", "stage_config",
           "start_experiment"]  # fmt: skip
from ml_platform.experiments.store import RUNNING, ExperimentStore

ROLLOUT_PREFIX = "rollout-v"  # a rollout's experiment: rollout-v<candidate>-<start time, ms>


# --------------------------------------------------------------------------- experiments


def check_versions(registry: Any, config: ExperimentConfig) -> None:
    """Every version the experiment serves is registered, else a ValueError naming the field."""
    registered = sorted(int(v.version) for v in registry.list_versions())
    fields = [(f"arms.{arm}", v) for arm, v in config.arms.items()]
    if config.shadow_version is not None:
        fields.append(("shadow_version", int(config.shadow_version)))
    for field_name, version in fields:
        if version not in registered:
            raise ValueError(
                f"{field_name}: version {version} is not registered under model {registry.model_name!r} "
                f"(registered: {', '.join(map(str, registered)) or 'none'})"
            )


def start_experiment(store: ExperimentStore, registry: Any, config: ExperimentConfig, *, who: str) -> None:
    """Check the versions against the registry, then make `config` the project's active experiment."""
    check_versions(registry, config)
    store.start(config, who=who)


def experiment_status(store: ExperimentStore, name: str) -> dict[str, Any]:
    meta = store.meta(name)
    if not meta:
        raise KeyError(f"no experiment named {name!r} (experiments: {', '.join(store.names()) or 'none'})")
    return {
        "name": name,
        "status": meta.get("status"),
        "active": store.active() == name,
        "started_by": meta.get("started_by"),
        "started_at": _iso(meta.get("started_at")),
        "stopped_by": meta.get("stopped_by"),
        "stopped_at": _iso(meta.get("stopped_at")),
        "why": meta.get("why"),
        "config": store.config(name).to_dict(),
        "arms": {arm: s.to_dict() for arm, s in store.stats(name).items()},
        "feedback": store.feedback_counts(name),
    }


def _iso(value: str | None) -> str | None:
    return datetime.fromtimestamp(float(value), UTC).isoformat(timespec="seconds") if value else None


# --------------------------------------------------------------------------- rollouts


def stage_config(name: str, state: RolloutState, stage: Stage | None = None) -> ExperimentConfig:
    """The experiment config of a rollout's stage (default: its current one)."""
    stage = stage or state.stage
    champion, candidate = arm_name(state.champion_version), arm_name(state.candidate_version)
    if stage.traffic <= 0.0:  # shadow: the champion answers, the candidate scores beside it
        return ExperimentConfig(
            name=name, arms={champion: state.champion_version}, routing="fixed", weights={champion: 1.0},
            shadow_version=state.candidate_version, shadow_share=stage.shadow_share,
        )  # fmt: skip
    return ExperimentConfig(
        name=name,
        arms={champion: state.champion_version, candidate: state.candidate_version},
        routing="fixed",
        weights={champion: 1.0 - stage.traffic, candidate: stage.traffic},
    )


@dataclass
class RolloutControl:
    """A project's rollouts over its experiment store and model registry."""

    store: ExperimentStore
    registry: Any

    @property
    def client(self) -> Any:
        return self.store.client

    def key(self, experiment: str) -> str:
        return self.store.keys.rollout(experiment)

    @property
    def active_key(self) -> str:
        return self.store.keys.rollout_active

    # ---- persistence

    def load(self, experiment: str | None = None) -> tuple[str, RolloutState, int] | None:
        """(experiment, state, revision) of `experiment`'s rollout (default: the active one, else
        the newest one); None if there is none."""
        name = experiment or _text(self.client.get(self.active_key)) or self._newest()
        if name is None:
            return None
        raw = self.client.get(self.key(name))
        if raw is None:
            return None
        data = json.loads(raw)
        return name, RolloutState.from_dict(data["state"]), int(data["revision"])

    def _newest(self) -> str | None:
        names = [_text(k).rsplit(":", 1)[-1] for k in self.client.scan_iter(match=self.key(ROLLOUT_PREFIX + "*"))]
        return max(names, key=lambda n: int(n.rsplit("-", 1)[-1]), default=None)

    def _save(self, name: str, state: RolloutState, revision: int, *, active: bool) -> int:
        """Compare-and-set: refused (RuntimeError) if someone saved since `revision` was read."""
        import redis

        key = self.key(name)
        with self.client.pipeline(transaction=True) as pipe:
            try:
                pipe.watch(key)
                raw = pipe.get(key)
                current = int(json.loads(raw)["revision"]) if raw is not None else 0
                if current != revision:
                    raise RuntimeError(f"rollout {name!r} changed meanwhile (revision {current}, expected {revision})")
                pipe.multi()
                pipe.set(key, json.dumps({"state": state.to_dict(), "revision": revision + 1}))
                if active:
                    pipe.set(self.active_key, name)
                else:
                    pipe.delete(self.active_key)
                pipe.execute()
            except redis.WatchError:
                raise RuntimeError(f"rollout {name!r} changed meanwhile; try again") from None
        return revision + 1

    # ---- the lifecycle

    def start(self, candidate: int, plan: RolloutPlan, *, who: str, now: float | None = None) -> tuple[str, RolloutState]:
        """Start rolling `candidate` out against the current champion: its first stage routes now."""
        now = time.time() if now is None else now
        champion = self.registry.champion()
        if champion is None:
            raise ValueError("a rollout needs a champion to compare with; promote a version first")
        running = self.load()
        if running is not None and not running[1].done:
            raise ValueError(
                f"rollout {running[0]!r} of v{running[1].candidate_version} is running; abort it first"
            )
        name = f"{ROLLOUT_PREFIX}{int(candidate)}-{int(now * 1000)}"
        state = start_rollout(int(candidate), int(champion.version), plan, who=who, now=now)
        config = stage_config(name, state)
        check_versions(self.registry, config)
        self.store.start(config, who=who, now=now)
        self._save(name, state, 0, active=True)
        return name, state

    def advance(
        self, evidence: Evidence, *, who: str, revision: int | None = None, now: float | None = None
    ) -> Transition | None:
        """Judge the running rollout's stage on `evidence` and act: hold (None), next stage (the
        experiment's routing follows), roll back (the experiment stops) or complete (promote).
        `revision`: the one the evidence was gathered at; if the rollout moved since, hold."""
        now = time.time() if now is None else now
        loaded = self.load()
        if loaded is None:
            return None
        name, state, current = loaded
        transition = None
        if not state.done and (revision is None or revision == current):
            transition = apply(state, evaluate(state, evidence, now), who=who, now=now, evidence=evidence)
            if transition is not None:
                self._save(name, state, current, active=not state.done)
        self.sync(name, state, who=who)
        return transition

    def sync(self, name: str, state: RolloutState, *, who: str) -> None:
        """Make the experiment and the registry agree with the saved state (the side effects
        of a transition, repeated until they took: a crash between saving and acting heals at
        the next tick)."""
        status = self.store.status(name)
        why = state.history[-1].why if state.history else ""
        if state.status == COMPLETED:
            champion = self.registry.champion()
            if champion is None or int(champion.version) != state.candidate_version:
                self.registry.promote(state.candidate_version, who=who,
                                      why=f"staged rollout {name} completed: {why}")  # fmt: skip
        if state.done:
            if status == RUNNING:
                self.store.stop(name, who=who, why=why)
            return
        if status != RUNNING:  # someone stopped the experiment under the rollout
            loaded = self.load(name)
            if loaded is not None:
                abort(state, who=who, why=f"its experiment {name!r} was stopped ({status})", now=time.time())
                self._save(name, state, loaded[2], active=False)
            return
        wanted = stage_config(name, state)
        if self.store.config(name) != wanted:
            self.store.update(wanted, who=who, why=why)

    def abort(self, *, who: str, why: str, now: float | None = None) -> Transition:
        now = time.time() if now is None else now
        loaded = self.load()
        if loaded is None or loaded[1].done:
            raise ValueError("no rollout is running")
        name, state, revision = loaded
        transition = abort(state, who=who, why=why, now=now)
        self._save(name, state, revision, active=False)
        self.sync(name, state, who=who)
        return transition

    def status(self, experiment: str | None = None, now: float | None = None) -> dict[str, Any] | None:
        loaded = self.load(experiment)
        if loaded is None:
            return None
        name, state, revision = loaded
        return {"experiment": name, "revision": revision, **describe(state, time.time() if now is None else now)}


def _text(value: Any) -> str | None:
    if value is None:
        return None
    return value.decode() if isinstance(value, bytes) else str(value)
