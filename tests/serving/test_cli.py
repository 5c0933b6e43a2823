"""`nanorun serve`: serves a checkpoint with Ray Serve and prints its URL; a wrong checkpoint fails
fast with a clear message, before Ray starts."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import httpx
import pytest
from nanorun.cli.main import main as nanorun_main

from tests.serving.conftest import free_port


def test_serve_without_a_checkpoint_fails_fast_with_a_clear_message(tmp_path, capsys):
    start = time.monotonic()
    assert nanorun_main(["serve", "--checkpoint", str(tmp_path / "missing")]) == 2
    err = capsys.readouterr().err
    assert "no checkpoint at" in err and "missing" in err
    assert time.monotonic() - start < 10  # no Ray start


@pytest.mark.slow
def test_serve_prints_the_url_and_answers_there(tiny_chat_run):
    port = free_port()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "nanorun.cli.main",
            "serve",
            "--checkpoint",
            tiny_chat_run,
            "--port",
            str(port),
            "--device",
            "cpu",
            "--num-cpus",
            "1",
            "--slots",
            "2",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        env={**os.environ, "RAY_DEDUP_LOGS": "0"},
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 240
        lines = []
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            assert line, f"nanorun serve exited early ({proc.poll()}): {''.join(lines)}"
            lines.append(line)
            if "web UI" in line:
                break
        assert f"http://localhost:{port}/" in line
        health = httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=30).json()
        assert health["ready"] and health["checkpoint"].startswith(tiny_chat_run)
        reply = httpx.post(
            f"http://127.0.0.1:{port}/v1/chat/completions",
            timeout=60,
            json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 3},
        ).json()
        assert reply["usage"]["completion_tokens"] == 3
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
