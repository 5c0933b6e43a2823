"""midtrain on a tiny base run: offline mixture, packed rows, exact resume, idempotent."""

from __future__ import annotations

import pytest

from tests.fixtures.post_training import (
    MID_FLAGS,
    assert_idempotent,
    assert_resumes_exactly,
    stage_done,
    stage_history,
)

pytestmark = pytest.mark.slow


def test_mid_train_trains_on_the_offline_mixture_and_records_its_curves(tiny_mid_run):
    done = stage_done(tiny_mid_run, "midtrain")
    assert done["outputs"]["checkpoint"].endswith("midtrain/checkpoints/step_000004")
    assert done["metrics"]["steps"] == 4 and done["metrics"]["val_bpb"] > 0
    assert any(t.startswith("identity") for t in done["metrics"]["tasks"])
    history = stage_history(tiny_mid_run, "midtrain")
    assert [r["step"] for r in history if "loss" in r] == [1, 2, 3, 4]
    assert any("val_bpb" in r for r in history)


def test_interrupted_mid_train_resumes_to_the_same_weights(tiny_mid_run, tmp_path):
    assert_resumes_exactly("midtrain", tiny_mid_run, tmp_path / "run", MID_FLAGS, resume_step=2, final_step=4)


def test_finished_mid_train_is_a_no_op(tiny_mid_run, tmp_path):
    assert_idempotent("midtrain", tiny_mid_run, tmp_path / "run", MID_FLAGS)
