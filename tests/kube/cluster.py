"""A real Kubernetes control plane on this machine: etcd + kube-apiserver, like envtest.

The binaries come from `tests/kube/build.sh` (`make setup-kube`). `ControlPlane` generates a CA, a
serving certificate, an admin client certificate (group `system:masters`) and a service-account
signing key, starts etcd and kube-apiserver on free loopback ports with RBAC authorization, waits
for `/readyz` and writes an admin kubeconfig. `install_crds` server-side applies the CRDs nanorun
works with (ours from `manifests/crd/`, plus the upstream PyTorchJob and RayService CRDs fetched by
the build) and waits until each is Established. There is no scheduler, controller-manager or
kubelet: pods never run and nothing is garbage collected.

The pytest fixture `kube` (tests/fixtures/kube.py) uses this module; so does the command line,
which keeps a control plane running in the background for trying the operator by hand:

    python -m tests.kube.cluster up       # or `make kube-up`; writes .kube/config
    python -m tests.kube.cluster status
    python -m tests.kube.cluster down     # or `make kube-down`
"""

from __future__ import annotations

import argparse
import ctypes
import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from tests.kube.pki import kubeconfig, write_pki

REPO = Path(__file__).resolve().parents[2]
STATE_DIR = REPO / ".kube"  # what `up` writes: config, pid files, logs, etcd data, certificates
BINARIES = ("kube-apiserver", "etcd", "kubectl", "helm")
SERVICE_CIDR = "10.0.0.0/24"
READY_TIMEOUT_S = 60.0


class ControlPlaneError(RuntimeError):
    """The control plane could not be built, started or reached; the message says what to do."""


def bin_dir() -> Path:
    """The cache folder holding the binaries for the pinned versions (it may not exist yet)."""
    out = subprocess.run([str(REPO / "tests/kube/bin-dir.sh")], capture_output=True, text=True, check=True)
    return Path(out.stdout.strip())


def require_binaries() -> Path:
    """The binary folder, or a ControlPlaneError telling how to build it."""
    folder = bin_dir()
    missing = [name for name in BINARIES if not (folder / name).is_file()]
    if missing or not (folder.parent / "complete").exists():
        raise ControlPlaneError(
            f"the test Kubernetes binaries are not built ({', '.join(missing) or 'incomplete build'} "
            f"missing in {folder}); run `make setup-kube` (builds kube-apiserver, etcd, kubectl and "
            "helm from Go modules, about 15-25 minutes the first time)"
        )
    return folder


def crd_files() -> list[Path]:
    """Every CRD to install: the repository's own (manifests/crd/*.yaml) and the upstream ones."""
    ours = sorted((REPO / "manifests/crd").glob("*.yaml"))
    upstream = sorted((bin_dir().parent / "crds").glob("*.yaml"))
    return ours + upstream


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --- processes ------------------------------------------------------------------------------


def _die_with_parent() -> None:
    """Runs in the child before exec: the kernel kills it when the thread that started it ends
    (for pytest, the main thread, i.e. the test run), so a run that is killed outright leaks no
    servers."""
    libc = ctypes.CDLL(None, use_errno=True)
    pr_set_pdeathsig = 1
    libc.prctl(pr_set_pdeathsig, signal.SIGKILL)


def _spawn(argv: list[str], log: Path, *, detach: bool) -> subprocess.Popen:
    with open(log, "ab") as out:
        return subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
            start_new_session=detach, preexec_fn=None if detach else _die_with_parent,
        )


