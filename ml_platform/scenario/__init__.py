"""The 60-day scenarios that prove the closed loop (`ml-platform demo --scenario drift|quiet`): what
a scenario is (`plan`) and what it showed (`report`). The Dagster driver that runs one day by day
on a simulated clock is `ml_platform.defs.simulation`."""

from ml_platform.scenario.plan import SCENARIOS, ScenarioPlan
from ml_platform.scenario.report import DayRecord, ScenarioReport

__all__ = ["SCENARIOS", "DayRecord", "ScenarioPlan", "ScenarioReport"]
