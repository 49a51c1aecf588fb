"""Experiments: several registered model versions serving side by side, learning which is best
from live evidence, and a new version moved to full traffic in guarded stages.

  config.py         ExperimentConfig: arms (registered versions), routing, shadow, rewards; validated
  thompson.py       Beta-Bernoulli Thompson sampling, pure numpy (choose arms, selection probabilities)
  store.py          the experiment state in Redis, shared by every serving process and the stream
                    worker: configs, posteriors updated atomically by Lua, decisions, feedback
  router.py         what a serving process calls per batch: arms for rows (cached posteriors)
  shadow_report.py  live vs shadow on the same rows: agreement, flips, latencies, errors, metrics
  rollout.py        the staged rollout state machine (shadow -> 5 % -> 50 % -> 100 %), pure
  rewards.py        arrived labels -> rewards for the experiment's decisions
  evidence.py       a rollout stage's evidence from the prediction log, the rewards and the monitors
  manage.py         the lifecycle the CLI and the sensor drive: experiments and rollouts, alias moves

Plain Python (no Dagster): `ml_platform.defs.experiments` is the Dagster layer.
"""
