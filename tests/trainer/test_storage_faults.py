"""Storage faults: an S3 endpoint failing 5% of requests changes nothing a run computes, nothing
half-written is ever read (the proxy: tests/fixtures/faulty_s3.py), and a damaged checkpoint costs
the steps since the one before it, never the run."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from nanorun.pipeline import storage
from nanorun.pipeline.progress import read_done
from nanorun.trainer.training.checkpoint import (
    checkpoint_dir,
    list_checkpoints,
    load_model,
    verify_checkpoint,
)

from tests.fixtures.faulty_s3 import FaultyProxy
from tests.fixtures.tiny_run import check, run_stage, stage_env
from tests.trainer.test_base_train import FLAGS, fresh_run, losses

TINY = [f if f != "6" else "4" for f in FLAGS]  # 4 steps, checkpoints at 3 and 4
OUTAGE_SECONDS = 120.0


def history(run_dir: str) -> list[dict]:
    """pretrain's history.jsonl less what the wall clock measured (step time, throughput)."""
    rows = [
        json.loads(line)
        for line in storage.read_text(storage.join(run_dir, "pretrain", "history.jsonl")).splitlines()
    ]
    return [{k: v for k, v in r.items() if k not in ("seconds", "tokens_per_sec", "mfu")} for r in rows]


def base_train(run_dir: str, data: str, endpoint: str) -> subprocess.CompletedProcess:
    env = stage_env(AWS_ENDPOINT_URL=endpoint, AWS_ENDPOINT_URL_S3=endpoint)
    return check(
        subprocess.run(
            [sys.executable, "-m", "nanorun.trainer.base_train", "--run-dir", run_dir, "--data", data, *TINY],
            capture_output=True,
            text=True,
            timeout=300,
            env=env,
        )
    )


def test_reads_through_bodies_cut_short_return_the_whole_object(s3_server, s3_bucket):
    blob = os.urandom(300_000)
    storage.write_bytes(f"s3://{s3_bucket}/blob", blob)
    with FaultyProxy(s3_server, rate=0.5, seed=7, kinds=("cut",)) as proxy:
        os.environ["AWS_ENDPOINT_URL_S3"] = proxy.endpoint
        try:
            reads = [storage.read_bytes(f"s3://{s3_bucket}/blob") for _ in range(10)]
        finally:
            os.environ["AWS_ENDPOINT_URL_S3"] = s3_server
    assert proxy.faults["cut"] > 0
    assert all(r == blob for r in reads)


def test_a_missing_object_read_through_cut_answers_is_still_missing(s3_server, s3_bucket):
    # A 404's body is read inside botocore, which lets the cut connection's error through.
    with FaultyProxy(s3_server, rate=0.5, seed=7, kinds=("cut",)) as proxy:
        os.environ["AWS_ENDPOINT_URL_S3"] = proxy.endpoint
        try:
            reads = [storage.read_json_or_none(f"s3://{s3_bucket}/nothing/done.json") for _ in range(10)]
        finally:
            os.environ["AWS_ENDPOINT_URL_S3"] = s3_server
    assert proxy.faults["cut"] > 0
    assert reads == [None] * 10


def test_a_held_request_gets_no_answer_while_the_others_go_through(s3_server, s3_bucket):
    storage.write_text(f"s3://{s3_bucket}/held", "held")
    storage.write_text(f"s3://{s3_bucket}/free", "free")
    with FaultyProxy(s3_server, rate=0, holds=[f"GET /{s3_bucket}/held"]) as proxy:
        with pytest.raises(TimeoutError):
            urllib.request.urlopen(f"{proxy.endpoint}/{s3_bucket}/held", timeout=1)
        os.environ["AWS_ENDPOINT_URL_S3"] = proxy.endpoint
        try:
            assert storage.read_text(f"s3://{s3_bucket}/free") == "free"
        finally:
            os.environ["AWS_ENDPOINT_URL_S3"] = s3_server
    assert proxy.faults == {"held": 1}


