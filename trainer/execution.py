"""Run untrusted, model-written Python (HumanEval) in a subprocess with limits.

    result = execute_code("print(1 + 1)", timeout=5.0, memory_mb=256)
    result.success, result.stdout, result.timed_out, result.memory_exceeded, result.network_isolated

What the child gets:
- a fresh temporary directory as its working directory and HOME (deleted afterwards);
- a scrubbed environment: only PATH, LANG, HOME and TMPDIR (no credentials, no AWS_* or HF_TOKEN);
- `python -I` (isolated mode: no PYTHON* variables, no user site-packages);
- resource limits: address space (`memory_mb`), CPU seconds, size of files it may write, no core
  dumps; and a wall-clock timeout after which its whole process group is killed;
- no network where the OS allows it: a new network namespace via `unshare -n` (as root) or
  `unshare -rn` (an unprivileged user namespace). When neither works (some containers forbid
  namespaces) the code still runs, and `network_isolated` is False so callers can say so.

This limits accidents (infinite loops, memory blow-ups, stray writes, a test that phones home); it is
not a security boundary against deliberately hostile code. Run evaluation in a throwaway pod.
"""

from __future__ import annotations

import os
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from functools import lru_cache

MAX_OUTPUT_CHARS = 10_000
MAX_FILE_BYTES = 16 * 1024 * 1024


@dataclass
class ExecutionResult:
    success: bool
    stdout: str
    stderr: str
    returncode: int | None
    timed_out: bool = False
    memory_exceeded: bool = False
    network_isolated: bool = False

    @property
    def error(self) -> str:
        if self.timed_out:
            return "timed out"
        if self.memory_exceeded:
            return "memory limit exceeded"
        return self.stderr.strip().splitlines()[-1] if self.stderr.strip() else ""


@lru_cache(maxsize=1)
def network_isolation_prefix() -> tuple[str, ...]:
    """The command prefix that starts a process without network, or () when the OS does not allow it."""
    unshare = shutil.which("unshare")
    if not unshare:
        return ()
    for prefix in ((unshare, "-n"), (unshare, "-r", "-n")):
        try:
            probe = subprocess.run([*prefix, "true"], capture_output=True, timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            continue
        if probe.returncode == 0:
            return prefix
    return ()


def _limits(memory_mb: int, cpu_seconds: int):
    def apply() -> None:
        memory = memory_mb * 1024 * 1024
        resource.setrlimit(resource.RLIMIT_AS, (memory, memory))
        resource.setrlimit(resource.RLIMIT_CPU, (cpu_seconds, cpu_seconds + 1))
        resource.setrlimit(resource.RLIMIT_FSIZE, (MAX_FILE_BYTES, MAX_FILE_BYTES))
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))

    return apply


def execute_code(
    code: str, timeout: float = 5.0, memory_mb: int = 256, isolate_network: bool = True
) -> ExecutionResult:
    """Run `code` as a Python program in the sandbox described above."""
    prefix = network_isolation_prefix() if isolate_network else ()
    workdir = tempfile.mkdtemp(prefix="nanorun-exec-")
    try:
        program = os.path.join(workdir, "program.py")
        with open(program, "w") as f:
            f.write(code)
        env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8", "HOME": workdir, "TMPDIR": workdir}
        proc = subprocess.Popen(
            [*prefix, sys.executable, "-I", program],
            cwd=workdir,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            start_new_session=True,  # its own process group, so a timeout kills any children too
            preexec_fn=_limits(memory_mb, max(1, int(timeout) + 1)),
        )
        timed_out = False
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            timed_out = True
            os.killpg(proc.pid, signal.SIGKILL)
            out, err = proc.communicate()
        stdout = out.decode(errors="replace")[:MAX_OUTPUT_CHARS]
        stderr = err.decode(errors="replace")[-MAX_OUTPUT_CHARS:]
        # CPU-limit kills (SIGXCPU) are timeouts too
        timed_out = timed_out or proc.returncode == -signal.SIGXCPU
        return ExecutionResult(
            success=proc.returncode == 0 and not timed_out,
            stdout=stdout,
            stderr=stderr,
            returncode=proc.returncode,
            timed_out=timed_out,
            memory_exceeded="MemoryError" in stderr,
            network_isolated=bool(prefix),
        )
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
