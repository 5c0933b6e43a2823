"""The Grafana dashboard (charts/nanorun/files/dashboards/nanorun.json): a run selector, the panels a
person training and serving a model looks for, and PromQL that only names metrics something
exports: the trainer, operator and serving /metrics as scraped for real (tests/fixtures/metrics.py)
or the DCGM exporter's GPU metrics."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from typing import Any

import promql_parser
import pytest
from nanorun.operator import metrics as operator_metrics
from nanorun.trainer.training.metrics import TrainMetrics
from prometheus_client.parser import text_string_to_metric_families

from tests.charts.conftest import CHART

DASHBOARD = CHART / "files" / "dashboards" / "nanorun.json"
# NVIDIA's dcgm-exporter (deployed by the GPU operator), the named external exporter we rely on.
DCGM_METRICS = {"DCGM_FI_DEV_GPU_UTIL", "DCGM_FI_DEV_FB_USED"}
# What a panel must show, by the metric its query reads.
REQUIRED = {
    "training loss": "llm_train_loss",
    "validation bpb": "llm_train_val_bpb",
    "training tokens/s": "llm_train_tokens_total",
    "MFU": "llm_train_mfu_ratio",
    "learning rate": "llm_train_learning_rate",
    "stage timeline": "llmrun_stage_info",
    "GPU utilisation": "DCGM_FI_DEV_GPU_UTIL",
    "GPU memory": "DCGM_FI_DEV_FB_USED",
    "serving requests": "nanorun_serve_requests_total",
    "time to first token": "nanorun_serve_time_to_first_token_seconds_bucket",
    "serving tokens/s": "nanorun_serve_generated_tokens_total",
    "refused requests": "nanorun_serve_refused_requests_total",
}
# Grafana's variables, as Prometheus would receive them with "All" selected.
GRAFANA_VARIABLES = {"$__rate_interval": "5m", "$__interval": "1m", "$run": ".*", "${sweep}": ".*"}


@pytest.fixture(scope="module")
def dashboard() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text())


def panels(dashboard: dict[str, Any]) -> list[dict[str, Any]]:
    return [p for p in dashboard["panels"] if p["type"] != "row"]


def queries(dashboard: dict[str, Any]) -> Iterator[tuple[str, str]]:
    for panel in panels(dashboard):
        for target in panel["targets"]:
            yield panel["title"], target["expr"]


def parse(expr: str) -> promql_parser.Expr:
    for name, value in GRAFANA_VARIABLES.items():
        expr = expr.replace(name, value)
    assert "$" not in expr, f"unknown Grafana variable in {expr!r}"
    return promql_parser.parse(expr)


def metric_names(node: Any) -> Iterator[str]:
    """Every metric name a PromQL expression selects (by name or by a __name__ matcher)."""
    if isinstance(node, promql_parser.VectorSelector):
        if node.name:
            yield node.name
        for matcher in node.matchers.matchers:
            if matcher.name == "__name__":
                assert re.fullmatch(r"[A-Za-z_:][\w:]*(\|[A-Za-z_:][\w:]*)*", matcher.value), matcher.value
                yield from matcher.value.split("|")
    elif isinstance(node, promql_parser.MatrixSelector):
        yield from metric_names(node.vector_selector)
    elif isinstance(node, promql_parser.BinaryExpr):
        yield from metric_names(node.lhs)
        yield from metric_names(node.rhs)
    elif isinstance(node, promql_parser.Call):
        for arg in node.args:
            yield from metric_names(arg)
    elif isinstance(node, promql_parser.AggregateExpr):
        yield from metric_names(node.expr)
        if node.param is not None:
            yield from metric_names(node.param)
    elif isinstance(node, (promql_parser.ParenExpr, promql_parser.UnaryExpr, promql_parser.SubqueryExpr)):
        yield from metric_names(node.expr)


def queried_metrics(dashboard: dict[str, Any]) -> set[str]:
    names = {name for _, expr in queries(dashboard) for name in metric_names(parse(expr))}
    for variable in dashboard["templating"]["list"]:
        if variable["type"] == "query":
            selector = re.fullmatch(r"label_values\((.*),\s*\w+\)", variable["query"]["query"]).group(1)
            names |= set(metric_names(parse(selector)))
    return names


def exported_series(scraped: dict[str, str]) -> set[str]:
    return {
        sample.name
        for text in scraped.values()
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def test_metric_name_extraction_sees_every_selector() -> None:
    # The cross-check below is only as good as this walk over the PromQL syntax tree.
    expr = (
        'histogram_quantile(0.9, sum by (le) (rate(a_bucket{run=~"$run"}[$__rate_interval])))'
        ' / on() group_left max(b) + (-c) + count_over_time(d[5m:1m]) + {__name__=~"e|f"}'
    )
    assert sorted(metric_names(parse(expr))) == ["a_bucket", "b", "c", "d", "e", "f"]


def test_every_query_is_valid_promql(dashboard: dict[str, Any]) -> None:
    for title, expr in queries(dashboard):
        try:
            parse(expr)
        except Exception as err:  # promql_parser raises plain exceptions with the parser's message
            pytest.fail(f"panel {title!r}: {expr!r} is not valid PromQL: {err}")


def test_every_queried_metric_is_exported_by_nanorun_or_dcgm(
    dashboard: dict[str, Any], scraped_metrics: dict[str, str]
) -> None:
    unknown = queried_metrics(dashboard) - exported_series(scraped_metrics) - DCGM_METRICS
    assert not unknown, f"the dashboard queries metrics nothing exports: {sorted(unknown)}"


def test_dashboard_has_a_panel_for_each_thing_to_watch(dashboard: dict[str, Any]) -> None:
    by_metric: dict[str, list[str]] = {}
    for title, expr in queries(dashboard):
        for name in metric_names(parse(expr)):
            by_metric.setdefault(name, []).append(title)
    missing = [what for what, metric in REQUIRED.items() if metric not in by_metric]
    assert not missing, f"no panel shows {missing}"
    timeline = [p for p in panels(dashboard) if p["type"] == "state-timeline"]
    assert [p["title"] for p in timeline] == by_metric["llmrun_stage_info"]


def test_run_selector_lists_runs_from_trainer_and_operator_metrics(dashboard: dict[str, Any]) -> None:
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    run = variables["run"]
    assert run["type"] == "query" and run["multi"] and run["includeAll"] and run["allValue"] == ".*"
    assert run["datasource"]["uid"] == "${datasource}"
    selector = re.fullmatch(r"label_values\((.*),\s*run\)", run["query"]["query"]).group(1)
    assert set(metric_names(parse(selector))) == {"llm_train_step", "llmrun_stage_info"}


def test_sweep_selector_lists_sweeps_and_narrows_the_run_selector_to_their_points(
    dashboard: dict[str, Any],
) -> None:
    variables = [v["name"] for v in dashboard["templating"]["list"]]
    assert variables.index("sweep") < variables.index("run")  # Grafana resolves them in this order
    sweep = dashboard["templating"]["list"][variables.index("sweep")]
    assert sweep["query"]["query"] == "label_values(llmsweep_point_info, sweep)"
    assert sweep["includeAll"] and sweep["allValue"] == ".*"  # All: every run, in a sweep or not
    run = dashboard["templating"]["list"][variables.index("run")]
    selector = re.fullmatch(r"label_values\((.*),\s*run\)", run["query"]["query"]).group(1)

    # The series the operator and a trainer export: a plain run, a sweep's point, a run whose name
    # merely starts with the sweep's, and a local run's trainer (no operator, no sweep label).
    for name, sweep_name in (("speedrun", ""), ("scaling-d2-f1e12", "scaling"), ("scaling-v2", "")):
        operator_metrics.set_stage("team", name, "pretrain", "Running", sweep=sweep_name)
    trainer = TrainMetrics("pretrain", 0, run="local")
    trainer.update({"step": 3})
    series = [
        {"__name__": sample.name, **sample.labels}
        for registry in (operator_metrics.REGISTRY, trainer.registry)
        for family in registry.collect()
        for sample in family.samples
    ]
    try:
        assert runs_selected(selector, series, {"${sweep}": "scaling"}) == {"scaling-d2-f1e12"}
        assert runs_selected(selector, series, {"${sweep}": ".*"}) == {
            "speedrun",
            "scaling-d2-f1e12",
            "scaling-v2",
            "local",
        }
    finally:
        for name in ("speedrun", "scaling-d2-f1e12", "scaling-v2"):
            operator_metrics.forget_run("team", name)


def runs_selected(selector: str, series: list[dict[str, str]], variables: dict[str, str]) -> set[str]:
    """The `run` values of the series a PromQL selector matches (Prometheus semantics: an absent
    label is "", regular expressions are anchored)."""
    for name, value in variables.items():
        selector = selector.replace(name, value)
    matchers = promql_parser.parse(selector).matchers.matchers
    tests = {  # MatchOp is not hashable: keyed by its name
        "Equal": lambda have, want: have == want,
        "NotEqual": lambda have, want: have != want,
        "Re": lambda have, want: re.fullmatch(want, have) is not None,
        "NotRe": lambda have, want: re.fullmatch(want, have) is None,
    }
    return {
        s["run"]
        for s in series
        if "run" in s and all(tests[str(m.op).split(".")[-1]](s.get(m.name, ""), m.value) for m in matchers)
    }


def test_run_scoped_panels_filter_by_the_selected_runs(dashboard: dict[str, Any]) -> None:
    run_scoped = gpu_scoped = 0
    for title, expr in queries(dashboard):
        names = set(metric_names(parse(expr)))
        if any(n.startswith(("llm_train_", "nanorun_serve_", "llmrun_stage_info")) for n in names):
            assert 'run=~"$run"' in expr, f"panel {title!r} ignores the run selector: {expr}"
            run_scoped += 1
        if names & DCGM_METRICS:
            assert 'pod=~"$run-.*"' in expr, f"panel {title!r} shows GPUs of every pod: {expr}"
            gpu_scoped += 1
    assert run_scoped and gpu_scoped, (run_scoped, gpu_scoped)  # the queries' metrics were recognised


def test_every_panel_and_query_uses_the_datasource_variable(dashboard: dict[str, Any]) -> None:
    assert panels(dashboard)
    for panel in panels(dashboard):
        assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
        assert panel["targets"], f"panel {panel['title']!r} has no query"
        for target in panel["targets"]:
            assert target["datasource"]["uid"] == "${datasource}", panel["title"]


def test_panels_do_not_overlap(dashboard: dict[str, Any]) -> None:
    cells: dict[tuple[int, int], str] = {}
    for panel in dashboard["panels"]:
        g = panel["gridPos"]
        assert g["x"] + g["w"] <= 24, f"panel {panel['title']!r} is wider than the grid"
        for x in range(g["x"], g["x"] + g["w"]):
            for y in range(g["y"], g["y"] + g["h"]):
                assert (x, y) not in cells, f"{panel['title']!r} overlaps {cells[(x, y)]!r}"
                cells[(x, y)] = panel["title"]


def test_panel_ids_are_unique(dashboard: dict[str, Any]) -> None:
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))
