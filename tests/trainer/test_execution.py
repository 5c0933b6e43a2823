"""The HumanEval sandbox runs code in a subprocess, limits it, keeps the run's credentials and the
network from it, leaves no process behind, and refuses to run it where it cannot."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import platform
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import types
import uuid

import pytest
from nanorun.trainer.chat import execution
from nanorun.trainer.chat.execution import SandboxUnavailable, execute_code


def test_successful_code_returns_its_output():
    result = execute_code("print(6 * 7)")
    assert result.success and result.stdout.strip() == "42" and result.returncode == 0


def test_failing_code_reports_the_exception():
    result = execute_code("assert 1 == 2, 'nope'")
    assert not result.success and "AssertionError: nope" in result.error


def test_infinite_loop_is_killed_at_the_timeout(marker):
    result = execute_code(in_marked_process(marker, "while True:\n    pass\n"), timeout=1.0)
    assert not result.success and result.timed_out and result.error == "timed out"
    assert marked_processes(marker) == []  # killed, not left spinning


def test_child_processes_are_killed_with_the_program(marker):
    code = (
        "import subprocess, sys\n"
        f"subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)', {marker!r}])\n"
        "print('started', flush=True)\nwhile True: pass\n"
    )
    result = execute_code(in_marked_process(marker, code), timeout=1.0)
    assert result.timed_out and result.stdout == "started\n", result
    assert marked_processes(marker) == []  # the program and the child it started


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
    "x86_64": {"unshare": 272, "landlock_create_ruleset": 444, "seccomp": 317},
    "aarch64": {"unshare": 97, "landlock_create_ruleset": 444, "seccomp": 277},
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


def test_a_layer_that_cannot_be_set_up_is_refused_by_name(tmp_path):
    # A seccomp profile that forbids installing a filter: the launcher refuses instead of running without it.
    out = run_trainer_process(REFUSAL, tmp_path, deny_syscalls={"seccomp": errno.EPERM})
    assert "REFUSED model-written code is not run: " in out and "seccomp: Operation not permitted" in out, out
    assert "\nran\n" not in out


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


# ---------------------------------------------------------------- processes, per uid

# The ways the launcher runs the program as root (keeping uid 0 where nobody cannot read the
# interpreter; as nobody) and as the trainer image's uid 10001, each from a process of its own with a
# secret in its environment. Without root, only the current uid.
NON_ROOT = 10001
MODES = ["root keeps uid 0", "root as nobody", f"uid {NON_ROOT}"] if os.geteuid() == 0 else ["own uid"]
MODE_SECRET = "mode-secret-do-not-leak"

RUN = """
import json, os, sys, time
code = sys.argv[1].replace("@TRAINER_PID@", str(os.getpid()))
start = time.monotonic()
result, layers = module._run(code, float(sys.argv[2]), 256, sys.argv[3] == "drop uid")
print(json.dumps({**vars(result), "layers": layers, "seconds": time.monotonic() - start}))
"""


def run_as(mode: str, code: str, timeout: float) -> dict:
    """Run `code` in the sandbox from a process of the given mode; the result's fields, its layers and
    the seconds `_run` took."""
    python = sys.executable
    command = []
    if mode != "own uid":
        if not os.access(SYSTEM_PYTHON, os.X_OK) or not shutil.which("setpriv"):
            pytest.skip(f"needs {SYSTEM_PYTHON} and setpriv")
        python = SYSTEM_PYTHON
    if mode == f"uid {NON_ROOT}":
        command = ["setpriv", f"--reuid={NON_ROOT}", f"--regid={NON_ROOT}", "--clear-groups"]
    drop = "drop uid" if mode == "root as nobody" else "keep uid"
    command += [python, "-c", OTHER_INTERPRETER + RUN, code, str(timeout), drop]
    env = {**os.environ, "NANORUN_TEST_SECRET": MODE_SECRET}
    proc = subprocess.run(command, env=env, capture_output=True, text=True, timeout=120, cwd="/")
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert ("uid 65534" in result["layers"]) == (mode == "root as nobody"), result
    return result


def marked_processes(marker: str) -> list[int]:
    """The processes with `marker` in their command line."""
    found = []
    for name in os.listdir("/proc"):
        try:
            with open(f"/proc/{name}/cmdline", "rb") as f:
                if marker.encode() in f.read():
                    found.append(int(name))
        except (OSError, ValueError):
            continue
    return found


@pytest.fixture
def marker():
    """A string for the command line of the program's processes, to find any that survive the run."""
    mark = f"nanorun-sandbox-test-{uuid.uuid4().hex}"
    yield mark
    for pid in marked_processes(mark):  # a failed test leaves nothing behind either
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGKILL)


