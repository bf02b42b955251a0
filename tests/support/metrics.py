"""Reading the service's Prometheus metrics in assertions."""

from __future__ import annotations

from hl_monitor.metrics import Metrics


def metric_value(metrics: Metrics, name: str, **labels: str) -> float:
    """The current value of `hl_monitor_<name>{labels}`; 0 for a series that was never touched."""
    value = metrics.registry.get_sample_value(f"hl_monitor_{name}", labels)
    return 0.0 if value is None else value
