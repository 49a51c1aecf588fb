"""`ml-platform experiment start|status|stop` and `ml-platform rollout start|status|abort|advance`
(registered on the main group by `cli.py`). Thin: parsing and printing; the lifecycle is
`ml_platform.experiments.manage`.
"""

from __future__ import annotations

import getpass
import json
import time
from typing import Any

import click

from ml_platform.settings import load_settings


def _who(who: str | None) -> str:
    if who:
        return who
    try:
        return f"cli:{getpass.getuser()}"
    except Exception:  # noqa: BLE001 - no user name in some containers
        return "cli"


def _open(settings=None):
    """(settings, ExperimentStore, ModelRegistry) of the platform the environment points at."""
    from ml_platform.experiments.store import ExperimentStore
    from ml_platform.featurestore.redis_server import client_from_url, resolve_redis_url
    from ml_platform.registry import ModelRegistry

    settings = settings or load_settings()
    store = ExperimentStore(client_from_url(resolve_redis_url(settings)), settings.project)
    return settings, store, ModelRegistry(settings.mlflow_tracking_uri, settings.model_name)


def _pairs(values: tuple[str, ...], option: str, kind: type) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for value in values:
        name, sep, raw = value.partition("=")
        if not sep or not name:
            raise click.BadParameter(f"{value!r}: expected NAME=VALUE", param_hint=option)
        try:
            out[name] = kind(raw)
        except ValueError:
            raise click.BadParameter(f"{value!r}: {raw!r} is not a {kind.__name__}", param_hint=option) from None
    return out


@click.group(short_help="Route traffic between model versions and learn from rewards.")
def experiment() -> None:
    """Experiments: several registered versions serve side by side (Thompson sampling or fixed
    shares), optionally with a shadow version; rewards come by POST /feedback or from labels."""


@experiment.command("start", short_help="Start routing the API's traffic by an experiment.")
@click.argument("name")
@click.option("--version", "versions", type=int, multiple=True, help="An arm serving this version (named vN).")
@click.option("--arm", "arms", multiple=True, help="An arm as NAME=VERSION (e.g. --arm control=3).")
@click.option("--routing", type=click.Choice(["thompson", "fixed"]), default="thompson", show_default=True)
@click.option("--weight", "weights", multiple=True, help="fixed routing: ARM=SHARE for every arm (sum 1).")
@click.option("--exploration-floor", default=0.0, show_default=True, help="Minimum traffic share per arm.")
@click.option("--discount", default=1.0, show_default=True, help="< 1 forgets old rewards (non-stationary).")
@click.option("--sticky", is_flag=True, help="A card holder keeps their first arm.")
@click.option("--shadow", "shadow_version", type=int, default=None, help="A version scoring in shadow.")
@click.option("--shadow-share", default=None, type=float, help="Share of requests it scores (default 1).")
@click.option("--reward-source", type=click.Choice(["feedback", "labels"]), default="feedback", show_default=True)
@click.option("--feedback-ttl", "feedback_ttl_s", default=None, type=int, help="Seconds a decision takes feedback.")
@click.option("--who", default=None)
def start(name, versions, arms, routing, weights, exploration_floor, discount, sticky, shadow_version,
          shadow_share, reward_source, feedback_ttl_s, who) -> None:  # fmt: skip
    """Start experiment NAME (refused if a version is not registered or another experiment runs)."""
    from ml_platform.experiments.config import ExperimentConfig, arm_name
    from ml_platform.experiments.manage import start_experiment

    all_arms = {arm_name(v): v for v in versions} | _pairs(arms, "--arm", int)
    values: dict[str, Any] = {
        "name": name, "arms": all_arms, "routing": routing, "exploration_floor": exploration_floor,
        "discount": discount, "sticky": sticky, "reward_source": reward_source,
    }  # fmt: skip
    if weights:
        values["weights"] = _pairs(weights, "--weight", float)
    if shadow_version is not None:
        values["shadow_version"] = shadow_version
        values["shadow_share"] = 1.0 if shadow_share is None else shadow_share
    elif shadow_share is not None:
        values["shadow_share"] = shadow_share
    if feedback_ttl_s is not None:
        values["feedback_ttl_s"] = feedback_ttl_s
    try:
        config = ExperimentConfig(**values)
        _, store, registry = _open()
        start_experiment(store, registry, config, who=_who(who))
    except (ValueError, KeyError) as exc:
        raise click.ClickException(str(exc)) from exc
    arms_text = ", ".join(f"{a}=v{v}" for a, v in config.arms.items())
    shadow = f"; shadow v{config.shadow_version} on {config.shadow_share:.0%}" if config.shadow_version else ""
    click.echo(f"experiment {name!r} started: {config.routing} over {arms_text}{shadow}")
    click.echo("Running servers route by it within a second; GET /experiments/" + name + " shows its arms.")


@experiment.command("status", short_help="An experiment's arms: mean reward, std, samples, traffic.")
@click.argument("name", required=False)
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def status(name, as_json) -> None:
    """Experiment NAME's state (default: the active one)."""
    from ml_platform.experiments.manage import experiment_status

    _, store, _ = _open()
    name = name or store.active()
    if name is None:
        names = store.names()
        raise click.ClickException("no experiment is running" + (f" (experiments: {', '.join(names)})" if names else ""))
    try:
        info = experiment_status(store, name)
    except KeyError as exc:
        raise click.ClickException(str(exc.args[0])) from exc
    if as_json:
        click.echo(json.dumps(info, indent=2))
        return
    active = " (routing the API's traffic)" if info["active"] else ""
    click.echo(f"experiment {name}: {info['status']}{active}, {info['config']['routing']}, "
               f"started {info['started_at']} by {info['started_by']}")  # fmt: skip
    click.echo(f"  {'arm':<14}{'version':>8}{'mean':>9}{'std':>9}{'samples':>9}{'served':>9}{'traffic':>9}{'next':>8}")
    for arm, s in info["arms"].items():
        click.echo(f"  {arm:<14}{s['version']:>8}{s['mean']:>9.4f}{s['std']:>9.4f}{s['samples']:>9}"
                   f"{s['served']:>9}{s['traffic_share']:>9.1%}{s['selection_probability']:>8.1%}")  # fmt: skip
    fb = info["feedback"]
    click.echo(f"  feedback: {fb['accepted']} accepted, {fb['duplicate']} duplicate, {fb['unknown']} unknown, "
               f"{fb['invalid']} invalid")  # fmt: skip