def in_marked_process(marker: str, code: str) -> str:
    """A program that replaces itself by `code` run with `marker` in its command line."""
    return f"import os, sys\nos.execv(sys.executable, [sys.executable, '-c', {code!r}, {marker!r}])\n"


SLEEPER = "import time; time.sleep(30)"
# A fork bomb: every process announces itself on stdout and forks until it has four children (the
# tree stops at depth 4, 341 processes, should the bound fail), retrying each failed fork.
FORK_BOMB = """
import os, time
depth = children = 0
os.write(1, b"+")
while True:
    if depth < 4 and children < 4:
        try:
            pid = os.fork()
        except OSError:
            time.sleep(0.01)
            continue
        if pid == 0:
            depth, children = depth + 1, 0
            os.write(1, b"+")
        else:
            children += 1
    else:
        time.sleep(0.1)
"""
FORK_UP_TO = 4 * execution.MAX_PROCESSES
# The limit is the uid's tasks at launch plus MAX_PROCESSES; tasks of the uid that end meanwhile (other
# processes on this machine) give a little more room.
FORK_BOUND = execution.MAX_PROCESSES * 3 // 2
FORK_COUNT = f"""
import os, time
forked = 0
while forked < {FORK_UP_TO}:
    try:
        pid = os.fork()
    except OSError:
        break
    if pid == 0:
        time.sleep(30)
        os._exit(0)
    forked += 1
print("forked", forked, flush=True)
"""


@pytest.mark.parametrize("mode", MODES)
def test_a_fork_bomb_is_contained_and_leaves_nothing_behind(mode, marker):
    result = run_as(mode, in_marked_process(marker, FORK_BOMB), timeout=2.0)
    assert result["timed_out"] and result["seconds"] < 2.0 + 15, result
    assert 0 < result["stdout"].count("+") <= FORK_BOUND, result
    assert marked_processes(marker) == []


@pytest.mark.parametrize("mode", MODES)
def test_the_program_adds_a_bounded_number_of_processes(mode, marker):
    result = run_as(mode, in_marked_process(marker, FORK_COUNT), timeout=20.0)
    forked = int(result["stdout"].split()[-1])
    assert 0 < forked <= FORK_BOUND < FORK_UP_TO, result
    assert result["success"] and result["seconds"] < 15.0, result  # the sleeping children did not wait
    assert marked_processes(marker) == []


def escapes(marker: str) -> str:
    """A program that leaves sleepers in a new session, a new process group and a daemon, then sleeps."""
    return f"""
import os, subprocess, sys
sleeper = [sys.executable, "-c", {SLEEPER!r}, {marker!r}]
subprocess.Popen(sleeper, start_new_session=True)  # setsid()
if os.fork() == 0:  # its own process group
    os.setpgid(0, 0)
    os.execv(sys.executable, sleeper)
if os.fork() == 0:  # a daemon: a new session, and its parent gone
    os.setsid()
    if os.fork() == 0:
        os.execv(sys.executable, sleeper)
    os._exit(0)
os.execv(sys.executable, sleeper)
"""


def holder(marker: str) -> str:
    """A program that leaves a sleeper holding its stdout open, and exits."""
    return f"""
import subprocess, sys
subprocess.Popen([sys.executable, "-c", {SLEEPER!r}, {marker!r}], start_new_session=True)  # inherits stdout
print("done", flush=True)
"""


@pytest.mark.parametrize("mode", MODES)
def test_setsid_setpgid_and_daemons_are_killed_at_the_timeout(mode, marker):
    result = run_as(mode, escapes(marker), timeout=1.5)
    assert result["timed_out"] and result["seconds"] < 1.5 + 15, result
    assert marked_processes(marker) == []


@pytest.mark.parametrize("mode", MODES)
def test_a_grandchild_holding_the_output_open_does_not_hold_the_result(mode, marker):
    result = run_as(mode, holder(marker), timeout=3.0)
    assert result["success"] and result["stdout"] == "done\n", result
    assert result["seconds"] < 3.0 + 15, result
    assert marked_processes(marker) == []


