"""Run untrusted, model-written Python (HumanEval) so that it cannot reach the run's credentials.

    result = execute_code("print(1 + 1)", timeout=5.0, memory_mb=256)
    result.success, result.stdout, result.timed_out, result.memory_exceeded, result.network_isolated

The code runs where training runs: in a pod, usually as root but without CAP_SYS_ADMIN, next to
`AWS_SECRET_ACCESS_KEY` in the environment of the trainer and of PID 1, a Secret volume (files mode
0644 by default) and the service-account token. So the sandbox cannot rest on namespaces alone. The
parent starts this file as a small launcher (`python -I -S execution.py CONFIG`), which confines
itself step by step and then execs `python -I program.py`:

1. scrubbed environment (PATH, LANG, HOME, TMPDIR only), no inherited descriptors (`close_fds`,
   then every descriptor above 2 closed), its own session (a timeout kills the whole group);
2. resource limits: address space (`memory_mb`), CPU seconds, written file size, open files, no
   core dumps; and, under a dropped uid, at most `MAX_PROCESSES` processes;
3. as root: uid/gid 65534 (nobody) with no supplementary groups, so no capabilities and no access to
   root's 0600/0700 files or to `/proc/<pid>/environ` of root processes (when the interpreter is
   readable by nobody; otherwise the probe falls back to the same uid, protected by step 4);
4. Landlock (Linux >= 5.13, unprivileged): the program may read only the Python installation,
   `/usr`, `/lib*`, a few files of `/etc` and `/dev`, and its own working directory; everything else
   (`/proc`, Secret volumes, `/var/run/secrets`, home directories) is denied, as are ptrace, signals
   and abstract unix sockets outside the sandbox (ABI >= 6) and mounts. REQUIRED: without it the
   launcher refuses to run the code;
5. no network where the kernel allows: a new network namespace (CAP_SYS_ADMIN, or an unprivileged
   user namespace), Landlock's TCP rules (ABI >= 4), and a seccomp filter that makes every
   `socket()` other than AF_UNIX, and io_uring, fail with EPERM (x86-64 and arm64).

`sandbox()` probes this once per process. When the required layers cannot be had (no Landlock, or
a seccomp profile that forbids it), `SandboxUnavailable` says why, `execute_code` raises it rather
than running anything, and HumanEval is skipped with that message. tests/kube/test_execution_pod.py
checks, inside a pod, that the code sees no key in its environment, `/proc` or the Secret volume, and
cannot open a socket.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import platform
import resource
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from functools import lru_cache

MAX_OUTPUT_CHARS = 10_000
MAX_FILE_BYTES = 16 * 1024 * 1024
MAX_OPEN_FILES = 256
MAX_PROCESSES = 64
NOBODY = 65534
REFUSED_EXIT = 125  # the launcher's exit status when it would not run the code
REFUSED_MARK = "nanorun sandbox refused:"
SAFE_ENV_PATH = "/usr/local/bin:/usr/bin:/bin"

# What the program may read besides the Python installation and its working directory.
SYSTEM_READ_PATHS = ("/usr", "/lib", "/lib64", "/lib32", "/bin", "/etc/ld.so.cache", "/etc/localtime")
DEVICES = ("/dev/null", "/dev/zero", "/dev/urandom", "/dev/random")


class SandboxUnavailable(RuntimeError):
    """The code cannot be run without exposing credentials; `reason` is the one-line version."""

    def __init__(self, reason: str):
        super().__init__(f"model-written code is not run: {reason}")
        self.reason = reason


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


@dataclass(frozen=True)
class Sandbox:
    """What the probe found this environment allows."""

    drop_uid: bool  # run as nobody (root only, and only if nobody can read the interpreter)
    layers: tuple[str, ...]  # as the launcher reported them, e.g. ("uid 65534", "landlock abi 6", ...)

    @property
    def network_isolated(self) -> bool:
        return _network_isolated(self.layers)


def _network_isolated(layers) -> bool:
    return any(layer.startswith(("netns", "seccomp")) for layer in layers)


# ---------------------------------------------------------------- the launcher (runs in the child)

_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long
PR_SET_NO_NEW_PRIVS, PR_SET_SECCOMP, SECCOMP_MODE_FILTER = 38, 22, 2
CLONE_NEWNET, CLONE_NEWUSER = 0x40000000, 0x10000000
PR_CAPBSET_DROP, CAPABILITY_V3 = 24, 0x20080522
LANDLOCK_CREATE_RULESET, LANDLOCK_ADD_RULE, LANDLOCK_RESTRICT_SELF = 444, 445, 446  # same on all arches
FS_EXECUTE, FS_WRITE_FILE, FS_READ_FILE, FS_READ_DIR, FS_TRUNCATE = 1, 1 << 1, 1 << 2, 1 << 3, 1 << 14
FS_FILE_RIGHTS = FS_EXECUTE | FS_WRITE_FILE | FS_READ_FILE | FS_TRUNCATE  # what a rule on a file may hold
# (audit arch, socket, io_uring_setup) per machine, for the seccomp filter
SECCOMP_ARCH = {"x86_64": (0xC000003E, 41, 425), "aarch64": (0xC00000B7, 198, 425)}


class _Refused(Exception):
    pass


def _syscall(nr: int, *args: int | bytes | None) -> int:
    return _libc.syscall(ctypes.c_long(nr), *(ctypes.c_long(a) if isinstance(a, int) else a for a in args))


def _prctl(option: int, *args: int | bytes) -> int:
    args = args + (0,) * (4 - len(args))
    return _libc.prctl(ctypes.c_int(option), *(ctypes.c_ulong(a) if isinstance(a, int) else a for a in args))


def _check(ret: int, what: str) -> int:
    if ret < 0:
        raise _Refused(f"{what}: {os.strerror(ctypes.get_errno())}")
    return ret


def _landlock(read_paths: list[str], write_paths: list[str]) -> str:
    """Deny every filesystem access outside the given paths, TCP, and reaching outside processes."""
    abi = _syscall(LANDLOCK_CREATE_RULESET, None, 0, 1)  # 1: LANDLOCK_CREATE_RULESET_VERSION
    if abi < 1:
        raise _Refused(
            f"Landlock is not available ({os.strerror(ctypes.get_errno())}); it needs Linux >= 5.13 "
            "with landlock in the kernel's lsm= list, and a seccomp profile that allows its syscalls"
        )
    # every right this ABI knows is handled, so all that no rule allows is denied (refer 2, truncate 3, ioctl 5)
    fs_all = (
        (1 << 13) - 1
        | (1 << 13 if abi >= 2 else 0)
        | (FS_TRUNCATE if abi >= 3 else 0)
        | (1 << 15 if abi >= 5 else 0)
    )
    attr = struct.pack("<QQQ", fs_all, 0b11 if abi >= 4 else 0, 0b11 if abi >= 6 else 0)  # fs, tcp, scopes
    size = 8 if abi < 4 else 16 if abi < 6 else 24
    ruleset = _check(_syscall(LANDLOCK_CREATE_RULESET, attr, size, 0), "landlock_create_ruleset")
    read = FS_EXECUTE | FS_READ_FILE | FS_READ_DIR
    for path, rights in [(p, read) for p in read_paths] + [(p, fs_all) for p in write_paths]:
        try:
            fd = os.open(path, os.O_PATH | os.O_CLOEXEC)
        except FileNotFoundError:
            continue
        if not os.path.isdir(path):
            rights &= FS_FILE_RIGHTS
        rule = struct.pack("<Qi", rights & fs_all, fd)  # struct landlock_path_beneath_attr (packed)
        added = _syscall(LANDLOCK_ADD_RULE, ruleset, 1, rule, 0)  # 1: LANDLOCK_RULE_PATH_BENEATH
        _check(added, f"landlock_add_rule {path}")
        os.close(fd)
    _check(_prctl(PR_SET_NO_NEW_PRIVS, 1), "no_new_privs")
    _check(_syscall(LANDLOCK_RESTRICT_SELF, ruleset, 0), "landlock_restrict_self")
    os.close(ruleset)
    return f"landlock abi {abi}"


def _seccomp_without_sockets() -> str | None:
    """A filter that fails socket() for every family but AF_UNIX, and io_uring, with EPERM."""
    arch = SECCOMP_ARCH.get(platform.machine())
    if arch is None:
        return None
    audit_arch, nr_socket, nr_io_uring = arch
    ld, jeq, ret = 0x20, 0x15, 0x06  # BPF_LD|W|ABS, BPF_JMP|JEQ|K, BPF_RET|K
    allow, eperm = 0x7FFF0000, 0x00050000 | 1
    program = [
        (ld, 0, 0, 4),
        (jeq, 1, 0, audit_arch),
        (ret, 0, 0, eperm),  # another ABI (i386 on x86-64): nothing
        (ld, 0, 0, 0),
        (jeq, 3, 0, nr_io_uring),
        (jeq, 0, 3, nr_socket),
        (ld, 0, 0, 16),
        (jeq, 1, 0, 1),  # socket(AF_UNIX, ...) is allowed
        (ret, 0, 0, eperm),
        (ret, 0, 0, allow),
    ]
    filters = b"".join(struct.pack("<HBBI", *insn) for insn in program)
    buf = ctypes.create_string_buffer(filters)
    fprog = struct.pack("<HxxxxxxQ", len(program), ctypes.addressof(buf))
    _check(_prctl(PR_SET_NO_NEW_PRIVS, 1), "no_new_privs")
    _check(_prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, fprog), "seccomp")
    return "seccomp: no inet sockets"


def _drop_capabilities() -> str:
    """Root that stays root (nobody cannot read the interpreter) keeps no capability, now or after exec."""
    for cap in range(64):
        if _prctl(PR_CAPBSET_DROP, cap) < 0 and ctypes.get_errno() != 22:  # EINVAL: past the last capability
            raise _Refused(f"dropping capability {cap}: {os.strerror(ctypes.get_errno())}")
    header, data = struct.pack("<Ii", CAPABILITY_V3, 0), bytes(24)  # effective, permitted, inheritable = 0
    _check(_libc.capset(header, data), "capset")
    return "no capabilities"


def _launch(config: dict) -> None:
    """Confine this process as the module docstring lists, report the layers, exec the program."""
    layers = []
    memory = config["memory_mb"] * 1024 * 1024
    for limit, value in [
        (resource.RLIMIT_AS, memory),
        (resource.RLIMIT_CPU, config["cpu_seconds"]),
        (resource.RLIMIT_FSIZE, MAX_FILE_BYTES),
        (resource.RLIMIT_CORE, 0),
        (resource.RLIMIT_NOFILE, MAX_OPEN_FILES),
    ]:
        resource.setrlimit(limit, (value, value + 1 if limit == resource.RLIMIT_CPU else value))
    if _libc.unshare(ctypes.c_int(CLONE_NEWNET)) == 0:  # needs CAP_SYS_ADMIN: rarely in a pod
        layers.append("netns")
    if config["drop_uid"]:
        resource.setrlimit(resource.RLIMIT_NPROC, (MAX_PROCESSES, MAX_PROCESSES))  # counts nobody's processes
        os.setgroups([])
        os.setgid(NOBODY)
        os.setuid(NOBODY)
        layers.append(f"uid {NOBODY}")
    elif os.geteuid() == 0:
        layers.append(_drop_capabilities())
    if "netns" not in layers and _libc.unshare(ctypes.c_int(CLONE_NEWUSER | CLONE_NEWNET)) == 0:
        layers.append("netns (user namespace)")
    layers.append(_landlock(config["read_paths"], [config["workdir"], "/dev/null"]))
    with contextlib.suppress(_Refused):  # network removal is best effort; the credential layers are not
        layers.append(_seccomp_without_sockets() or "")
    os.write(config["report_fd"], json.dumps([layer for layer in layers if layer]).encode())
    os.closerange(3, MAX_OPEN_FILES)
    os.execve(sys.executable, [sys.executable, "-I", config["program"]], os.environ)


# ---------------------------------------------------------------- the parent


def _read_paths() -> list[str]:
    python = {
        sys.prefix,
        sys.base_prefix,
        sys.exec_prefix,
        sys.base_exec_prefix,
        os.path.dirname(os.path.dirname(os.path.realpath(sys.executable))),
    }
    # never "/" (an interpreter installed there would open everything): it then fails to start, and is refused
    return sorted(python - {"/"}) + [*SYSTEM_READ_PATHS, *DEVICES]


def _run(code: str, timeout: float, memory_mb: int, drop_uid: bool) -> tuple[ExecutionResult, list[str]]:
    workdir = tempfile.mkdtemp(prefix="nanorun-exec-")
    report_r, report_w = os.pipe()
    try:
        program = os.path.join(workdir, "program.py")
        with open(program, "w") as f:
            f.write(code)
        if drop_uid:
            for path in (workdir, program):
                os.chown(path, NOBODY, NOBODY)
        config = {
            "program": program,
            "workdir": workdir,
            "memory_mb": memory_mb,
            "cpu_seconds": max(1, int(timeout) + 1),
            "drop_uid": drop_uid,
            "read_paths": _read_paths(),
            "report_fd": report_w,
        }
        env = {"PATH": SAFE_ENV_PATH, "LANG": "C.UTF-8", "HOME": workdir, "TMPDIR": workdir}
        proc = subprocess.Popen(
            [sys.executable, "-I", "-S", os.path.abspath(__file__), json.dumps(config)],
            cwd=workdir,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            pass_fds=(report_w,),  # close_fds stays on: nothing else is inherited
            start_new_session=True,  # its own process group, so a timeout kills any children too
        )
        os.close(report_w)
        report_w = -1
        timed_out = False
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            timed_out = True
            os.killpg(proc.pid, signal.SIGKILL)
            out, err = proc.communicate()
        with os.fdopen(report_r, "rb") as f:
            report_r = -1
            report = f.read()
        layers = json.loads(report) if report else []
        stdout = out.decode(errors="replace")[:MAX_OUTPUT_CHARS]
        stderr = err.decode(errors="replace")[-MAX_OUTPUT_CHARS:]
        if not layers and not timed_out:  # the launcher stopped before running anything
            refused = [line for line in stderr.splitlines() if REFUSED_MARK in line]
            raise SandboxUnavailable(
                refused[-1].split(REFUSED_MARK, 1)[1].strip()
                if refused
                else f"the sandbox launcher failed: {stderr.strip()[-500:]}"
            )
        # CPU-limit kills (SIGXCPU) are timeouts too
        timed_out = timed_out or proc.returncode == -signal.SIGXCPU
        result = ExecutionResult(
            success=proc.returncode == 0 and not timed_out,
            stdout=stdout,
            stderr=stderr,
            returncode=proc.returncode,
            timed_out=timed_out,
            memory_exceeded="MemoryError" in stderr,
            network_isolated=_network_isolated(layers),
        )
        return result, layers
    finally:
        for fd in (report_r, report_w):
            if fd >= 0:
                os.close(fd)
        shutil.rmtree(workdir, ignore_errors=True)


@lru_cache(maxsize=1)
def sandbox() -> Sandbox:
    """Probe once what confinement this environment allows; raise SandboxUnavailable if too little."""
    if not sys.platform.startswith("linux"):
        raise SandboxUnavailable(f"the sandbox needs Linux (Landlock), not {sys.platform}")
    failures = []
    for drop_uid in [True, False] if os.geteuid() == 0 else [False]:
        try:
            result, layers = _run("print('ok')", timeout=30.0, memory_mb=256, drop_uid=drop_uid)
        except SandboxUnavailable as err:
            failures.append(err.reason)
            continue
        if result.success and result.stdout.strip() == "ok":
            return Sandbox(drop_uid=drop_uid, layers=tuple(layers))
        failures.append(
            f"the interpreter did not start {'as nobody ' if drop_uid else ''}under Landlock: "
            f"{result.error or result.returncode}"
        )
    raise SandboxUnavailable("; ".join(dict.fromkeys(failures)))


def execute_code(code: str, timeout: float = 5.0, memory_mb: int = 256) -> ExecutionResult:
    """Run `code` as a Python program in the sandbox described above; never without it."""
    return _run(code, timeout, memory_mb, sandbox().drop_uid)[0]


if __name__ == "__main__":
    try:
        _launch(json.loads(sys.argv[1]))
    except (_Refused, OSError) as err:
        print(REFUSED_MARK, err, file=sys.stderr)
        sys.exit(REFUSED_EXIT)
