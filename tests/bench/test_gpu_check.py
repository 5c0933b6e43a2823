"""bench/gpu_check.py runs the trainer's and the engine's GPU paths on a GPU. Here the same code
runs with --smoke on CPU (tiny sizes), so every line a GPU will run has run, and its checks hold."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "bench" / "gpu_check.py"


def run(*args: str) -> subprocess.CompletedProcess:
    env = {"CUDA_VISIBLE_DEVICES": "", "PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "2"}
    return subprocess.run(
        [sys.executable, str(SCRIPT), *args], capture_output=True, text=True, env=env, timeout=600
    )


def test_without_cuda_it_says_so_and_exits_0():
    out = run()
    assert out.returncode == 0, out.stderr
    assert "no CUDA device on this machine" in out.stdout


@pytest.mark.slow
def test_the_smoke_run_trains_compares_fp8_resumes_bit_exactly_and_decodes():
    out = run("--smoke")
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["benchmark"] == "gpu_check" and result["ok"] is True
    assert [t["depth"] for t in result["train"]] == [2, 3]
    for t in result["train"]:
        assert t["tokens_per_second"] > 0 and t["device_batch"] == 4 and t["compile_seconds"] > 0
    fp8 = result["fp8"]
    assert fp8["linears_in_fp8"] > 0 and len(fp8["fp8_losses"]) == len(fp8["baseline_losses"]) == 3
    assert fp8["max_abs_diff"] < 0.05  # emulated FP8 on CPU: close to the full-precision losses
    resume = result["resume"]
    assert resume["bit_exact"] is True and resume["straight"] == resume["resumed"]
    assert [d["batch"] for d in result["decode"]] == [1, 4]
    assert all(d["tokens_per_second"] > 0 for d in result["decode"])
