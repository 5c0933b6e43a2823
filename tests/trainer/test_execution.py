"""The HumanEval sandbox runs code in a subprocess, limits it, keeps the run's credentials and the
network from it, and refuses to run it where it cannot."""

from __future__ import annotations

import errno
import os
import platform
import socket
import subprocess
import sys
import threading
import types

import pytest
from nanorun.trainer.chat import execution
from nanorun.trainer.chat.execution import SandboxUnavailable, execute_code


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
        socket.create_connection(("127.0.0.1", port), timeout=2).close()  # reachable from here
        inside = execute_code(code)
    finally:
        server.close()
    assert not inside.success and inside.network_isolated and "connected" not in inside.stdout


# Model-written code that looks for the run's S3 key everywhere it could be, and tries to phone home.
SECRET = "s3-secret-do-not-leak"
CREDENTIAL_PROBE = """
import glob, os, socket
print("env", dict(os.environ))
paths = ["/proc/1/environ", f"/proc/{os.getppid()}/environ", "/proc/self/environ", *glob.glob("/proc/*/environ"),
         "@SECRET_FILE@", "/etc/creds/AWS_SECRET_ACCESS_KEY", os.path.expanduser("~/.aws/credentials"),
         "/root/.aws/credentials", "/var/run/secrets/kubernetes.io/serviceaccount/token"]
for path in filter(None, paths):
    try:
        print("read", path, open(path, "rb").read())
    except OSError as err:
        print("denied", path, type(err).__name__)
for family, address in [(socket.AF_INET, ("1.1.1.1", 80)), (socket.AF_INET, ("@S3_HOST@", int("@S3_PORT@"))),
                        (socket.AF_INET6, ("::1", 80))]:
    try:
        socket.socket(family, socket.SOCK_STREAM).connect(address)
        print("connected", address)
    except OSError as err:
        print("no socket", address, err)
try:
    socket.socket(socket.AF_INET, socket.SOCK_DGRAM).sendto(b"x", ("8.8.8.8", 53))
    print("sent udp")
except OSError as err:
    print("no udp", err)
print("uid", os.getuid())
"""


SYSTEM_PYTHON = "/usr/bin/python3"  # readable by nobody, unlike an interpreter under /root
OTHER_INTERPRETER = f"""
import importlib.util, sys, types
sys.modules["nanorun"] = types.ModuleType("nanorun")
sys.modules["nanorun.trainer"] = types.ModuleType("nanorun.trainer")
spec = importlib.util.spec_from_file_location("nanorun.trainer.chat.execution", {execution.__file__!r})
sys.modules[spec.name] = module = importlib.util.module_from_spec(spec)
spec.loader.exec_module(module)
"""