# The same programs for a pod (tests/kube/test_execution_pod.py), through execute_code as the pod allows:
# per program a line `ESCAPE <name> timed_out=<bool> announced=<processes> survivors=<n> seconds=<s>`.
POD_PROGRAMS = [
    ("fork bomb", "nanorun-pod-fork-bomb", in_marked_process("nanorun-pod-fork-bomb", FORK_BOMB), 2.0),
    ("escapes", "nanorun-pod-escapes", escapes("nanorun-pod-escapes"), 1.5),
    ("holder", "nanorun-pod-holder", holder("nanorun-pod-holder"), 3.0),
]
ESCAPES = """
import os, time
from nanorun.trainer.chat.execution import execute_code


def ancestors():
    # This process and those above it: their command lines hold the markers as text.
    pids, pid = set(), os.getpid()
    while pid > 0 and pid not in pids:
        pids.add(pid)
        with open(f"/proc/{pid}/stat") as f:
            pid = int(f.read().rsplit(")", 1)[1].split()[1])
    return pids


def marked(marker):
    found = 0
    mine = ancestors()
    for name in os.listdir("/proc"):
        if not name.isdigit() or int(name) in mine:
            continue
        try:
            with open(f"/proc/{name}/cmdline", "rb") as f:
                found += marker.encode() in f.read()
        except OSError:
            continue
    return found


for name, marker, code, timeout in PROGRAMS:
    start = time.monotonic()
    result = execute_code(code, timeout=timeout)
    print("ESCAPE", name, f"timed_out={result.timed_out}", f"announced={result.stdout.count('+')}",
          f"survivors={marked(marker)}", f"seconds={time.monotonic() - start:.1f}", flush=True)
""".replace("PROGRAMS", repr(POD_PROGRAMS))


@pytest.mark.parametrize("mode", MODES)
def test_the_token_file_and_the_environment_stay_hidden(mode):
    # A file standing in for /var/run/secrets/kubernetes.io/serviceaccount/token, readable by every uid,
    # so that only the sandbox keeps it from the program.
    secrets = tempfile.mkdtemp(prefix="nanorun-serviceaccount-")
    try:
        os.chmod(secrets, 0o755)
        token = os.path.join(secrets, "token")
        with open(token, "w") as f:
            f.write(MODE_SECRET)
        os.chmod(token, 0o644)
        code = f"""
import os
print("env", dict(os.environ))
for path in [{token!r}, "/proc/@TRAINER_PID@/environ", f"/proc/{{os.getppid()}}/environ"]:
    try:
        print("read", path, open(path).read())
    except OSError as err:
        print("denied", path, type(err).__name__)
"""
        result = run_as(mode, code, timeout=10.0)
    finally:
        shutil.rmtree(secrets)
    out = result["stdout"]
    assert result["success"] and "env {" in out and f"denied {token} PermissionError" in out, result
    assert MODE_SECRET not in out and "read " not in out, result


@pytest.mark.parametrize("mode", MODES)
def test_the_program_cannot_signal_or_limit_its_supervisor_or_the_trainer(mode):
    code = """
import os, resource, signal
for name, pid in [("supervisor", os.getppid()), ("trainer", @TRAINER_PID@), ("self", os.getpid())]:
    for what, call in [("signal", lambda: os.kill(pid, 0)), ("prlimit", lambda: resource.prlimit(pid, resource.RLIMIT_NOFILE))]:
        try:
            call()
            print(what, name, "allowed")
        except OSError as err:
            print(what, name, "denied", type(err).__name__)
"""
    result = run_as(mode, code, timeout=10.0)
    out = result["stdout"]
    for what in ("signal", "prlimit"):
        for name in ("supervisor", "trainer"):
            assert f"{what} {name} denied PermissionError" in out, result
        assert f"{what} self allowed" in out, result


# ---------------------------------------------------------------- the seccomp filter, instruction by instruction