def test_a_tiny_run_on_a_faulty_endpoint_computes_the_same_losses(
    tiny_base_run, s3_server, s3_bucket, faulty_s3
):
    # the inputs go up through the faulty endpoint too (uploads, multipart-free: the files are small)
    data = f"s3://{s3_bucket}/data"
    for f in sorted((Path(tiny_base_run).parent / "data").iterdir()):
        storage.upload_from(f, storage.join(data, f.name))
    runs = {"clean": f"s3://{s3_bucket}/runs/clean", "faulty": f"s3://{s3_bucket}/runs/faulty"}
    for run in runs.values():
        for f in (Path(tiny_base_run) / "tokenizer").glob("*.*"):  # its files, not its ranks/
            storage.upload_from(f, storage.join(run, "tokenizer", f.name))

    base_train(runs["clean"], data, s3_server)
    before, start = faulty_s3.injected, time.time()
    base_train(runs["faulty"], data, faulty_s3.endpoint)
    print(
        f"faulty run: {time.time() - start:.1f} s; {faulty_s3.injected - before} faults in the run; in all "
        f"{faulty_s3.requests} requests, faults {dict(faulty_s3.faults)}"
    )

    assert faulty_s3.injected > before  # the run itself met faults, not only the uploads above
    assert history(runs["faulty"]) == history(runs["clean"])
    done = read_done(runs["faulty"], "pretrain")
    assert done.metrics["steps"] == 4
    assert [s for s, _ in list_checkpoints(storage.join(runs["faulty"], "pretrain"))] == [3, 4]
    load_model(done.outputs["checkpoint"], "cpu")  # every file of it whole


def lose_the_end(weights: Path) -> str:
    weights.write_bytes(weights.read_bytes()[:1000])
    return "1000 bytes"


def flip_bytes_inside(weights: Path) -> str:
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one byte of a tensor: the file still parses, the size is the same
    weights.write_bytes(bytes(data))
    return "its contents changed since it was committed"


@pytest.mark.parametrize("damage", [lose_the_end, flip_bytes_inside])
def test_a_damaged_newest_checkpoint_is_named_and_the_run_resumes_from_the_one_before(
    tiny_base_run, tmp_path, damage
):
    run, data = fresh_run(tiny_base_run, tmp_path / "run")
    check(run_stage("base_train", "--run-dir", run, "--data", data, *FLAGS))  # checkpoints at steps 3 and 6
    straight = losses(run)
    (Path(run) / "pretrain" / "done.json").unlink()  # as if it crashed right after saving step 6...
    weights = Path(checkpoint_dir(str(Path(run) / "pretrain"), 6)) / "model.safetensors"
    found = damage(weights)  # ...and the disk damaged its weights

    out = check(run_stage("base_train", "--run-dir", run, "--data", data, *FLAGS))
    assert (
        f"warning: checkpoint file {weights} is corrupt: {found}" in out.stderr
        and f"; resuming from {checkpoint_dir(str(Path(run) / 'pretrain'), 3)}\n" in out.stderr
    ), out.stderr
    assert f"resuming from {checkpoint_dir(str(Path(run) / 'pretrain'), 3)} (step 3" in out.stdout
    assert losses(run) == straight  # steps 4-6 trained again, identically
    verify_checkpoint(checkpoint_dir(str(Path(run) / "pretrain"), 6))  # and saved whole this time
    assert [s for s, _ in list_checkpoints(str(Path(run) / "pretrain"))] == [3, 6]


@pytest.fixture
def outage_proxy(s3_server, monkeypatch):
    """A fault-free proxy in front of the S3 server, made this test's endpoint, whose outages the test
    starts; botocore gives up on a request after 2 attempts (AWS_MAX_ATTEMPTS), well inside them."""
    with FaultyProxy(s3_server, rate=0) as proxy:
        monkeypatch.setenv("AWS_ENDPOINT_URL_S3", proxy.endpoint)
        monkeypatch.setenv("AWS_MAX_ATTEMPTS", "2")
        storage.wait_out_outages()  # as a stage process does
        try:
            yield proxy
        finally:
            storage.wait_out_outages(False)
            proxy.outage(0)


def test_an_outage_longer_than_botocores_own_retries_is_waited_out(outage_proxy, s3_bucket, capfd):
    uri = f"s3://{s3_bucket}/run/pretrain/progress.json"
    outage_proxy.outage(4)
    storage.write_bytes(uri, b"step 1")
    assert storage.read_bytes(uri) == b"step 1"
    assert outage_proxy.faults["outage"] > 2  # botocore gave up on the write at least once
    err = capfd.readouterr().err
    assert f"storage unreachable (ConnectionClosedError) at {uri}: trying again for up to 900 s" in err
    assert "storage reachable again after" in err


