"""Arrived labels -> rewards for an experiment's decisions (the fraud use case's late feedback).

A decision's outcome is tp (flagged fraud, was fraud), fp (flagged, was legit), tn or fn; its
reward is the experiment's `label_rewards[outcome]` (default 1 for a correct decision, 0 for a
wrong one). Each decision is rewarded once, by the first label of its transaction: a label day
rewards the decisions whose transaction got its first label that day (a later relabel, e.g. a
chargeback after a provisional legit label, does not reward the decision again).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import pandas as pd

from ml_platform.experiments.config import ExperimentConfig
from ml_platform.membership import is_in


@dataclass(frozen=True)
class LabelRewards:
    rewards: list[tuple[str, float]]  # (arm, reward) per rewarded decision, in prediction order
    outcomes: dict[str, dict[str, int]] = field(default_factory=dict)  # arm -> {tp, fp, tn, fn}
    unmatched_labels: int = 0  # labels of the day whose transaction no decision of the experiment scored

    def summary(self) -> dict[str, dict[str, float]]:
        out: dict[str, dict[str, float]] = {}
        for arm, reward in self.rewards:
            entry = out.setdefault(arm, {"rewards": 0, "reward_sum": 0.0})
            entry["rewards"] += 1
            entry["reward_sum"] += reward
        return out


def label_rewards(
    decisions: pd.DataFrame, labels_today: pd.DataFrame, earlier_label_ids: set[str] | pd.Index, config: ExperimentConfig
) -> LabelRewards:
    """`decisions`: the experiment's live log rows (transaction_id, arm, decision, probability,
    predicted_at); `labels_today`: the labels that arrived on the day (transaction_id, is_fraud);
    `earlier_label_ids`: transactions labelled before that day (their decisions were rewarded then)."""
    first_today = labels_today[~is_in(labels_today["transaction_id"], earlier_label_ids)]
    scored = decisions[decisions["arm"].notna() & decisions["probability"].notna() & decisions["decision"].notna()]
    scored = scored.sort_values("predicted_at").drop_duplicates("transaction_id", keep="first")
    joined = scored.merge(first_today[["transaction_id", "is_fraud"]], on="transaction_id", how="inner")
    flagged = joined["decision"] == "fraud"
    fraud = joined["is_fraud"].astype(bool)
    outcome = pd.Series("tn", index=joined.index)
    outcome[flagged & fraud] = "tp"
    outcome[flagged & ~fraud] = "fp"
    outcome[~flagged & fraud] = "fn"
    rewards = [(str(a), float(config.label_rewards[o])) for a, o in zip(joined["arm"], outcome)]
    counts = {
        str(arm): {o: int((group == o).sum()) for o in ("tp", "fp", "tn", "fn")}
        for arm, group in outcome.groupby(joined["arm"])
    }
    return LabelRewards(rewards, counts, int(len(first_today) - len(joined)))
