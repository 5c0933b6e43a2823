"""The trainer's gauges appear with their first value: before a stage has measured its loss, ETA or
MFU (never, on a CPU), the dashboard shows no data for them rather than a 0; the token counter and
the step-time histogram are there from the start, at 0, so that `rate()` counts the first tokens
(and the heartbeat-failure counter, so that `increase()` counts the first failure)."""

from __future__ import annotations

from nanorun.trainer.training.metrics import GAUGES, TrainMetrics
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families


def exported(m: TrainMetrics) -> dict[str, float]:
    text = generate_latest(m.registry).decode()
    return {
        s.name: s.value
        for f in text_string_to_metric_families(text)
        for s in f.samples
        if not s.name.endswith(("_created", "_bucket"))
    }


def test_gauges_are_exported_from_their_first_value_and_counters_from_zero() -> None:
    m = TrainMetrics("pretrain", rank=0, run="r")
    assert exported(m) == {
        "llm_train_tokens_total": 0.0,
        "llm_train_step_seconds_count": 0.0,
        "llm_train_step_seconds_sum": 0.0,
        "llm_train_heartbeat_failures_total": 0.0,
    }
    m.update({"step": 1, "total_steps": 10, "loss": 3.5, "mfu": None, "tokens": 512, "step_seconds": 0.5})
    assert exported(m) == {
        "llm_train_step": 1.0,
        "llm_train_total_steps": 10.0,
        "llm_train_loss": 3.5,
        "llm_train_tokens_total": 512.0,
        "llm_train_step_seconds_count": 1.0,
        "llm_train_step_seconds_sum": 0.5,
        "llm_train_heartbeat_failures_total": 0.0,
    }
    m.update({field: 0.5 for field in GAUGES})
    assert {name for name, _ in GAUGES.values()} <= exported(m).keys()
