"""Run untrusted, model-written Python (HumanEval) so that it cannot reach the run's credentials.

    result = execute_code("print(1 + 1)", timeout=5.0, memory_mb=256)
    result.success, result.stdout, result.timed_out, result.memory_exceeded, result.network_isolated

The code runs where training runs: in a pod, as uid 10001 (the trainer image) or as root, next to
`AWS_SECRET_ACCESS_KEY` in the environment of the trainer and of PID 1, a Secret volume (files mode
0644 by default) and the service-account token; a `restricted` pod has no capabilities, usually no
user namespaces (RuntimeDefault seccomp) and no writable cgroup. So the sandbox rests on what an
unprivileged process can do to itself. The parent starts this file as a launcher (`python -I -S execution.py CONFIG`) with a scrubbed
environment (PATH, LANG, HOME, TMPDIR only), no inherited descriptors and a session of its own. The
launcher stays as the program's supervisor; its child confines itself step by step and then execs
`python -I program.py`:

1. supervisor: a child subreaper (PR_SET_CHILD_SUBREAPER, prctl(2)), so every orphaned descendant,
   double-forked or setsid() or not, is re-parented to it. When the program exits or the timeout
   passes, it SIGKILLs every descendant (found through the parent links in /proc/*/stat) until it has
   no child left, then reports. No process outlives the run, and no grandchild keeps the output
   pipes open; the parent also reads them against a deadline and kills the launcher's group if it
   ever outlives that;
2. resource limits: address space (`memory_mb`), CPU seconds, written file size, open files, no core
   dumps, and tasks: RLIMIT_NPROC at the real uid's current task count plus `MAX_PROCESSES`;
3. uid: as root, uid/gid 65534 (nobody) with no supplementary groups when nobody can read the
   interpreter; otherwise real uid 65534 with effective uid 0 (RLIMIT_NPROC never binds real uid 0).
   Every capability is dropped, the bounding set too as root;
4. Landlock (Linux >= 5.13, unprivileged): the program may read only the Python installation,
   `/usr`, `/lib*`, a few files of `/etc` and `/dev`, and its own working directory; everything else
   (`/proc`, Secret volumes, `/var/run/secrets`, home directories) is denied, as are ptrace, mounts,
   and (ABI >= 6) signals and abstract unix sockets outside the sandbox;
5. seccomp: every ABI but the native one (i386 and x32 on x86-64, arm32 on arm64) fails, as do
   `socket()` of any family but AF_UNIX, io_uring, the set*uid calls (which could restore real uid 0),
   and signals, pidfds and prlimit aimed at any process but the program itself (the supervisor and the
   trainer included);
6. a new network namespace where the kernel allows (CAP_SYS_ADMIN, or an unprivileged user
   namespace), and Landlock's TCP rules (ABI >= 4).

Steps 1 to 5 are REQUIRED: when one cannot be set up, the launcher refuses to run the code
(`REFUSED_MARK` and the layer's name). Optional, each with another layer covering its risk: step 6
(sockets: seccomp), the full drop to nobody in step 3 (files: Landlock; processes: the real uid), and
Landlock's scoping of ABI >= 6 (signals: seccomp; abstract unix sockets: a network namespace, and
without one seccomp fails AF_UNIX sockets as well).

`sandbox()` probes this once per process. When the required layers cannot be had (no Landlock, or
a seccomp profile that forbids it), `SandboxUnavailable` says why, `execute_code` raises it rather
than running anything, and HumanEval is skipped with that message. tests/kube/test_execution_pod.py
checks, inside a pod, that the code sees no key in its environment, `/proc` or the Secret volume,
cannot open a socket, and leaves no process behind.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import platform
import resource
import selectors
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from functools import lru_cache

MAX_OUTPUT_CHARS = 10_000
MAX_FILE_BYTES = 16 * 1024 * 1024
MAX_OPEN_FILES = 256
MAX_PROCESSES = 64  # tasks (processes and threads) the program may add to its uid's count
NOBODY = 65534
REFUSED_EXIT = 125  # the launcher's exit status when it would not run the code
REFUSED_MARK = "nanorun sandbox refused:"
SAFE_ENV_PATH = "/usr/local/bin:/usr/bin:/bin"
LAUNCHER_GRACE = 10.0  # seconds past the timeout after which the parent stops waiting for the launcher

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
PR_SET_NO_NEW_PRIVS, PR_SET_CHILD_SUBREAPER = 38, 36
PR_SET_SECCOMP, SECCOMP_MODE_FILTER, SECCOMP_SET_MODE_FILTER = 22, 2, 1
CLONE_NEWNET, CLONE_NEWUSER = 0x40000000, 0x10000000
PR_CAPBSET_DROP, CAPABILITY_V3 = 24, 0x20080522
LANDLOCK_CREATE_RULESET, LANDLOCK_ADD_RULE, LANDLOCK_RESTRICT_SELF = 444, 445, 446  # same on all arches
FS_EXECUTE, FS_WRITE_FILE, FS_READ_FILE, FS_READ_DIR, FS_TRUNCATE = 1, 1 << 1, 1 << 2, 1 << 3, 1 << 14
FS_FILE_RIGHTS = FS_EXECUTE | FS_WRITE_FILE | FS_READ_FILE | FS_TRUNCATE  # what a rule on a file may hold

# Syscall numbers per machine, for the seccomp filter (arch/x86/entry/syscalls/syscall_64.tbl,
# include/uapi/asm-generic/unistd.h) and the audit arch that `seccomp_data.arch` holds for the native ABI.
SYSCALLS = {
    "x86_64": {
        "audit_arch": 0xC000003E,
        "seccomp": 317,
        "socket": 41,
        "io_uring_setup": 425,
        "io_uring_enter": 426,
        "io_uring_register": 427,
        "setuid": 105,
        "setreuid": 113,
        "setresuid": 117,
        "kill": 62,
        "tkill": 200,
        "tgkill": 234,
        "rt_sigqueueinfo": 129,
        "rt_tgsigqueueinfo": 297,
        "pidfd_open": 434,
        "prlimit64": 302,
    },
    "aarch64": {
        "audit_arch": 0xC00000B7,
        "seccomp": 277,
        "socket": 198,
        "io_uring_setup": 425,
        "io_uring_enter": 426,
        "io_uring_register": 427,
        "setuid": 146,
        "setreuid": 145,
        "setresuid": 147,
        "kill": 129,
        "tkill": 130,
        "tgkill": 131,
        "rt_sigqueueinfo": 138,
        "rt_tgsigqueueinfo": 240,
        "pidfd_open": 434,
        "prlimit64": 261,
    },
}
X32_SYSCALL_BIT = 0x40000000  # x86-64: set in the number of every x32 syscall, whose arch is x86-64's
AF_UNIX = 1
SECCOMP_RET_ALLOW, SECCOMP_RET_EPERM = 0x7FFF0000, 0x00050000 | 1  # SECCOMP_RET_ERRNO | EPERM
# classic BPF: BPF_LD|BPF_W|BPF_ABS, BPF_JMP|BPF_JEQ|BPF_K, BPF_JMP|BPF_JGE|BPF_K, BPF_RET|BPF_K
BPF_LD_ABS, BPF_JEQ, BPF_JGE, BPF_RET = 0x20, 0x15, 0x35, 0x06
SECCOMP_DATA_NR, SECCOMP_DATA_ARCH, SECCOMP_DATA_ARG0 = 0, 4, 16  # struct seccomp_data; arg0's low word


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


def _landlock(read_paths: list[str], write_paths: list[str]) -> int:
    """Deny every filesystem access outside the given paths, TCP, and reaching outside processes;
    return the Landlock ABI version."""
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
        except OSError as err:
            raise _Refused(f"landlock rule for {path}: {err.strerror}") from err
        if not os.path.isdir(path):
            rights &= FS_FILE_RIGHTS
        rule = struct.pack("<Qi", rights & fs_all, fd)  # struct landlock_path_beneath_attr (packed)
        added = _syscall(LANDLOCK_ADD_RULE, ruleset, 1, rule, 0)  # 1: LANDLOCK_RULE_PATH_BENEATH
        _check(added, f"landlock_add_rule {path}")
        os.close(fd)
    _check(_prctl(PR_SET_NO_NEW_PRIVS, 1), "no_new_privs")
    _check(_syscall(LANDLOCK_RESTRICT_SELF, ruleset, 0), "landlock_restrict_self")
    os.close(ruleset)
    return abi


def seccomp_filter(machine: str, own_pid: int, unix_sockets: bool) -> bytes:
    """The classic BPF program of the launcher's seccomp filter (seccomp(2), and the kernel's
    Documentation/userspace-api/seccomp_filter.rst), as the kernel takes it: 8-byte instructions.

    EPERM for: another ABI than the machine's native one; on x86-64, any number with the x32 bit
    (x32 syscalls carry x86-64's audit arch and __X32_SYSCALL_BIT in their number; libseccomp's
    x86-64 filters, Docker's and containerd's default profiles among them, test that bit the same
    way before they compare numbers); `socket()` of any
    family but AF_UNIX (of every family unless `unix_sockets`); io_uring, whose operations bypass
    this filter; setuid/setreuid/setresuid; and kill, tkill, tgkill, rt_(tg)sigqueueinfo,
    pidfd_open and prlimit64 aimed at any process but `own_pid` (prlimit64 also at 0, itself).
    Everything else is allowed. Arguments are compared on their low 32 bits, as the kernel reads
    these int arguments.
    """
    nr = SYSCALLS[machine]
    deny = ["io_uring_setup", "io_uring_enter", "io_uring_register", "setuid", "setreuid", "setresuid"]
    # syscall -> the values its first argument may have; any other fails
    allowed_arg0 = {
        "socket": [AF_UNIX] if unix_sockets else [],
        "kill": [own_pid],  # not 0: the program's process group holds the supervisor
        "tkill": [own_pid],
        "tgkill": [own_pid],
        "rt_sigqueueinfo": [own_pid],
        "rt_tgsigqueueinfo": [own_pid],
        "pidfd_open": [own_pid],
        "prlimit64": [0, own_pid],
    }
    # (code, jump-if-true, jump-if-false, k), the jumps as labels resolved below
    program: list[tuple[int, str | int, str | int, int]] = [
        (BPF_LD_ABS, 0, 0, SECCOMP_DATA_ARCH),
        (BPF_JEQ, 0, "deny", nr["audit_arch"]),
        (BPF_LD_ABS, 0, 0, SECCOMP_DATA_NR),
    ]
    if machine == "x86_64":
        program.append((BPF_JGE, "deny", 0, X32_SYSCALL_BIT))
    program += [(BPF_JEQ, "deny", 0, nr[name]) for name in deny]
    program += [(BPF_JEQ, name, 0, nr[name]) for name in allowed_arg0]
    program.append((BPF_RET, 0, 0, SECCOMP_RET_ALLOW))
    labels = {}
    for name, values in allowed_arg0.items():
        labels[name] = len(program)
        program.append((BPF_LD_ABS, 0, 0, SECCOMP_DATA_ARG0))
        program += [(BPF_JEQ, "allow", 0, value & 0xFFFFFFFF) for value in values]
        program.append((BPF_RET, 0, 0, SECCOMP_RET_EPERM))
    labels["allow"] = len(program)
    program.append((BPF_RET, 0, 0, SECCOMP_RET_ALLOW))
    labels["deny"] = len(program)
    program.append((BPF_RET, 0, 0, SECCOMP_RET_EPERM))

    def offset(at: int, target: str | int) -> int:
        return target if isinstance(target, int) else labels[target] - at - 1

    return b"".join(
        struct.pack("<HBBI", code, offset(i, jt), offset(i, jf), k)
        for i, (code, jt, jf, k) in enumerate(program)
    )


def _seccomp(unix_sockets: bool) -> str:
    machine = platform.machine()
    if machine not in SYSCALLS:
        raise _Refused(f"seccomp: no syscall table for {machine}")
    filters = seccomp_filter(machine, os.getpid(), unix_sockets)
    buf = ctypes.create_string_buffer(filters, len(filters))
    fprog = struct.pack("<HxxxxxxQ", len(filters) // 8, ctypes.addressof(buf))  # struct sock_fprog
    _check(_prctl(PR_SET_NO_NEW_PRIVS, 1), "no_new_privs")
    _check(_syscall(SYSCALLS[machine]["seccomp"], SECCOMP_SET_MODE_FILTER, 0, fprog), "seccomp")
    return f"seccomp: no {'inet' if unix_sockets else 'inet or unix'} sockets, no x32, no signals out"


def _drop_capabilities() -> str:
    """No capability now or after exec: neither CAP_SYS_RESOURCE nor CAP_SYS_ADMIN, which lift
    RLIMIT_NPROC, nor root's DAC override, raw sockets or mounts."""
    if os.geteuid() == 0:  # root's execve grants the bounding set; an unprivileged execve grants nothing
        for cap in range(64):
            if _prctl(PR_CAPBSET_DROP, cap) < 0 and ctypes.get_errno() != 22:  # EINVAL: past the last one
                raise _Refused(f"dropping capability {cap}: {os.strerror(ctypes.get_errno())}")
    header, data = struct.pack("<Ii", CAPABILITY_V3, 0), bytes(24)  # effective, permitted, inheritable = 0
    _check(_libc.capset(header, data), "capset")
    return "no capabilities"


