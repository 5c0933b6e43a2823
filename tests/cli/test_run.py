"""`nanorun run FILE`, the local executor: validation with the CRD's messages, the printed plan,
re-runs that skip finished stages, Ctrl-C that stops a stage with a checkpoint and a re-run that
resumes from it, and a run directory on S3 (the moto server). The stages are the real modules,
on tiny settings."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import psutil
import pytest
import yaml
from nanorun.cli import run as local
from nanorun.operator.api import GROUP, VERSION, parse_spec
from nanorun.operator.reconcile.plan import config_ids, stage_plan
from nanorun.pipeline import storage
from nanorun.pipeline.progress import Done, Progress, read_done, read_progress, write_done
from nanorun.trainer.training import checkpoint

STAGE_KEYS = ("tokenizer", "pretrain", "baseEval", "midtrain", "sft", "rl", "eval", "report")
TOKENIZER = {"vocabSize": 512, "maxChars": 20000}
TOKENIZER_STAGE = {"extraArgs": ["--eval-chars", "20000"]}
# A pretraining stage of about a second a step on one CPU thread: width 64, context 64.
TINY_PRETRAIN = {
    "numIterations": 30,
    "deviceBatchSize": 4,
    "totalBatchSize": 256,
    "saveEvery": 4,
    "evalEvery": 30,
    "extraArgs": [
        "--warmup-steps",
        "2",
        "--eval-tokens",
        "1024",
        "--sample-every",
        "-1",
        "--data-streams",
        "1",
        "--doc-buffer",
        "16",
    ],
}


def llmrun_file(
    path: Path, name: str = "local", enabled: tuple[str, ...] = ("tokenizer",), **spec: Any
) -> Path:
    body: dict[str, Any] = {
        "storage": {"uri": str(path.parent / "run")},
        "model": {"depth": 2, "maxSeqLen": 64, "aspectRatio": 32, "headDim": 32, "windowPattern": "L"},
        "tokenizer": TOKENIZER,
        "compute": {"gpusPerNode": 0},
        "stages": {k: {"enabled": k in enabled} for k in STAGE_KEYS},
        "serving": {"enabled": False},
    }
    body["stages"]["tokenizer"].update(TOKENIZER_STAGE)
    body["stages"]["pretrain"].update(TINY_PRETRAIN)
    for key, value in spec.items():
        if key == "stages":
            for stage, fields in value.items():
                body["stages"][stage] = {**body["stages"].get(stage, {}), **fields}
        else:
            body[key] = {**body[key], **value} if isinstance(body.get(key), dict) else value
    path.write_text(
        yaml.safe_dump(
            {"apiVersion": f"{GROUP}/{VERSION}", "kind": "LLMRun", "metadata": {"name": name}, "spec": body}
        )
    )
    return path


@pytest.fixture(autouse=True)
def one_thread(monkeypatch):
    # Stages inherit the environment; one OpenMP thread keeps tiny steps fast on a busy machine.
    monkeypatch.setenv("OMP_NUM_THREADS", "1")


def run_local(capsys, *argv: str) -> tuple[int, str, str]:
    rc = local.main(list(argv))
    out = capsys.readouterr()
    return rc, out.out, out.err


# --- validation ------------------------------------------------------------------------------------


# One mistake at a time, refused here and by the API server alike: test_refused_specs.py's table.


def test_schema_errors_name_the_field_and_every_problem_is_listed(tmp_path, capsys):
    path = llmrun_file(tmp_path / "bad.yaml", compute={"nodes": 0}, model={"windowPattern": "SXL"})
    rc, _, err = run_local(capsys, str(path))
    assert rc == 2
    assert any(line.startswith("spec.compute.nodes: ") for line in err.splitlines())
    assert any(line.startswith("spec.model.windowPattern: ") for line in err.splitlines())


@pytest.mark.parametrize(
    "content, expected",
    [
        ("kind: [unclosed", "is not valid YAML"),
        ("- a list", "expected an LLMRun object"),
        ("apiVersion: v1\nkind: ConfigMap\n", "expected apiVersion: nanorun.io/v1alpha1 and kind: LLMRun"),
    ],
)
def test_a_file_that_is_no_llmrun_gets_a_clear_error(tmp_path, capsys, content, expected):
    path = tmp_path / "run.yaml"
    path.write_text(content)
    rc, _, err = run_local(capsys, str(path))
    assert rc == 2 and expected in err and "Traceback" not in err


def test_a_missing_file_gets_a_clear_error(tmp_path, capsys):
    rc, _, err = run_local(capsys, str(tmp_path / "nope.yaml"))
    assert rc == 2 and "cannot read" in err and "nope.yaml" in err


# --- the plan ----------------------------------------------------------------------------------------


def test_dry_run_prints_each_planned_stage_command_and_runs_nothing(tmp_path, capsys):
    path = llmrun_file(
        tmp_path / "run.yaml", enabled=STAGE_KEYS, serving={"enabled": True, "allowUnauthenticated": True}
    )
    spec = parse_spec(yaml.safe_load(path.read_text())["spec"])
    rc, out, _ = run_local(capsys, str(path), "--dry-run", "--nproc-per-node", "2")
    assert rc == 0
    lines = out.strip().splitlines()
    plan = stage_plan(spec)
    run_dir = str(tmp_path / "run")
    assert lines == [" ".join(local.stage_command(s, run_dir, 2 if s.distributed else 1, None)) for s in plan]
    assert [line.split(" -m ")[-1].split()[0] for line in lines] == [s.entry_point for s in plan]
    assert "torch.distributed.run --standalone --nproc-per-node=2 -m nanorun.trainer.base_train" in lines[1]
    assert "torch.distributed.run" not in lines[0] and "torch.distributed.run" not in lines[-1]
    assert "--vocab-size 512" in lines[0] and "--num-iterations 30" in lines[1]
    assert not (tmp_path / "run").exists()


# --- running ------------------------------------------------------------------------------------------


def test_a_run_dir_on_s3_works_and_a_rerun_skips_the_finished_stage(tmp_path, capsys, s3_run_dir):
    path = llmrun_file(tmp_path / "run.yaml")
    logs = tmp_path / "logs"
    rc, out, _ = run_local(capsys, str(path), "--run-dir", s3_run_dir, "--log-dir", str(logs))
    assert rc == 0, out + (logs / "tokenizer.log").read_text()
    assert storage.exists(storage.join(s3_run_dir, "tokenizer", "tokenizer.tiktoken"))
    done = read_done(s3_run_dir, "tokenizer")
    assert done is not None and done.metrics["compression_ratio"] > 1
    assert not (tmp_path / "run").exists()  # --run-dir overrides spec.storage.uri

    rc, out, _ = run_local(capsys, str(path), "--run-dir", s3_run_dir, "--log-dir", str(logs))
    assert rc == 0
    assert "tokenizer: already done" in out
    assert (logs / "tokenizer.log").read_text().count("\n$ ") == 1  # the stage was not started again
    assert read_done(s3_run_dir, "tokenizer") == done


def test_a_stage_whose_flags_changed_in_the_file_runs_again_and_so_do_the_stages_after_it(tmp_path, capsys):
    path = llmrun_file(tmp_path / "run.yaml", enabled=("tokenizer", "report"))
    run_dir, logs = str(tmp_path / "run"), tmp_path / "run" / "logs"
    rc, out, _ = run_local(capsys, str(path))
    assert rc == 0, out
    first = {key: read_done(run_dir, key) for key in ("tokenizer", "report")}
    ids = config_ids(stage_plan(local.load_run_file(str(path)).spec))
    assert {key: done.config_id for key, done in first.items()} == ids  # each stage got NANORUN_CONFIG_ID
    assert "# attempt 1, config " + ids["tokenizer"] in (logs / "tokenizer.log").read_text()
    assert read_progress(run_dir, "tokenizer").attempt == 1  # and NANORUN_ATTEMPT

    rc, out, _ = run_local(capsys, str(path))  # unchanged: both skipped
    assert rc == 0 and "tokenizer: already done" in out and "report: already done" in out

    path = llmrun_file(tmp_path / "run.yaml", enabled=("tokenizer", "report"), tokenizer={"vocabSize": 600})
    rc, out, _ = run_local(capsys, str(path))
    assert rc == 0, out
    new_ids = config_ids(stage_plan(local.load_run_file(str(path)).spec))
    assert new_ids["tokenizer"] != ids["tokenizer"] and new_ids["report"] != ids["report"]  # chained
    assert f"tokenizer: re-running after a spec change: done.json is of config {ids['tokenizer']}" in out
    done = read_done(run_dir, "tokenizer")
    assert (done.config_id, done.metrics["vocab_size"]) == (new_ids["tokenizer"], 600)
    assert read_done(run_dir, "report").config_id == new_ids["report"]  # the stage after it ran again too
    for stage in ("tokenizer", "report"):
        assert (logs / f"{stage}.log").read_text().count("\n$ ") == 2, stage
    assert read_progress(run_dir, "tokenizer").attempt == 2  # the second process of the stage in this run dir


def stage_processes(run_dir: Path) -> list[psutil.Process]:
    found = []
    for proc in psutil.process_iter(["cmdline"]):
        cmdline = proc.info["cmdline"] or []
        if str(run_dir) in cmdline and "nanorun.trainer.base_train" in cmdline:
            found.append(proc)
    return found


def wait_for(what: str, check, timeout: float, proc: subprocess.Popen, log: Path):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        if proc.poll() is not None:
            break
        time.sleep(0.05)
    raise AssertionError(
        f"no {what} (nanorun run exit {proc.poll()}); stage log:\n{log.read_text()[-3000:] if log.exists() else ''}"
    )


@pytest.mark.slow
def test_ctrl_c_stops_the_stage_with_a_checkpoint_and_a_rerun_resumes_from_it(tmp_path, capsys):
    # Steps take 10 ms on an idle machine and 100s of ms on a busy one: stop once the first periodic
    # checkpoint is committed, with most of the 100 steps still to go either way.
    path = llmrun_file(
        tmp_path / "run.yaml",
        enabled=("tokenizer", "pretrain"),
        stages={"pretrain": {"numIterations": 100, "saveEvery": 10, "evalEvery": 100}},
    )
    run_dir = tmp_path / "run"
    log = run_dir / "logs" / "pretrain.log"
    proc = subprocess.Popen(
        [sys.executable, "-m", "nanorun.cli.main", "run", str(path)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        wait_for(
            "pretrain's first checkpoint",
            lambda: checkpoint.latest_checkpoint(str(run_dir / "pretrain")),
            timeout=180,
            proc=proc,
            log=log,
        )
        proc.send_signal(signal.SIGINT)  # what Ctrl-C in the terminal does
        out, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, out
    assert "run the same command again to resume" in out
    assert stage_processes(run_dir) == []  # the stage is gone too
    assert read_done(str(run_dir), "pretrain") is None
    latest = checkpoint.latest_checkpoint(str(run_dir / "pretrain"))
    stopped_at = checkpoint.read_meta(latest)["step"]
    assert 10 <= stopped_at < 100  # the stop saved the step it had reached
    assert "preempted: saved" in log.read_text()
    progress = read_progress(str(run_dir), "pretrain")
    assert (progress.stopped, progress.attempt, progress.last_checkpoint) == ("preempted", 1, latest)

    rc, out, _ = run_local(capsys, str(path))
    assert rc == 0, out
    assert "tokenizer: already done" in out
    second_attempt = log.read_text().split("\n$ ")[-1]
    assert "# attempt 2, config " in second_attempt
    assert f"resuming from {latest} (step {stopped_at}," in second_attempt
    assert f"step {stopped_at:06d}/" not in second_attempt  # no step is trained twice
    done = read_done(str(run_dir), "pretrain")
    assert done is not None and done.outputs["checkpoint"].endswith("step_000100")


def test_a_failing_stage_stops_the_run_with_its_log_tail(tmp_path, capsys):
    path = llmrun_file(
        tmp_path / "run.yaml", stages={"tokenizer": {"extraArgs": ["--vocab-size", "not-a-number"]}}
    )
    rc, out, _ = run_local(capsys, str(path))
    assert rc == 1
    assert "tokenizer exited with code 2" in out and "invalid int value" in out
    assert os.path.exists(tmp_path / "run" / "logs" / "tokenizer.log")


def test_the_progress_bar_shows_compile_time_apart_from_tokens_per_second():
    compiling = Progress(stage="pretrain", step=1, total_steps=10, loss=5.5, compile_seconds=41.6)
    assert local._progress_fields(compiling) == "loss 5.500  compile 42s"
    steady = Progress(stage="pretrain", step=5, total_steps=10, tokens_per_sec=1500.0, compile_seconds=41.6)
    assert local._progress_fields(steady) == "1,500 tok/s  compile 42s"
    assert local._progress_fields(Progress(stage="sft", tokens_per_sec=900.0)) == "900 tok/s"  # eager


def test_cpu_stages_get_the_idle_cpus_as_threads_unless_the_user_chose(tmp_path, monkeypatch):
    from rich.console import Console

    run = local.load_run_file(
        str(llmrun_file(tmp_path / "run.yaml", storage={"endpoint": "http://s3.example:9000"}))
    )
    executor = local.LocalRun(run, str(tmp_path / "run"), tmp_path / "logs", Console())
    monkeypatch.delenv("OMP_NUM_THREADS")
    monkeypatch.delenv("AWS_ENDPOINT_URL", raising=False)
    try:
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
        local.local_gpu_count.cache_clear()
        monkeypatch.setattr(local.os, "cpu_count", lambda: 4)
        monkeypatch.setattr(local, "idle_cpus", lambda: 3.9)  # an idle machine: every core
        env = executor.env()
        assert env["OMP_NUM_THREADS"] == "4"
        assert env["NANORUN_RUN"] == "local" and env["AWS_ENDPOINT_URL"] == "http://s3.example:9000"
        assert (env["NANORUN_HEARTBEAT_SECONDS"], env["NANORUN_COLLECTIVE_TIMEOUT_SECONDS"]) == ("15", "1800")
        monkeypatch.setattr(local, "idle_cpus", lambda: 1.2)  # a busy one: the idle cores
        assert executor.env()["OMP_NUM_THREADS"] == "1"
        monkeypatch.setattr(local, "idle_cpus", lambda: 0.1)  # fully busy: still one
        assert executor.env()["OMP_NUM_THREADS"] == "1"
        monkeypatch.setattr(local, "idle_cpus", lambda: None)  # no /proc/stat: half the CPUs
        assert executor.env()["OMP_NUM_THREADS"] == "2"
        monkeypatch.setenv("OMP_NUM_THREADS", "3")
        assert executor.env()["OMP_NUM_THREADS"] == "3"
        monkeypatch.delenv("OMP_NUM_THREADS")
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1")  # GPU stages: torch's own default
        local.local_gpu_count.cache_clear()
        assert "OMP_NUM_THREADS" not in executor.env()
    finally:
        local.local_gpu_count.cache_clear()


# --- --serve (what `make demo` ends with) ------------------------------------------------------------


def test_serve_needs_a_keys_file_for_a_run_whose_keys_are_a_secret_before_any_stage_runs(tmp_path, capsys):
    path = llmrun_file(
        tmp_path / "run.yaml",
        enabled=("tokenizer", "pretrain"),
        serving={"enabled": True, "apiKeysSecret": "chat-keys"},
    )
    rc, _, err = run_local(capsys, str(path), "--serve")
    assert rc == 2 and "--api-keys-file FILE" in err and "'chat-keys'" in err
    assert not (tmp_path / "run").exists()  # refused before the tokenizer stage
    rc, _, err = run_local(capsys, str(path), "--serve", "--api-keys-file", str(tmp_path / "none.txt"))
    assert rc == 2 and "no such file" in err


def test_serve_follows_the_specs_access_fields(tmp_path):
    keys = tmp_path / "keys.txt"
    keys.write_text("k" * 32 + "\n")
    spec = parse_spec(
        yaml.safe_load(
            llmrun_file(
                tmp_path / "run.yaml",
                enabled=("tokenizer", "pretrain"),
                serving={"enabled": True, "allowUnauthenticated": True, "rateLimitPerMinute": 7},
            ).read_text()
        )["spec"]
    )
    assert local.serve_access_flags(spec, None) == [
        "--allow-unauthenticated",
        "--max-request-bytes",
        "1048576",
        "--rate-limit",
        "7",
    ]
    assert local.serve_access_flags(spec, str(keys))[:2] == ["--api-keys-file", str(keys.resolve())]


@pytest.mark.slow
def test_serve_after_a_finished_run_skips_every_stage_and_chats_at_the_printed_url(tmp_path, tiny_base_run):
    import httpx

    from tests.serving.conftest import free_port

    run_dir = str(tmp_path / "run")
    shutil.copytree(tiny_base_run, run_dir)
    path = llmrun_file(
        tmp_path / "tiny.yaml",
        enabled=("tokenizer", "pretrain"),
        storage={"uri": run_dir},
        serving={"enabled": True, "apiKeysSecret": "tiny-chat-keys"},
    )
    api_key = "sk-nanorun-local-" + "8" * 32
    keys = tmp_path / "keys.txt"
    keys.write_text(f"{api_key}\n")
    # The fixture's stages ran with other flags than this file's: make them this file's finished run
    # (otherwise their config ids differ and `nanorun run` trains them again, as it should).
    ids = config_ids(stage_plan(local.load_run_file(str(path)).spec))
    for key in ("tokenizer", "pretrain"):
        write_done(run_dir, dataclasses.replace(read_done(run_dir, key), config_id=ids[key]))
    port = free_port()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "nanorun.cli.main",
            "run",
            str(path),
            "--serve",
            "--port",
            str(port),
            "--api-keys-file",
            str(keys),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
        env={**os.environ, "RAY_DEDUP_LOGS": "0"},
    )
    lines: list[str] = []
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            assert line, f"nanorun run --serve exited early ({proc.poll()}):\n{''.join(lines)}"
            lines.append(line)
            if "explain  " in line:
                break
        out = "".join(lines)
        assert "tokenizer: already done" in out and "pretrain: already done" in out
        assert f"web UI   http://localhost:{port}/\n" in out
        assert f"explain  http://localhost:{port}/explain/tokenizer" in line  # the demo prints them too
        assert httpx.get(f"http://127.0.0.1:{port}/explain/tokenizer", timeout=30).status_code == 200
        chat = f"http://127.0.0.1:{port}/v1/chat/completions"
        body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}
        assert httpx.post(chat, timeout=60, json=body).status_code == 401
        reply = httpx.post(chat, timeout=60, json=body, headers={"Authorization": f"Bearer {api_key}"})
        assert reply.status_code == 200, reply.text
        assert reply.json()["usage"]["completion_tokens"] == 3
        health = httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=30).json()
        assert health["stage"] == "pretrain" and run_dir not in str(health)
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


@pytest.mark.slow
def test_the_export_stage_writes_the_final_model_into_the_runs_s3_storage_and_the_report_links_it(
    tmp_path, capsys, s3_run_dir, tiny_chat_run
):
    import torch
    import transformers

    # A run whose sft stage has finished: tiny_chat_run's tokenizer and committed checkpoint, on S3.
    for path in storage.walk_local(tiny_chat_run):
        storage.upload_from(path, storage.join(s3_run_dir, path.relative_to(tiny_chat_run).as_posix()))
    sft = checkpoint.latest_checkpoint(storage.join(s3_run_dir, "sft"))
    write_done(s3_run_dir, Done(stage="sft", seconds=1.0, outputs={"checkpoint": sft}))
    path = llmrun_file(
        tmp_path / "run.yaml", enabled=("report",), stages={"export": {"enabled": True, "dtype": "float32"}}
    )
    logs = tmp_path / "logs"
    rc, out, _ = run_local(capsys, str(path), "--run-dir", s3_run_dir, "--log-dir", str(logs))
    assert rc == 0, out + (logs / "export.log").read_text()

    done = read_done(s3_run_dir, "export")
    folder = storage.join(s3_run_dir, "export", "model")
    assert done.outputs == {"model": folder, "checkpoint": sft}
    assert done.metrics == {"source": "sft", "dtype": "float32"}
    assert f"[{folder}]({folder})" in storage.read_text(storage.join(s3_run_dir, "report", "report.md"))
    local = tmp_path / "hf"
    for name in storage.file_sizes(folder):
        storage.download_to(storage.join(folder, name), local / name)
    hf = transformers.AutoModelForCausalLM.from_pretrained(local, trust_remote_code=True)
    model, _ = checkpoint.load_model(sft, "cpu")
    ids = torch.arange(100, 160).unsqueeze(0)
    with torch.no_grad():
        torch.testing.assert_close(hf(input_ids=ids).logits, model(ids), rtol=0, atol=1e-5)

    # Another dtype runs the stage again, which replaces its folder whole.
    before = storage.file_sizes(folder)
    path = llmrun_file(
        tmp_path / "run.yaml", enabled=("report",), stages={"export": {"enabled": True, "dtype": "bfloat16"}}
    )
    rc, out, _ = run_local(capsys, str(path), "--run-dir", s3_run_dir, "--log-dir", str(logs))
    assert rc == 0, out + (logs / "export.log").read_text()
    after = storage.file_sizes(folder)
    assert set(after) == set(before) and after["model.safetensors"] < 0.6 * before["model.safetensors"]
    assert json.loads(storage.read_text(storage.join(folder, "config.json")))["dtype"] == "bfloat16"
