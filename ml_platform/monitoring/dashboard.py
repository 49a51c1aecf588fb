"""The monitoring dashboard of one day: every monitor's rows in one table (metric, alert threshold,
current value, status), the overall status, and the table as text for the terminal."""

from __future__ import annotations

from dataclasses import dataclass

from ml_platform.monitoring.results import MonitorResult
from ml_platform.monitoring.status import worst

MONITORS = ("data_drift", "prediction_drift", "model_performance", "serving_health")
COLUMNS = ("monitor", "metric", "threshold", "value", "status", "detail")


@dataclass
class Dashboard:
    day: str
    results: dict[str, MonitorResult]  # by monitor; a monitor that did not run is absent

    @property
    def status(self) -> str:
        return worst(r.status for r in self.results.values())

    @property
    def missing(self) -> list[str]:
        return [m for m in MONITORS if m not in self.results]

    def rows(self) -> list[dict[str, str]]:
        out = []
        for monitor in MONITORS:
            result = self.results.get(monitor)
            if result is None:
                continue
            for row in result.rows:
                out.append({"monitor": monitor, "metric": row.metric, "threshold": row.threshold,
                            "value": row.value, "status": row.status, "detail": row.detail})
        return out

    def to_text(self, *, details: bool = False) -> str:
        """The table as fixed-width text: `Metric | Alert threshold | Value | Status`."""
        header = ["Metric", "Alert threshold", "Value", "Status"] + (["Detail"] if details else [])
        body = [[r["metric"], r["threshold"], r["value"], r["status"].upper()] + ([r["detail"]] if details else [])
                for r in self.rows()]
        widths = [max(len(h), *(len(b[i]) for b in body)) if body else len(h) for i, h in enumerate(header)]

        def line(cells: list[str]) -> str:
            return " | ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True)).rstrip()

        out = [f"Monitoring {self.day}: {self.status.upper()}", line(header), "-+-".join("-" * w for w in widths)]
        out += [line(b) for b in body]
        if self.missing:
            out.append(f"(not run: {', '.join(self.missing)})")
        return "\n".join(out)