def _tasks_of(uid: int) -> int:
    """The tasks (threads) whose real uid is `uid`, among the processes this /proc shows."""
    count = 0
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/status", "rb") as f:
                status = f.read()
            real_uid = status[status.index(b"\nUid:") + 5 :].split(None, 1)[0]
            if int(real_uid) == uid:
                count += int(status[status.index(b"\nThreads:") + 9 :].split(None, 1)[0])
        except (OSError, ValueError):  # gone meanwhile
            continue
    return count


def _limit_tasks() -> str:
    uid = os.getuid()
    # RLIMIT_NPROC counts every task (threads too) of the real uid in its user namespace: the
    # trainer's threads, other pods of the same uid, other sandboxes. But the kernel compares that
    # count only with the rlimit of the task that forks (copy_process() in kernel/fork.c; setrlimit(2)),
    # so a limit set here binds this program and its descendants alone. A fixed number would either be
    # under what the uid already runs (every fork fails) or no bound at all; the count now plus a
    # margin lets the program add MAX_PROCESSES tasks. Tasks of the uid that this /proc does not show
    # (other PID namespaces on the node) only shrink the margin, possibly to no fork at all. The
    # kernel skips the check for real uid 0 and for CAP_SYS_RESOURCE or CAP_SYS_ADMIN, hence a real
    # uid other than 0 and no capabilities.
    limit = _tasks_of(uid) + MAX_PROCESSES
    try:
        resource.setrlimit(resource.RLIMIT_NPROC, (limit, limit))
    except (OSError, ValueError) as err:
        raise _Refused(f"process limit: {err}") from err
    return f"tasks {limit} (uid {uid})"


