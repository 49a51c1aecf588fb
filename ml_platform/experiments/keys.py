"""Where a project's experiments live in Redis: the key names, on one node and on Redis Cluster.

One node (`<p>` the project, `<name>` the experiment):

    <p>:experiment:<name>[:posterior|:counts|:sticky|:label-days]   config and evidence
    <p>:experiments:active                                          the experiment routing traffic
    <p>:xd:<prediction_id>                                          one decision (e, a, p, r)
    <p>:rollout:<experiment>, <p>:rollout:active                    rollout state, the running one

Redis Cluster: every key but the decisions carries the project's experiments tag `{<p>:x}`, so
they share one slot and every script and MULTI/EXEC over them runs on one master as on one node
(starting an experiment: its hash + the active pointer; a reward: the posterior, counts and the
reward's marker; a label day; the rollout's compare-and-set: its state + the active pointer):

    <p>:{<p>:x}:experiment:<name>[:part]
    <p>:{<p>:x}:experiments:active
    <p>:{<p>:x}:rollout:<experiment>, <p>:{<p>:x}:rollout:active
    <p>:{<p>:x}:rewarded:<name>:<prediction_id>    the reward given for a decision (SET NX)
    <p>:xd:<prediction_id>                         the decision (e, a, p), as on one node

One slot per project rather than per experiment: at most one experiment routes a project's traffic
at a time, so per-experiment slots would spread no load while splitting the start (experiment +
active pointer) and the rollout's compare-and-set over two slots. Decisions stay spread by
prediction id (one per prediction, the bulk of the memory); a reward reads its decision there,
then applies itself in the experiments' slot (store.py; what is atomic: docs/experiments.md).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ExperimentKeys:
    """The key names of one project's experiments (`cluster`: the hash-tagged layout)."""

    project: str
    cluster: bool = False

    def __post_init__(self) -> None:
        if self.cluster and any(c in self.project for c in "{}"):
            raise ValueError(
                f"project {self.project!r} must not contain '{{' or '}}' on Redis Cluster (hash tags)"
            )

    @property
    def namespace(self) -> str:
        """Every key but the decisions starts with this (on a cluster it ends with the hash tag)."""
        return f"{self.project}:{{{self.project}:x}}:" if self.cluster else f"{self.project}:"

    @property
    def experiment_prefix(self) -> str:
        return f"{self.namespace}experiment:"

    def experiment(self, name: str, part: str | None = None) -> str:
        return self.experiment_prefix + name + (f":{part}" if part else "")

    @property
    def active(self) -> str:
        return f"{self.namespace}experiments:active"

    def decision(self, prediction_id: str) -> str:
        return f"{self.project}:xd:{prediction_id}"

    def rewarded(self, name: str, prediction_id: str) -> str:
        """Cluster only: the marker of a rewarded decision, in the experiments' slot."""
        return f"{self.namespace}rewarded:{name}:{prediction_id}"

    def rollout(self, experiment: str) -> str:
        return f"{self.namespace}rollout:{experiment}"

    @property
    def rollout_active(self) -> str:
        return f"{self.namespace}rollout:active"