def run_trainer_process(
    script: str, tmp_path, deny_syscalls: dict[str, int] | None = None, python: str = sys.executable
) -> str:
    """Run `script` in a fresh process that has the key in its environment (so in /proc/<pid>/environ)
    and in a 0644 file, optionally under a seccomp filter that fails some syscalls, as a pod's would."""
    secret_file = tmp_path / "AWS_SECRET_ACCESS_KEY"
    secret_file.write_text(SECRET)
    secret_file.chmod(0o644)
    prelude = deny_prelude(deny_syscalls or {})
    if python != sys.executable:  # an interpreter without nanorun installed: load the module by path
        prelude = OTHER_INTERPRETER + prelude
    env = {**os.environ, "AWS_SECRET_ACCESS_KEY": SECRET, "SECRET_FILE": str(secret_file)}
    proc = subprocess.run(
        [python, "-c", prelude + script],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


SYSCALLS = {
    "x86_64": {"unshare": 272, "landlock_create_ruleset": 444},
    "aarch64": {"unshare": 97, "landlock_create_ruleset": 444},
}


# A seccomp filter that fails the given syscalls ({number: errno}), as a pod's profile may: run first
# in the trainer process, as `DENY_SYSCALLS + f"deny_syscalls({...})"`.
DENY_SYSCALLS = """
import ctypes, struct
from nanorun.trainer.chat import execution


def deny_syscalls(deny):
    ld, jeq, ret = 0x20, 0x15, 0x06
    program = [(ld, 0, 0, 0)]
    for nr, error in deny.items():
        program += [(jeq, 0, 1, nr), (ret, 0, 0, 0x00050000 | error)]
    program.append((ret, 0, 0, 0x7FFF0000))
    buf = ctypes.create_string_buffer(b"".join(struct.pack("<HBBI", *insn) for insn in program))
    assert execution._prctl(execution.PR_SET_NO_NEW_PRIVS, 1) == 0
    fprog = struct.pack("<HxxxxxxQ", len(program), ctypes.addressof(buf))
    assert execution._prctl(execution.PR_SET_SECCOMP, execution.SECCOMP_MODE_FILTER, fprog) == 0
"""


def deny_prelude(deny_syscalls: dict[str, int]) -> str:
    numbers = {SYSCALLS[platform.machine()][name]: error for name, error in deny_syscalls.items()}
    return DENY_SYSCALLS + f"deny_syscalls({numbers!r})\n" if numbers else ""


ATTACK = f"""
import os
from nanorun.trainer.chat.execution import execute_code, sandbox
code = {CREDENTIAL_PROBE!r}.replace("@SECRET_FILE@", os.environ["SECRET_FILE"])
code = code.replace("@S3_HOST@", os.environ.get("S3_HOST", "127.0.0.1")).replace("@S3_PORT@", "9000")
result = execute_code(code, timeout=20)
print("LAYERS", sandbox().layers)
print(result.stdout, result.stderr)
"""


REFUSAL = """
from nanorun.trainer.chat.execution import SandboxUnavailable, execute_code
try:
    execute_code("open('ran', 'w'); print('ran')")
except SandboxUnavailable as err:
    print("REFUSED", err)
"""


def assert_nothing_leaked(out: str) -> None:
    assert "LAYERS" in out and "env {'PATH'" in out, out
    assert SECRET not in out, out
    assert "read " not in out, out  # no file, /proc entry or token could be opened
    assert "connected" not in out and "sent udp" not in out, out


def test_model_code_finds_no_credentials_and_no_network(tmp_path):
    out = run_trainer_process(ATTACK, tmp_path)
    assert_nothing_leaked(out)
    for path in ("/proc/1/environ", "/proc/self/environ", str(tmp_path / "AWS_SECRET_ACCESS_KEY")):
        assert f"denied {path} PermissionError" in out, out


@pytest.mark.skipif(
    os.geteuid() != 0 or not os.path.exists(SYSTEM_PYTHON), reason="needs root and /usr/bin/python3"
)
def test_as_root_the_code_runs_as_nobody(tmp_path):
    out = run_trainer_process(ATTACK, tmp_path, python=SYSTEM_PYTHON)
    assert_nothing_leaked(out)
    assert "'uid 65534'" in out.split("LAYERS", 1)[1].splitlines()[0] and "\nuid 65534\n" in out, out


def test_without_namespaces_landlock_and_seccomp_still_hold(tmp_path):
    # A pod without CAP_SYS_ADMIN and without user namespaces: unshare fails.
    out = run_trainer_process(ATTACK, tmp_path, deny_syscalls={"unshare": errno.EPERM})
    assert_nothing_leaked(out)
    layers = out.split("LAYERS", 1)[1].splitlines()[0]
    assert "netns" not in layers and "landlock" in layers and "seccomp" in layers


def test_without_landlock_the_code_is_never_run(tmp_path):
    # A kernel without Landlock, or a container whose seccomp profile does not know it.
    out = run_trainer_process(REFUSAL, tmp_path, deny_syscalls={"landlock_create_ruleset": errno.ENOSYS})
    assert "REFUSED model-written code is not run: Landlock is not available" in out and "\nran\n" not in out


def test_humaneval_is_skipped_with_the_reason_when_there_is_no_sandbox(monkeypatch, capsys):
    from nanorun.trainer import chat_eval
    from nanorun.trainer.tasks import humaneval

    def unavailable():
        raise SandboxUnavailable("Landlock is not available (Function not implemented)")

    monkeypatch.setattr(humaneval, "sandbox", unavailable)
    ctx = types.SimpleNamespace(run_dir="/nonexistent", print0=print)
    tasks, skipped = chat_eval.load_tasks(ctx, ["HumanEval"])
    assert tasks == {} and skipped == {"HumanEval": "Landlock is not available (Function not implemented)"}
    assert "skipping HumanEval: model-written code is not run: Landlock" in capsys.readouterr().out