def _confine(config: dict) -> list[str]:
    """Confine this process as the module docstring lists; return the layers."""
    layers = []
    memory = config["memory_mb"] * 1024 * 1024
    for name, limit, value in [
        ("address space", resource.RLIMIT_AS, memory),
        ("cpu", resource.RLIMIT_CPU, config["cpu_seconds"]),
        ("file size", resource.RLIMIT_FSIZE, MAX_FILE_BYTES),
        ("core", resource.RLIMIT_CORE, 0),
        ("open files", resource.RLIMIT_NOFILE, MAX_OPEN_FILES),
    ]:
        try:
            resource.setrlimit(limit, (value, value + 1 if limit == resource.RLIMIT_CPU else value))
        except (OSError, ValueError) as err:
            raise _Refused(f"{name} limit: {err}") from err
    if _libc.unshare(ctypes.c_int(CLONE_NEWNET)) == 0:  # needs CAP_SYS_ADMIN: rarely in a pod
        layers.append("netns")
    try:
        if config["drop_uid"]:
            os.setgroups([])
            os.setgid(NOBODY)
            os.setuid(NOBODY)
            layers.append(f"uid {NOBODY}")
        elif os.getuid() == 0:
            # Root whose interpreter nobody cannot read keeps effective uid 0 (file access) under real
            # uid nobody, which RLIMIT_NPROC binds; seccomp then keeps it from setting real uid 0 again.
            os.setresuid(NOBODY, 0, 0)
            layers.append(f"real uid {NOBODY}")
    except OSError as err:
        raise _Refused(f"uid {NOBODY}: {err}") from err
    layers.append(_limit_tasks())
    layers.append(_drop_capabilities())
    if "netns" not in layers and _libc.unshare(ctypes.c_int(CLONE_NEWUSER | CLONE_NEWNET)) == 0:
        layers.append("netns (user namespace)")
    abi = _landlock(config["read_paths"], [config["workdir"], "/dev/null"])
    layers.append(f"landlock abi {abi}")
    # Abstract unix sockets are per network namespace, and Landlock scopes them from ABI 6 on.
    unix_sockets = any(layer.startswith("netns") for layer in layers) or abi >= 6
    layers.append(_seccomp(unix_sockets))
    return layers