def test_an_outage_longer_than_the_limit_raises_storage_unavailable(outage_proxy, s3_bucket, monkeypatch):
    monkeypatch.setenv("NANORUN_STORAGE_OUTAGE_SECONDS", "1")
    outage_proxy.outage(600)
    with pytest.raises(storage.StorageUnavailable, match=r"storage unreachable for \d+ s at s3://"):
        storage.read_bytes(f"s3://{s3_bucket}/run/pretrain/done.json")


def test_a_process_that_is_no_stage_is_refused_when_botocore_gives_up(outage_proxy, s3_bucket):
    storage.wait_out_outages(False)  # the operator: its handlers must not block for minutes
    outage_proxy.outage(600)
    with pytest.raises(Exception) as refused:
        storage.read_json_or_none(f"s3://{s3_bucket}/run/pretrain/progress.json")
    assert not isinstance(refused.value, storage.StorageUnavailable)


def test_an_impatient_thread_is_refused_at_once(outage_proxy, s3_bucket, monkeypatch):
    monkeypatch.delenv("AWS_MAX_ATTEMPTS")
    outage_proxy.outage(600)
    with storage.impatient(), pytest.raises(Exception) as refused:
        storage.write_bytes(f"s3://{s3_bucket}/run/pretrain/ranks/rank-00000.json", b"{}")
    assert not isinstance(refused.value, storage.StorageUnavailable)
    # one try of 2 botocore attempts (and a pooled connection urllib3 may reopen), not 8
    assert outage_proxy.faults["outage"] < 8


@pytest.mark.slow
def test_a_run_rides_out_storage_outages_in_training_and_in_a_checkpoint_write(
    tiny_base_run, s3_server, s3_bucket
):
    data = f"s3://{s3_bucket}/data"
    for f in sorted((Path(tiny_base_run).parent / "data").iterdir()):
        storage.upload_from(f, storage.join(data, f.name))
    run = f"s3://{s3_bucket}/runs/outages"
    for f in (Path(tiny_base_run) / "tokenizer").glob("*.*"):  # its files, not its ranks/
        storage.upload_from(f, storage.join(run, "tokenizer", f.name))
    # Each outage starts with the request named and lasts two minutes, as a restarting S3 gateway
    # or a cut route might: the stage waits it out (backing off up to 30 s between tries) instead of
    # crashing into a retry of the whole attempt.
    during_training = f"PUT /{s3_bucket}/runs/outages/pretrain/progress.json"  # after the first step
    during_checkpoint = f"PUT /{s3_bucket}/runs/outages/pretrain/checkpoints/step_000003/model.safetensors"
    outages = [(during_training, OUTAGE_SECONDS), (during_checkpoint, OUTAGE_SECONDS)]
    with FaultyProxy(s3_server, rate=0, outages=outages) as proxy:
        env = stage_env(
            AWS_ENDPOINT_URL=proxy.endpoint,
            AWS_ENDPOINT_URL_S3=proxy.endpoint,
            AWS_MAX_ATTEMPTS="2",
            NANORUN_HEARTBEAT_SECONDS="0.5",
            NANORUN_ATTEMPT="1",
        )
        proc = check(
            subprocess.run(
                [sys.executable, "-m", "nanorun.trainer.base_train", "--run-dir", run, "--data", data, *TINY],
                capture_output=True,
                text=True,
                timeout=300 + 2 * OUTAGE_SECONDS,
                env=env,
            )
        )
    assert proxy.fired == [during_training, during_checkpoint]
    assert proc.stderr.count("storage unreachable") >= 2 and "heartbeat not written" in proc.stderr
    waited = [int(s) for s in re.findall(r"storage reachable again after (\d+) s", proc.stderr)]
    assert sum(w >= OUTAGE_SECONDS - 5 for w in waited) == 2, waited  # each outage waited out whole
    done = read_done(run, "pretrain")
    assert done.metrics["steps"] == 4 and [r["step"] for r in history(run) if "loss" in r] == [1, 2, 3, 4]
    committed = [uri for _, uri in list_checkpoints(storage.join(run, "pretrain"))]
    assert [s for s, _ in list_checkpoints(storage.join(run, "pretrain"))] == [3, 4]
    for uri in committed:
        verify_checkpoint(uri)  # every file as committed: sizes and checksums
