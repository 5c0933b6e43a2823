"""`nanorun serve`: serves a checkpoint with Ray Serve and prints its URL; a wrong checkpoint, or no
choice between API keys and open access, fails fast with a clear message, before Ray starts."""

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


def test_serve_without_a_checkpoint_fails_fast_with_a_clear_message(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # an `import ray` on the way would raise: it refuses first
    assert nanorun_main(["serve", "--checkpoint", str(tmp_path / "missing"), "--allow-unauthenticated"]) == 2
    err = capsys.readouterr().err
    assert "no checkpoint at" in err and "missing" in err


def test_serve_refuses_to_start_without_api_keys_or_the_opt_out(tiny_chat_run, tmp_path, capsys):
    assert nanorun_main(["serve", "--checkpoint", tiny_chat_run]) == 2
    err = capsys.readouterr().err
    assert "--api-keys-file FILE" in err and "--allow-unauthenticated" in err
    empty = tmp_path / "keys.txt"
    empty.write_text("# no key yet\nshort\n")
    for keys, says in ((tmp_path / "missing.txt", "no such file"), (empty, "no API key in it")):
        assert nanorun_main(["serve", "--checkpoint", tiny_chat_run, "--api-keys-file", str(keys)]) == 2
        assert says in capsys.readouterr().err
    with pytest.raises(SystemExit) as both:  # argparse: one or the other
        nanorun_main(
            ["serve", "--checkpoint", tiny_chat_run, "--api-keys-file", str(empty), "--allow-unauthenticated"]
        )
    assert both.value.code == 2 and "not allowed with" in capsys.readouterr().err


@pytest.mark.slow
def test_serve_prints_the_url_and_answers_there_to_a_key_from_the_file(tiny_chat_run, tmp_path):
    port = free_port()
    key = "sk-nanorun-cli-" + "7" * 32
    keys = tmp_path / "keys.txt"
    keys.write_text(f"{key}\n")
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
            "--api-keys-file",
            str(keys),
            "--rate-limit",
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
        assert health["ready"] and health["stage"] == "sft"

        def ask(headers: dict[str, str]) -> httpx.Response:
            return httpx.post(
                f"http://127.0.0.1:{port}/v1/chat/completions",
                timeout=60,
                json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 3},
                headers=headers,
            )

        assert ask({}).status_code == 401
        reply = ask({"Authorization": f"Bearer {key}"}).json()
        assert reply["usage"]["completion_tokens"] == 3
        ask({"Authorization": f"Bearer {key}"})
        limited = ask({"Authorization": f"Bearer {key}"})  # --rate-limit 2: the third in a minute
        assert limited.status_code == 429 and int(limited.headers["retry-after"]) >= 1
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