def _descendants(root: int) -> list[int]:
    """The processes below `root`, parents before their children, from the parent links in /proc
    (which every kernel has, unlike /proc/<pid>/task/<tid>/children)."""
    children: dict[int, list[int]] = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as f:
                stat = f.read()
        except OSError:  # gone meanwhile
            continue
        # "pid (comm) state ppid ...": comm is the program's to choose, so split after its last ')'
        fields = stat.rsplit(b")", 1)[-1].split()
        if len(fields) > 1:
            children.setdefault(int(fields[1]), []).append(int(name))
    found, queue = [], [root]
    while queue:
        for pid in children.get(queue.pop(0), ()):
            found.append(pid)
            queue.append(pid)
    return found


def _kill_descendants() -> None:
    """SIGKILL every descendant and reap them, until this subreaper has no child left."""
    while True:
        # Parents are killed before their children: a child whose parent is dead can be reaped only
        # by this process, so its pid is not reused before it is killed. A descendant forked after
        # the walk is found by the next one.
        for pid in _descendants(os.getpid()):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        try:
            while os.waitpid(-1, os.WNOHANG)[0]:
                pass
        except ChildProcessError:
            return  # as a subreaper, no child means no descendant
        signal.sigtimedwait([signal.SIGCHLD], 0.01)


