"""`promtool check metrics` (Prometheus's own linter) passes on the scraped /metrics of the
trainer, the operator and the chat service, each served for real and scraped over HTTP (see
tests/fixtures/metrics.py), and each carries exactly the series names the dashboard relies on.

Needs promtool from Debian's `prometheus` package (`make setup-system` installs it).
"""

from __future__ import annotations

import shutil
import subprocess

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.fixtures.metrics import TRAINER_SERIES

SERIES = {
    "trainer": set(TRAINER_SERIES),
    "operator": {
        "llmrun_reconciles_total",
        "llmrun_reconcile_errors_total",
        "llmrun_runs",
        "llmrun_stage_duration_seconds_bucket",
        "llmrun_time_to_first_job_seconds_bucket",
        "llmrun_stage_info",
    },
    "serving": {
        "nanorun_serve_requests_total",
        "nanorun_serve_time_to_first_token_seconds_bucket",
        "nanorun_serve_generated_tokens_total",
        "nanorun_serve_request_seconds_bucket",
        "nanorun_serve_inflight_requests",
        "nanorun_serve_queued_requests",
        "nanorun_serve_refused_requests_total",
    },
}
# Labels the dashboard filters and groups by (docs/monitoring.md).
LABELS = {name: {"run", "stage", "rank"} for name in SERIES["trainer"]} | {
    "llmrun_reconciles_total": {"result"},
    "llmrun_runs": {"phase"},
    "llmrun_stage_duration_seconds_bucket": {"stage"},
    "llmrun_stage_info": {"namespace", "run", "stage", "phase", "sweep"},
    "nanorun_serve_requests_total": {"status"},
    "nanorun_serve_refused_requests_total": {"reason"},
}


def promtool_check(text: str) -> subprocess.CompletedProcess:
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.fail(
            "promtool is not installed: `apt-get install prometheus` (or `make setup-system`)", pytrace=False
        )
    return subprocess.run([promtool, "check", "metrics"], input=text, capture_output=True, text=True)


@pytest.mark.parametrize("component", sorted(SERIES))
def test_promtool_accepts_the_scraped_metrics(scraped_metrics: dict[str, str], component: str) -> None:
    result = promtool_check(scraped_metrics[component])
    assert result.returncode == 0, f"promtool check metrics on {component}:\n{result.stdout}{result.stderr}"


@pytest.mark.parametrize("component", sorted(SERIES))
def test_scraped_metrics_carry_the_agreed_series_and_labels(
    scraped_metrics: dict[str, str], component: str
) -> None:
    samples = [
        s for family in text_string_to_metric_families(scraped_metrics[component]) for s in family.samples
    ]
    names = {s.name for s in samples}
    assert SERIES[component] <= names, f"{component} lacks {sorted(SERIES[component] - names)}"
    for sample in samples:
        wanted = LABELS.get(sample.name, set())
        assert wanted <= set(sample.labels), (
            f"{sample.name} lacks labels {sorted(wanted - set(sample.labels))}"
        )


def test_promtool_rejects_a_counter_without_the_total_suffix() -> None:
    # The check above would be vacuous if promtool accepted anything.
    bad = "# HELP llm_train_tokens Tokens.\n# TYPE llm_train_tokens counter\nllm_train_tokens 1\n"
    result = promtool_check(bad)
    assert result.returncode != 0 and "_total" in result.stdout + result.stderr
