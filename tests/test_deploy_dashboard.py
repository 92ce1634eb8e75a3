"""deploy/grafana/mailpool-dashboard.json against the metrics the workers export.

Every metric a panel queries must be one :mod:`workers.metrics` registers (with the sample
suffix its type produces), every label a query groups by must be one of its labels, and
the metrics the operator guide promises all have a panel.  Renaming a metric in the code
without the dashboard (or the other way round) fails here instead of in Grafana.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.metrics import MetricWrapperBase

from workers import metrics

DASHBOARD = (
    Path(__file__).resolve().parent.parent / "deploy" / "grafana" / "mailpool-dashboard.json"
)

# The metrics README promises (exposition names).
PROMISED = {
    "mailpool_ingest_messages_total",
    "mailpool_ingest_rejected_total",
    "mailpool_ingest_connections",
    "mailpool_ingest_transaction_seconds_bucket",
    "mailpool_delivery_messages_total",
    "mailpool_delivery_smtp_seconds_bucket",
    "mailpool_delivery_in_flight",
    "mailpool_stream_length",
    "mailpool_stream_lag",
    "mailpool_stream_pending",
    "mailpool_stream_oldest_pending_seconds",
    "mailpool_dead_letters",
    "mailpool_retries_waiting",
}
SUFFIXES = {"counter": ("_total",), "gauge": ("",), "histogram": ("_bucket", "_sum", "_count")}
# Labels PromQL or Prometheus add to every series (target labels, histogram buckets).
IMPLICIT_LABELS = {"le", "instance", "job", "pod", "namespace"}


def exported() -> dict[str, set[str]]:
    """Exposition sample name -> label names, for every metric in workers.metrics."""
    found: dict[str, set[str]] = {}
    for value in vars(metrics).values():
        if not isinstance(value, MetricWrapperBase):
            continue
        name = value._name  # the family name without the _total suffix
        for suffix in SUFFIXES[value._type]:
            found[name + suffix] = set(value._labelnames)
    return found


def panels(dashboard: dict[str, Any]) -> list[dict[str, Any]]:
    flat = []
    for panel in dashboard["panels"]:
        flat.append(panel)
        flat.extend(panel.get("panels", []))
    return flat


def queries(dashboard: dict[str, Any]) -> list[str]:
    return [t["expr"] for p in panels(dashboard) for t in p.get("targets", [])]


@pytest.fixture(scope="module")
def dashboard() -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return loaded


def test_every_promised_metric_has_a_panel(dashboard: dict[str, Any]) -> None:
    used = {name for expr in queries(dashboard) for name in re.findall(r"mailpool_\w+", expr)}
    assert used >= PROMISED, f"no panel for {sorted(PROMISED - used)}"


def test_queries_use_only_exported_metrics_and_labels(dashboard: dict[str, Any]) -> None:
    available = exported()
    assert available.keys() >= PROMISED, f"not exported: {sorted(PROMISED - available.keys())}"
    for expr in queries(dashboard):
        names = re.findall(r"mailpool_\w+", expr)
        assert names, f"a query without a mailpool metric: {expr}"
        labels: set[str] = set()
        for name in names:
            assert name in available, f"{name} is not exported by workers.metrics"
            labels |= available[name]
        for grouping in re.findall(r"\bby \(([^)]*)\)", expr):
            for label in (part.strip() for part in grouping.split(",")):
                assert label in labels | IMPLICIT_LABELS, f"{expr}: no label {label!r}"
        assert expr.count("(") == expr.count(")"), f"unbalanced parentheses: {expr}"


def test_legends_name_real_labels(dashboard: dict[str, Any]) -> None:
    available = exported()
    for panel in panels(dashboard):
        for target in panel.get("targets", []):
            labels = set().union(
                *(available[n] for n in re.findall(r"mailpool_\w+", target["expr"]))
            )
            for label in re.findall(r"\{\{(\w+)\}\}", target.get("legendFormat", "")):
                assert label in labels | IMPLICIT_LABELS, f"{panel['title']}: {label}"


def test_panels_are_importable(dashboard: dict[str, Any]) -> None:
    all_panels = panels(dashboard)
    ids = [p["id"] for p in all_panels]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    variables = {v["name"] for v in dashboard["templating"]["list"]}
    assert "datasource" in variables
    for panel in all_panels:
        assert {"h", "w", "x", "y"} <= panel["gridPos"].keys()
        assert panel["gridPos"]["x"] + panel["gridPos"]["w"] <= 24
        if panel["type"] != "row":
            assert panel["datasource"]["uid"] == "${datasource}"
            assert panel["targets"], f"{panel['title']} queries nothing"