@experiment.command("stop", short_help="Stop an experiment: the champion alone serves again.")
@click.argument("name")
@click.option("--reason", "-r", default="", help="Why (recorded).")
@click.option("--who", default=None)
def stop(name, reason, who) -> None:
    _, store, _ = _open()
    try:
        store.stop(name, who=_who(who), why=reason)
    except KeyError as exc:
        raise click.ClickException(str(exc.args[0])) from exc
    click.echo(f"experiment {name!r} stopped; running servers serve the champion alone within a second")


# --------------------------------------------------------------------------- rollouts


@click.group(short_help="Move a candidate to full traffic in guarded stages.")
def rollout() -> None:
    """Staged rollout: shadow -> 5 % -> 50 % -> 100 %, each stage with a minimum duration and sample
    size and guardrails; a breach rolls back by itself; the end makes the candidate champion. The
    `rollout_sensor` (Dagster) advances it; `advance` does one step by hand."""


@rollout.command("start", short_help="Start rolling a candidate version out.")
@click.option("--candidate", type=int, required=True, help="The registered version to roll out.")
@click.option("--stages", default="shadow,5,50,100", show_default=True, help="Stages (percent; shadow = 0).")
@click.option("--min-duration", "min_duration_s", type=float, default=None, help="Seconds per stage (all but the last).")
@click.option("--min-samples", type=int, default=None, help="Candidate predictions per stage (all but the last).")
@click.option("--who", default=None)
def rollout_start(candidate, stages, min_duration_s, min_samples, who) -> None:
    from ml_platform.experiments.manage import RolloutControl
    from ml_platform.experiments.rollout import RolloutPlan

    overrides = {k: v for k, v in (("min_duration_s", min_duration_s), ("min_samples", min_samples)) if v is not None}
    try:
        plan = RolloutPlan.from_spec(stages, **overrides)
        _, store, registry = _open()
        name, state = RolloutControl(store, registry).start(candidate, plan, who=_who(who))
    except (ValueError, LookupError) as exc:
        raise click.ClickException(str(exc)) from exc
    click.echo(f"rollout {name}: v{candidate} against champion v{state.champion_version}, "
               f"stages {' -> '.join(s.name for s in plan.stages)}; now in {state.stage.name}")  # fmt: skip


@rollout.command("status", short_help="The rollout's stage, guardrails and every transition.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def rollout_status(as_json) -> None:
    from ml_platform.experiments.manage import RolloutControl

    _, store, registry = _open()
    info = RolloutControl(store, registry).status()
    if info is None:
        raise click.ClickException("no rollout has been started in this project")
    if as_json:
        click.echo(json.dumps(info, indent=2, default=str))
        return
    click.echo(_describe(info))


def _describe(info: dict) -> str:
    head = (f"rollout {info['experiment']}: v{info.get('candidate_version')} vs champion "
            f"v{info.get('champion_version')}: {info.get('status')}, stage {info.get('stage')}")  # fmt: skip
    lines = [head]
    if info.get("reason"):
        lines.append(f"  reason: {info['reason']}")
    for t in info.get("history", []):
        lines.append(f"  {t.get('at_iso', t.get('at'))}  {t.get('from_stage') or '-'} -> {t.get('to_stage')}"
                     f"  by {t.get('who')}: {t.get('why')}")  # fmt: skip
    return "\n".join(lines)


@rollout.command("abort", short_help="Stop the rollout: the champion alone serves again.")
@click.option("--reason", "-r", required=True, help="Why (recorded in the rollout's history).")
@click.option("--who", default=None)
def rollout_abort(reason, who) -> None:
    from ml_platform.experiments.manage import RolloutControl

    _, store, registry = _open()
    try:
        transition = RolloutControl(store, registry).abort(who=_who(who), why=reason)
    except (ValueError, RuntimeError) as exc:
        raise click.ClickException(str(exc)) from exc
    click.echo(f"rollout aborted at {transition.from_stage}: {reason}")


@rollout.command("advance", short_help="One controller step now (what rollout_sensor does each tick).")
@click.option("--who", default=None)
def rollout_advance(who) -> None:
    from ml_platform.experiments.evidence import gather_evidence
    from ml_platform.experiments.manage import RolloutControl

    settings, store, registry = _open()
    control = RolloutControl(store, registry)
    loaded = control.load()
    if loaded is None or loaded[1].done:
        raise click.ClickException("no rollout is running")
    name, state, revision = loaded
    evidence = gather_evidence(store, settings, name, state)
    transition = control.advance(evidence, who=_who(who), revision=revision)
    if transition is not None:
        click.echo(f"{name}: {transition.from_stage} -> {transition.to_stage}: {transition.why}")
    else:
        from ml_platform.experiments.rollout import evaluate

        click.echo(f"{name}: holding at {state.stage.name}: {evaluate(state, evidence, time.time()).reason}")
