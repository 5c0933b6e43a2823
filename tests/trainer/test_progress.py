"""The status files' fields and the one rule for "already done": `is_current`."""

from __future__ import annotations

import pytest
from nanorun.pipeline.progress import (
    Done,
    Progress,
    current_attempt,
    current_config_id,
    is_current,
    read_done,
    read_progress,
    write_done,
    write_progress,
)


@pytest.mark.parametrize(
    ("done_id", "env_id", "current"),
    [
        ("cfg-a", "cfg-a", True),  # the same configuration: done
        ("cfg-a", "cfg-b", False),  # its flags (or an earlier stage's) changed: run again
        ("", "cfg-b", False),  # finished before ids existed, now run with one: run again
        ("cfg-a", "", True),  # no id given (an executor without ids): any done.json counts, as before
        ("", "", True),
    ],
)
def test_a_done_json_counts_as_done_only_for_the_same_config_id(done_id, env_id, current):
    assert is_current(Done(stage="pretrain", seconds=1.0, config_id=done_id), env_id) is current


def test_no_done_json_is_never_done():
    assert not is_current(None, "")
    assert not is_current(None, "cfg-a")


def test_attempt_and_config_id_come_from_the_environment(monkeypatch):
    monkeypatch.delenv("NANORUN_ATTEMPT", raising=False)
    monkeypatch.delenv("NANORUN_CONFIG_ID", raising=False)
    assert (current_attempt(), current_config_id()) == (0, "")
    monkeypatch.setenv("NANORUN_ATTEMPT", "3")
    monkeypatch.setenv("NANORUN_CONFIG_ID", "0123456789abcdef")
    assert (current_attempt(), current_config_id()) == (3, "0123456789abcdef")


def test_new_fields_round_trip_and_old_files_read_with_defaults(tmp_path):
    run = str(tmp_path)
    write_progress(run, Progress(stage="pretrain", step=4, attempt=2, stopped="preempted"))
    write_done(run, Done(stage="pretrain", seconds=1.0, config_id="cfg-a"))
    p, d = read_progress(run, "pretrain"), read_done(run, "pretrain")
    assert (p.attempt, p.stopped, d.config_id) == (2, "preempted", "cfg-a")
    assert (
        Progress.from_dict({"stage": "x"}).attempt == 0 and Progress.from_dict({"stage": "x"}).stopped == ""
    )
    assert Done.from_dict({"stage": "x", "seconds": 1.0}).config_id == ""
