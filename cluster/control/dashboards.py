"""The PromQL in the Grafana dashboards and Prometheus alert rules under ``dashboards/``, and the metrics it names.

Tests check every expression against the names the router and workers export (``unknown_metrics``), so a renamed
metric breaks a test rather than a dashboard panel.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, NamedTuple

import yaml

# String literals (double, single or back quoted) and comments: never metric names, so blanked before matching.
_NOT_CODE = re.compile(r'"(?:\\.|[^"\\])*"|\'(?:\\.|[^\'\\])*\'|`[^`]*`|#[^\n]*')
# A radixserve metric or `up`, as a whole identifier (not part of a longer name, label or function).
_METRIC = re.compile(r"(?<![A-Za-z0-9_:])(radixserve_[a-z0-9_]+|up)(?![A-Za-z0-9_:])")


class PanelQuery(NamedTuple):
    """One target of a dashboard panel: the panel's title, the PromQL and its Grafana legend format."""

    title: str
    expr: str
    legend: str


def dashboard_queries(path: str | Path) -> list[PanelQuery]:
    """Every target with an ``expr`` of every panel of the Grafana dashboard JSON at ``path``, panels nested in
    rows included, in file order."""
    dashboard = json.loads(Path(path).read_text())
    return [PanelQuery(panel.get("title", ""), target["expr"], target.get("legendFormat", ""))
            for panel in _panels(dashboard.get("panels", []))
            for target in panel.get("targets", []) if "expr" in target]


def dashboard_exprs(path: str | Path) -> list[tuple[str, str]]:
    """``(panel title, expr)`` for each of ``dashboard_queries(path)``."""
    return [(query.title, query.expr) for query in dashboard_queries(path)]


def legend(query: PanelQuery, labels: dict[str, str]) -> str:
    """The series name Grafana shows: the legend format with ``{{label}}`` filled from ``labels``."""
    return re.sub(r"\{\{\s*(\w+)\s*\}\}", lambda m: labels.get(m.group(1), ""), query.legend) or query.expr


def _panels(panels: Iterable[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    for panel in panels:
        yield panel
        yield from _panels(panel.get("panels", []))


def rule_exprs(path: str | Path) -> list[tuple[str, str]]:
    """``(alert or record name, expr)`` for every rule of every group of the Prometheus rule file at ``path``."""
    groups = yaml.safe_load(Path(path).read_text()).get("groups", [])
    return [(rule.get("alert") or rule["record"], rule["expr"]) for group in groups for rule in group["rules"]]


def metric_names(expr: str) -> set[str]:
    """The metric names ``expr`` references: identifiers ``radixserve_[a-z0-9_]+`` and the bare name ``up``.

    Names stay as written (``..._bucket``, ``..._total``). Text in quotes and comments is ignored, so label values
    and ``__name__`` matchers are not counted; label names, functions and keywords never match.
    """
    return set(_METRIC.findall(_NOT_CODE.sub(" ", expr)))


def unknown_metrics(exprs: Iterable[tuple[str, str]], exported: set[str]) -> list[tuple[str, str]]:
    """``(source, name)`` for every metric name an expression references that is not in ``exported``, where
    ``exprs`` is ``(source, expr)`` pairs as ``dashboard_exprs`` and ``rule_exprs`` return them."""
    return [(source, name) for source, expr in exprs for name in sorted(metric_names(expr) - exported)]