def alive(pid: int) -> bool:
    """Whether `pid` is a live process (a zombie waiting to be reaped counts as gone)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def stop_pid(pid: int, timeout: float = 10.0) -> None:
    """SIGTERM, then SIGKILL after `timeout` seconds, for a process that is not our child (one
    `up` started); a pid that is already gone is fine."""
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + timeout
    while alive(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    if alive(pid):
        os.kill(pid, signal.SIGKILL)


def _log_tail(path: Path, lines: int = 25) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except FileNotFoundError:
        return "(no log)"


@dataclass
class ControlPlane:
    """etcd + kube-apiserver with their state in `workdir` (certificates, data, logs, kubeconfig).

    `detach=False` (tests): the servers die with this process. `detach=True` (`make kube-up`): they
    run in their own session and outlive it; `stop` or `down` ends them by pid.
    """

    workdir: Path
    detach: bool = False
    bin_dir: Path = field(default_factory=require_binaries)
    processes: dict[str, subprocess.Popen] = field(default_factory=dict)
    etcd_url: str = ""
    server: str = ""

    @property
    def kubeconfig_path(self) -> Path:
        return self.workdir / "config"

    @property
    def pki(self) -> Path:
        return self.workdir / "pki"

    def start(self, attempts: int = 3) -> None:
        """Starts etcd, then kube-apiserver, and waits until it is ready. A free port can be taken
        by another process before the server binds it, so a failed start is retried on new ports."""
        self.workdir.mkdir(parents=True, exist_ok=True)
        write_pki(self.pki)
        for attempt in range(1, attempts + 1):
            try:
                self._start_etcd()
                self._start_apiserver()
                break
            except ControlPlaneError:
                self.stop()
                if attempt == attempts:
                    raise
            except BaseException:
                self.stop()
                raise
        self.kubeconfig_path.write_text(kubeconfig(self.server, self.pki))
        self.kubeconfig_path.chmod(0o600)

    def _start_etcd(self) -> None:
        client, peer = free_port(), free_port()
        data = self.workdir / "etcd-data"
        shutil.rmtree(data, ignore_errors=True)
        self.etcd_url = f"http://127.0.0.1:{client}"
        self.processes["etcd"] = _spawn([
            str(self.bin_dir / "etcd"), "--name=nanorun-test", f"--data-dir={data}",
            f"--listen-client-urls={self.etcd_url}", f"--advertise-client-urls={self.etcd_url}",
            f"--listen-peer-urls=http://127.0.0.1:{peer}", f"--initial-advertise-peer-urls=http://127.0.0.1:{peer}",
            f"--initial-cluster=nanorun-test=http://127.0.0.1:{peer}",
            # Test data is disposable: skipping fsync keeps etcd fast on a busy shared disk.
            "--unsafe-no-fsync", "--log-level=warn",
        ], self.workdir / "etcd.log", detach=self.detach)
        self._wait_until(f"{self.etcd_url}/health", "etcd", context=None)

    def _start_apiserver(self) -> None:
        port = free_port()
        pki = self.pki
        self.server = f"https://127.0.0.1:{port}"
        self.processes["kube-apiserver"] = _spawn([
            str(self.bin_dir / "kube-apiserver"),
            f"--etcd-servers={self.etcd_url}",
            "--bind-address=127.0.0.1", "--advertise-address=127.0.0.1", f"--secure-port={port}",
            # No pods dial the `kubernetes` Service here, and since v1.37 its endpoint reconciler
            # refuses a loopback advertise address.
            "--endpoint-reconciler-type=none",
            f"--tls-cert-file={pki / 'apiserver.crt'}", f"--tls-private-key-file={pki / 'apiserver.key'}",
            f"--client-ca-file={pki / 'ca.crt'}",
            "--authorization-mode=RBAC",
            "--service-account-issuer=https://kubernetes.default.svc.cluster.local",
            f"--service-account-key-file={pki / 'sa.pub'}",
            f"--service-account-signing-key-file={pki / 'sa.key'}",
            f"--service-cluster-ip-range={SERVICE_CIDR}",
            # Nothing runs the token controller, so pods must not wait for a default ServiceAccount.
            "--disable-admission-plugins=ServiceAccount",
            "--allow-privileged=true", "--profiling=false",
        ], self.workdir / "kube-apiserver.log", detach=self.detach)
        ctx = ssl.create_default_context(cafile=str(pki / "ca.crt"))
        ctx.load_cert_chain(str(pki / "admin.crt"), str(pki / "admin.key"))
        self._wait_until(f"{self.server}/readyz", "kube-apiserver", context=ctx)

    def _wait_until(self, url: str, name: str, context: ssl.SSLContext | None) -> None:
        deadline = time.monotonic() + READY_TIMEOUT_S
        log = self.workdir / f"{name}.log"
        while time.monotonic() < deadline:
            if self.processes[name].poll() is not None:
                raise ControlPlaneError(f"{name} exited with {self.processes[name].returncode}; "
                                        f"last lines of {log}:\n{_log_tail(log)}")
            try:
                with urllib.request.urlopen(url, timeout=2, context=context) as resp:
                    if resp.status == 200:
                        return
            except OSError:
                pass
            time.sleep(0.2)
        raise ControlPlaneError(f"{name} not ready after {READY_TIMEOUT_S:.0f} s at {url}; "
                                f"last lines of {log}:\n{_log_tail(log)}")

    def stop(self) -> None:
        """Stops kube-apiserver, then etcd."""
        for name in ("kube-apiserver", "etcd"):
            proc = self.processes.pop(name, None)
            if proc is None:
                continue
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

    def env(self) -> dict[str, str]:
        """os.environ for subprocesses: this kubeconfig, the binaries first on PATH, kubectl's and
        helm's caches and config inside the workdir (nothing touches ~/.kube or ~/.config/helm)."""
        env = dict(os.environ)
        env.update(
            KUBECONFIG=str(self.kubeconfig_path),
            PATH=f"{self.bin_dir}{os.pathsep}{env.get('PATH', '')}",
            KUBECACHEDIR=str(self.workdir / "cache"),
            HELM_CACHE_HOME=str(self.workdir / "helm/cache"),
            HELM_CONFIG_HOME=str(self.workdir / "helm/config"),
            HELM_DATA_HOME=str(self.workdir / "helm/data"),
        )
        return env