def run_bpf(program: bytes, nr: int, arch: int, *args: int) -> int:
    """What a classic-BPF seccomp program returns for one syscall: a small interpreter of the
    instructions the filter uses, on a `struct seccomp_data` (nr, arch, instruction pointer, args)."""
    data = struct.pack("<IIQ6Q", nr, arch, 0, *(list(args) + [0] * (6 - len(args))))
    pc, acc = 0, 0
    while True:
        code, jt, jf, k = struct.unpack_from("<HBBI", program, 8 * pc)
        pc += 1
        if code == 0x20:  # BPF_LD | BPF_W | BPF_ABS
            acc = struct.unpack_from("<I", data, k)[0]
        elif code == 0x15:  # BPF_JMP | BPF_JEQ | BPF_K
            pc += jt if acc == k else jf
        elif code == 0x35:  # BPF_JMP | BPF_JGE | BPF_K
            pc += jt if acc >= k else jf
        elif code == 0x06:  # BPF_RET | BPF_K
            return k
        else:
            raise AssertionError(f"opcode {code:#x} is not one the filter should use")


ALLOW, EPERM = 0x7FFF0000, 0x00050001
AF_INET, AF_UNIX, X32 = 2, 1, 0x40000000
AUDIT_ARCH_I386, AUDIT_ARCH_ARM = 0x40000003, 0x40000028


def test_the_seccomp_filter_refuses_x32_and_other_abis_inet_sockets_and_io_uring():
    arch, own = 0xC000003E, 4242
    bpf = execution.seccomp_filter("x86_64", own, unix_sockets=True)
    socket_, read, io_uring_setup = 41, 0, 425
    assert run_bpf(bpf, socket_, arch, AF_INET) == EPERM
    assert run_bpf(bpf, socket_ | X32, arch, AF_INET) == EPERM  # x32 socket(): the x32 bit is not masked away
    assert run_bpf(bpf, socket_ | X32, arch, AF_UNIX) == EPERM  # no x32 syscall at all
    assert run_bpf(bpf, read | X32, arch) == EPERM
    assert run_bpf(bpf, socket_, arch, AF_UNIX) == ALLOW
    assert run_bpf(bpf, socket_, arch, AF_UNIX | 1 << 32) == ALLOW  # the kernel reads an int
    assert run_bpf(bpf, socket_, arch, AF_INET | 1 << 32) == EPERM
    assert run_bpf(bpf, io_uring_setup, arch) == EPERM
    assert run_bpf(bpf, read, arch) == ALLOW
    assert run_bpf(bpf, 102, AUDIT_ARCH_I386, 1) == EPERM  # i386 socketcall(SYS_SOCKET, ...)
    assert run_bpf(bpf, 3, AUDIT_ARCH_I386) == EPERM  # i386 read
    no_unix = execution.seccomp_filter("x86_64", own, unix_sockets=False)
    assert run_bpf(no_unix, socket_, arch, AF_UNIX) == EPERM and run_bpf(no_unix, read, arch) == ALLOW


def test_the_seccomp_filter_refuses_signals_prlimit_and_uid_changes_beyond_the_program():
    for machine, arch, kill, tgkill, pidfd_open, prlimit64, setresuid in [
        ("x86_64", 0xC000003E, 62, 234, 434, 302, 117),
        ("aarch64", 0xC00000B7, 129, 131, 434, 261, 147),
    ]:
        own = 4242
        bpf = execution.seccomp_filter(machine, own, unix_sockets=True)
        assert run_bpf(bpf, kill, arch, own, signal.SIGTERM) == ALLOW
        for target in (1, own - 1, 0, -1 & 0xFFFFFFFF, -own & 0xFFFFFFFF):  # others, its group, everyone
            assert run_bpf(bpf, kill, arch, target, signal.SIGKILL) == EPERM, (machine, target)
        assert run_bpf(bpf, tgkill, arch, own, own, signal.SIGABRT) == ALLOW
        assert run_bpf(bpf, tgkill, arch, 1, 1, signal.SIGKILL) == EPERM
        assert run_bpf(bpf, pidfd_open, arch, 1) == EPERM and run_bpf(bpf, pidfd_open, arch, own) == ALLOW
        assert run_bpf(bpf, prlimit64, arch, 0) == ALLOW and run_bpf(bpf, prlimit64, arch, own) == ALLOW
        assert run_bpf(bpf, prlimit64, arch, 1) == EPERM
        assert run_bpf(bpf, setresuid, arch, 0, 0, 0) == EPERM
        assert run_bpf(bpf, 198 if machine == "aarch64" else 41, arch, AF_INET) == EPERM
        assert run_bpf(bpf, 198 if machine == "aarch64" else 41, AUDIT_ARCH_ARM, AF_UNIX) == EPERM