def _wait(pid: int, timeout: float) -> int | None:
    """The wait status of child `pid`, or None when it still runs after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        with contextlib.suppress(ChildProcessError):
            while True:
                reaped, status = os.waitpid(-1, os.WNOHANG)  # orphans re-parented here too
                if reaped == pid:
                    return status
                if reaped == 0:
                    break
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return None
        signal.sigtimedwait([signal.SIGCHLD], remaining)


def _supervise(config: dict) -> None:
    """Run the program as a confined child, end every descendant, report to the parent."""
    _check(_prctl(PR_SET_CHILD_SUBREAPER, 1), "child subreaper")
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGCHLD})  # taken by sigtimedwait
    layers_r, layers_w = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            os.close(layers_r)
            signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGCHLD})
            layers = _confine(config)
            os.write(layers_w, json.dumps(layers).encode())
            os.closerange(3, MAX_OPEN_FILES)
            os.execve(sys.executable, [sys.executable, "-I", config["program"]], os.environ)
        except BaseException as err:  # never back into the supervisor's code
            message = err if isinstance(err, _Refused) else f"{type(err).__name__}: {err}"
            print(REFUSED_MARK, message, file=sys.stderr, flush=True)
        finally:
            os._exit(REFUSED_EXIT)
    os.close(layers_w)
    status = _wait(pid, config["timeout"])
    _kill_descendants()
    with os.fdopen(layers_r, "rb") as f:
        layers = json.loads(f.read() or b"[]")
    report = {
        "layers": layers,
        "returncode": None if status is None else os.waitstatus_to_exitcode(status),
        "timed_out": status is None,
    }
    os.write(config["report_fd"], json.dumps(report).encode())


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


def _collect(streams: dict[int, int], deadline: float) -> tuple[dict[int, bytes], bool]:
    """Read the given descriptors until each is at its end or `deadline` (time.monotonic()) passes;
    keep at most `streams[fd]` bytes of each (the first ones, or the last if negative). Return what
    was kept and whether every descriptor ended."""
    kept = {fd: b"" for fd in streams}
    with selectors.DefaultSelector() as selector:
        for fd in streams:
            selector.register(fd, selectors.EVENT_READ)
        while selector.get_map():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return kept, False
            for key, _ in selector.select(remaining):
                chunk = os.read(key.fd, 65536)
                if not chunk:
                    selector.unregister(key.fd)
                    continue
                limit = streams[key.fd]
                if limit >= 0:
                    kept[key.fd] = (kept[key.fd] + chunk)[:limit]
                else:
                    kept[key.fd] = (kept[key.fd] + chunk)[limit:]
    return kept, True


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
            "timeout": timeout,
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
            start_new_session=True,  # its own process group, for the kill below
        )
        os.close(report_w)
        report_w = -1
        most = 4 * MAX_OUTPUT_CHARS  # bytes: at most 4 per character in UTF-8
        out_fd, err_fd = proc.stdout.fileno(), proc.stderr.fileno()
        kept, ended = _collect(
            {out_fd: most, err_fd: -most, report_r: 1 << 20}, time.monotonic() + timeout + LAUNCHER_GRACE
        )
        if not ended:  # the supervisor kills every descendant itself; this is for a launcher stuck or gone
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=LAUNCHER_GRACE)
        proc.stdout.close()
        proc.stderr.close()
        stdout = kept[out_fd].decode(errors="replace")[:MAX_OUTPUT_CHARS]
        stderr = kept[err_fd].decode(errors="replace")[-MAX_OUTPUT_CHARS:]
        report = json.loads(kept[report_r]) if kept[report_r] else None
        if report is None and not ended:
            return ExecutionResult(False, stdout, stderr, None, timed_out=True), []
        layers = report["layers"] if report else []
        if not layers:  # the launcher, or the program's process before its exec, stopped
            refused = [line for line in stderr.splitlines() if REFUSED_MARK in line]
            raise SandboxUnavailable(
                refused[-1].split(REFUSED_MARK, 1)[1].strip()
                if refused
                else f"the sandbox launcher failed: {stderr.strip()[-500:]}"
            )
        returncode = report["returncode"]
        # CPU-limit kills (SIGXCPU) are timeouts too
        timed_out = report["timed_out"] or returncode == -signal.SIGXCPU
        result = ExecutionResult(
            success=returncode == 0 and not timed_out,
            stdout=stdout,
            stderr=stderr,
            returncode=returncode,
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
        _supervise(json.loads(sys.argv[1]))
    except (_Refused, OSError) as err:
        print(REFUSED_MARK, err, file=sys.stderr)
        sys.exit(REFUSED_EXIT)