def install_crds(files: list[Path], env: dict[str, str], timeout_s: float = 60.0) -> None:
    """Server-side apply (the upstream CRDs exceed client-side apply's annotation limit), then
    wait until every CRD is Established so its API can be used right away."""
    if not files:
        return
    file_args = [arg for f in files for arg in ("-f", str(f))]
    applied = subprocess.run(
        ["kubectl", "apply", "--server-side", "--force-conflicts", "--field-manager=nanorun-tests", "-o", "name",
         *file_args],
        env=env, capture_output=True, text=True,
    )
    if applied.returncode != 0:
        raise ControlPlaneError(f"installing CRDs failed:\n{applied.stderr.strip()}")
    # Polled rather than `kubectl wait`, which fails outright while a new CRD has no conditions yet.
    columns = 'custom-columns=NAME:.metadata.name,ESTABLISHED:.status.conditions[?(@.type=="Established")].status'
    deadline = time.monotonic() + timeout_s
    while True:
        out = subprocess.run(["kubectl", "get", *applied.stdout.split(), "--no-headers", "-o", columns],
                             env=env, capture_output=True, text=True)
        pending = [line.split()[0] for line in out.stdout.splitlines() if not line.endswith("True")]
        if out.returncode == 0 and not pending:
            return
        if time.monotonic() > deadline:
            raise ControlPlaneError(f"CRDs not Established after {timeout_s:.0f} s: {pending} {out.stderr.strip()}")
        time.sleep(0.2)


# --- command line (make kube-up / kube-down) --------------------------------------------------


def _running_pids(state: Path) -> dict[str, int]:
    """Pids from <state>/*.pid that are still alive and still run our binaries."""
    pids = {}
    for name in ("kube-apiserver", "etcd"):
        try:
            pid = int((state / f"{name}.pid").read_text())
            exe = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0].decode()
        except (FileNotFoundError, ValueError):
            continue
        if Path(exe).name == name:
            pids[name] = pid
    return pids


def up(state: Path) -> int:
    running = _running_pids(state)
    if len(running) == 2:
        print(f"already running ({state / 'config'}); `make kube-down` stops it")
        return 0
    if running:  # half a control plane (one process died): start over
        down(state)
    plane = ControlPlane(state, detach=True)
    started = time.monotonic()
    plane.start()
    ready = time.monotonic()
    for name, proc in plane.processes.items():
        (state / f"{name}.pid").write_text(f"{proc.pid}\n")
    try:
        install_crds(crd_files(), plane.env())
    except ControlPlaneError:
        down(state)
        raise
    print(f"kube-apiserver ready at {plane.server} in {ready - started:.1f} s, "
          f"CRDs established {time.monotonic() - ready:.1f} s later\n"
          f"  export KUBECONFIG={plane.kubeconfig_path}\n"
          f"  export PATH={plane.bin_dir}:$PATH    # kubectl, helm")
    return 0


def down(state: Path) -> int:
    pids = _running_pids(state)
    for name in ("kube-apiserver", "etcd"):
        if name in pids:
            stop_pid(pids[name])
        (state / f"{name}.pid").unlink(missing_ok=True)
    print(f"stopped {', '.join(pids) or 'nothing (not running)'}")
    return 0


def status(state: Path) -> int:
    pids = _running_pids(state)
    for name in ("etcd", "kube-apiserver"):
        print(f"{name}: {f'running (pid {pids[name]})' if name in pids else 'not running'}")
    return 0 if len(pids) == 2 else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.kube.cluster", description=__doc__.splitlines()[0])
    parser.add_argument("command", choices=["up", "down", "status"])
    parser.add_argument("--state-dir", type=Path, default=STATE_DIR,
                        help="where the kubeconfig, pid files, logs and etcd data live (default: .kube/)")
    args = parser.parse_args(argv)
    try:
        return {"up": up, "down": down, "status": status}[args.command](args.state_dir.resolve())
    except ControlPlaneError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
