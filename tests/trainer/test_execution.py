"""The HumanEval sandbox runs code in a subprocess and refuses or limits what it must."""

from __future__ import annotations

import os
import socket
import threading

import pytest
from nanorun.trainer.execution import execute_code, network_isolation_prefix


def test_successful_code_returns_its_output():
    result = execute_code("print(6 * 7)")
    assert result.success and result.stdout.strip() == "42" and result.returncode == 0


def test_failing_code_reports_the_exception():
    result = execute_code("assert 1 == 2, 'nope'")
    assert not result.success and "AssertionError: nope" in result.error


def test_infinite_loop_is_killed_at_the_timeout():
    result = execute_code("while True:\n    pass\n", timeout=1.0)
    assert not result.success and result.timed_out and result.error == "timed out"


def test_child_processes_are_killed_with_the_program():
    code = "import subprocess, sys\nsubprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'])\nwhile True: pass\n"
    result = execute_code(code, timeout=1.0)
    assert result.timed_out


def test_memory_blowup_hits_the_memory_limit():
    result = execute_code("x = bytearray(1024 * 1024 * 1024)\nprint('allocated')", memory_mb=256)
    assert not result.success and result.memory_exceeded and "allocated" not in result.stdout


def test_environment_is_scrubbed(monkeypatch):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "top-secret")
    monkeypatch.setenv("HF_TOKEN", "hf_secret")
    result = execute_code("import os, json; print(json.dumps(dict(os.environ)))")
    assert result.success
    assert "top-secret" not in result.stdout and "hf_secret" not in result.stdout
    assert set(eval(result.stdout)) <= {"PATH", "LANG", "HOME", "TMPDIR", "LC_CTYPE"}


def test_code_runs_in_a_temporary_directory_that_is_removed():
    result = execute_code("import os; open('out.txt', 'w').write('x'); print(os.getcwd())")
    workdir = result.stdout.strip()
    assert result.success and workdir != os.getcwd() and not os.path.exists(workdir)


@pytest.mark.skipif(not network_isolation_prefix(), reason="this OS does not allow network namespaces here")
def test_network_is_unreachable_from_the_sandbox():
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    port = server.getsockname()[1]
    threading.Thread(target=lambda: server.accept(), daemon=True).start()
    code = (
        f"import socket\ns = socket.create_connection(('127.0.0.1', {port}), timeout=2)\nprint('connected')"
    )
    try:
        inside = execute_code(code)
        outside = execute_code(code, isolate_network=False)  # the same code reaches it without isolation
    finally:
        server.close()
    assert outside.success and "connected" in outside.stdout
    assert not inside.success and inside.network_isolated and "connected" not in inside.stdout
