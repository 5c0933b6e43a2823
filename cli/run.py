"""`nanorun run FILE`: run an LLMRun file on this machine, no cluster.

    nanorun run examples/tiny.yaml                       # storage from the file's spec.storage.uri
    nanorun run examples/tiny.yaml --run-dir s3://b/r    # override the run directory
    nanorun run examples/tiny.yaml --serve               # then serve the chat model and print its URL
    nanorun run run.yaml --serve --api-keys-file keys.txt   # serve with these API keys
    nanorun run examples/tiny.yaml --dry-run             # print the stage commands and stop

The same stage plan the operator turns into PyTorchJobs (`nanorun.operator.reconcile.plan.stage_plan`) runs
here as local processes: `python -m nanorun.trainer.<module> --run-dir URI ...`, under torchrun when
a distributed stage has several processes (one per local GPU, capped by compute.gpusPerNode).
A progress bar per stage is fed by the stage's progress.json; a summary table follows.

- A stage with a done.json of the same configuration id is skipped; an interrupted one resumes from
  its newest checkpoint (the stage does that itself), so re-running the same command continues the
  run. Each stage process gets NANORUN_CONFIG_ID (`plan.config_ids`: a hash of its module and flags,
  chained through the stages before it) and NANORUN_ATTEMPT (1, then one more each time the command
  starts the unfinished stage again), and the spec's heartbeat interval and collective timeout
  (NANORUN_HEARTBEAT_SECONDS, NANORUN_COLLECTIVE_TIMEOUT_SECONDS) as a cluster's pods do. Change a
  stage's flags in the file and that stage, and every stage after it, runs again from its input
  instead of being skipped.
- Ctrl-C sends SIGTERM to the running stage, which saves a checkpoint and exits; re-run to resume.
- Without GPUs a stage gets OMP_NUM_THREADS = the CPUs idle as it starts (all of them on an idle
  machine, at least one) unless the variable is set already.
- The file is validated with the same rules and messages as the CRD on a cluster.
- `--serve` follows spec.serving: `allowUnauthenticated: true` serves without keys; a run whose
  `apiKeysSecret` names a Secret (a cluster's) needs `--api-keys-file FILE` here, one key per line,
  checked before the first stage starts. `--api-keys-file` also replaces the opt-out when both are
  there. `maxRequestBytes` and `rateLimitPerMinute` apply as on a cluster.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import os
import resource
import shutil
import signal
import subprocess
import sys
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from nanorun.operator.api import API_VERSION, KIND, LLMRunSpec, SpecError, parse_spec
from nanorun.operator.reconcile.plan import PlannedStage, config_ids, stage_plan
from nanorun.pipeline import layout, liveness, storage
from nanorun.pipeline import progress as stage_files
from rich.console import Console
from rich.progress import BarColumn, Progress, TaskProgressColumn, TextColumn, TimeElapsedColumn
from rich.table import Table

STOP_GRACE_SECONDS = 300  # how long a stage may take to write its SIGTERM checkpoint
POLL_SECONDS = 0.5
SUMMARY_METRICS = (
    "loss",
    "val_bpb",
    "core",
    "chatcore",
    "mean_reward",
    "compression_ratio",
    "tokens_per_sec",
)


class RunFileError(ValueError):
    """The LLMRun file cannot be run (unreadable, wrong kind, invalid spec)."""


@dataclass
class RunFile:
    name: str
    spec: LLMRunSpec


@dataclass
class StageOutcome:
    stage: PlannedStage
    status: str  # done (earlier run) | ran | failed | stopped
    seconds: float
    metrics: dict[str, Any]
    cpu_seconds: float | None = None  # CPU time of the stage's processes (None: not run now)


def load_run_file(path: str) -> RunFile:
    """Read and validate an LLMRun YAML file: the same checks (and messages) as the CRD."""
    try:
        doc = yaml.safe_load(Path(path).read_text())
    except OSError as e:
        raise RunFileError(f"cannot read {path}: {e.strerror}") from None
    except yaml.YAMLError as e:
        raise RunFileError(f"{path} is not valid YAML: {e}") from None
    if not isinstance(doc, dict):
        raise RunFileError(f"{path}: expected an LLMRun object (apiVersion: {API_VERSION}, kind: {KIND})")
    if doc.get("apiVersion") != API_VERSION or doc.get("kind") != KIND:
        raise RunFileError(
            f"{path}: expected apiVersion: {API_VERSION} and kind: {KIND}, "
            f"got {doc.get('apiVersion')!r} / {doc.get('kind')!r}"
        )
    name = (doc.get("metadata") or {}).get("name") or Path(path).stem
    try:
        spec = parse_spec(doc.get("spec"))
    except SpecError as e:
        raise RunFileError(f"{path}: the LLMRun {name!r} is invalid:\n{e}") from None
    return RunFile(name=name, spec=spec)


@functools.cache
def local_gpu_count() -> int:
    """GPUs visible on this machine, without importing torch (the operator package never does)."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return len([d for d in visible.split(",") if d.strip()])
    if not shutil.which("nvidia-smi"):
        return 0
    try:
        out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return 0
    return sum(1 for line in out.splitlines() if line.startswith("GPU "))


def idle_cpus(interval: float = 0.25) -> float | None:
    """How many CPUs were idle over the next `interval` seconds (/proc/stat; None where there is none)."""

    def times() -> list[int]:  # all CPUs' user nice system idle iowait irq softirq steal
        with open("/proc/stat") as f:
            return [int(v) for v in f.readline().split()[1:9]]

    try:
        before = times()
        time.sleep(interval)
        after = times()
    except (OSError, ValueError):
        return None
    delta = [a - b for a, b in zip(after, before, strict=True)]
    return (os.cpu_count() or 1) * (delta[3] + delta[4]) / max(sum(delta), 1)


def cpu_threads_per_stage() -> int:
    """Torch threads of a stage on a machine without GPUs: the CPUs idle when it starts, at least one.

    A stage on an idle machine gets every core. On a busy one, threads that spin-wait for a core
    make each step several times slower (measured on a shared 2-core machine: 10 s a step with 2
    threads, 1.5-4 s with 1; docs/benchmarks.md), so it gets only the idle ones. Measured over a
    quarter second as the stage starts (the stage before it has exited by then; a load average would
    still count it). Without /proc/stat: half the CPUs. Set OMP_NUM_THREADS to choose otherwise."""
    cpus = os.cpu_count() or 2
    idle = idle_cpus()
    return max(1, min(cpus, round(idle) if idle is not None else cpus // 2))


def processes_for(stage: PlannedStage, spec: LLMRunSpec, override: int | None) -> int:
    if not stage.distributed:
        return 1
    if override:
        return override
    return max(1, min(spec.compute.gpus_per_node, local_gpu_count()))


def stage_command(stage: PlannedStage, run_dir: str, nproc: int, metrics_port: int | None) -> list[str]:
    launcher = [sys.executable, "-m", stage.entry_point]
    if nproc > 1:
        launcher = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            f"--nproc-per-node={nproc}",
            "-m",
            stage.entry_point,
        ]
    return launcher + stage.flags(run_dir, metrics_port)


def _fmt_metric(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def _progress_fields(p: stage_files.Progress | None) -> str:
    if p is None:
        return ""
    parts = []
    if p.loss is not None:
        parts.append(f"loss {p.loss:.3f}")
    if p.val_bpb is not None:
        parts.append(f"bpb {p.val_bpb:.3f}")
    if p.tokens_per_sec:
        parts.append(f"{p.tokens_per_sec:,.0f} tok/s")
    if p.compile_seconds:
        parts.append(f"compile {p.compile_seconds:.0f}s")
    if p.eta_seconds is not None and p.step < p.total_steps:
        parts.append(f"ETA {int(p.eta_seconds) // 60}m{int(p.eta_seconds) % 60:02d}s")
    return "  ".join(parts)


class LocalRun:
    """Runs the planned stages one after another as child processes, watching their progress.json.

    Ctrl-C (SIGINT) or a SIGTERM to `nanorun run` asks the running stage to stop: it gets SIGTERM,
    saves a checkpoint and exits; a second Ctrl-C kills it (it then resumes from an older checkpoint).
    """

    def __init__(
        self,
        run: RunFile,
        run_dir: str,
        log_dir: Path,
        console: Console,
        nproc: int | None = None,
        metrics_port: int | None = None,
    ):
        self.run, self.run_dir, self.log_dir, self.console = run, run_dir, log_dir, console
        self.nproc, self.metrics_port = nproc, metrics_port
        self.stop_requested = False
        self.kill_requested = False

    def request_stop(self, signum: int = signal.SIGINT, frame: Any = None) -> None:
        """Signal handler: the first call stops the stage with a checkpoint, a second one kills it."""
        if self.stop_requested:
            self.kill_requested = True
        self.stop_requested = True

    def env(self, attempt: int = 1, config_id: str = "") -> dict[str, str]:
        env = dict(os.environ, NANORUN_RUN=self.run.name, PYTHONUNBUFFERED="1")
        env[stage_files.ATTEMPT_ENV], env[stage_files.CONFIG_ID_ENV] = str(attempt), config_id
        # As on a cluster (operator/children/pytorchjob.py): how often ranks beat, how long a collective
        # may block.
        retry = self.run.spec.retry
        env.update(liveness.stage_environment(retry.stall_timeout_seconds, retry.heartbeat_seconds))
        if "OMP_NUM_THREADS" not in env and local_gpu_count() == 0:
            env["OMP_NUM_THREADS"] = str(cpu_threads_per_stage())
        endpoint = self.run.spec.storage.endpoint
        if endpoint and "AWS_ENDPOINT_URL" not in env:
            env["AWS_ENDPOINT_URL"] = endpoint
        return env

    def execute(self) -> list[StageOutcome]:
        outcomes: list[StageOutcome] = []
        plan = stage_plan(self.run.spec)
        ids = config_ids(plan)
        for stage in plan:
            done = stage_files.read_done(self.run_dir, stage.key)
            if stage_files.is_current(done, ids[stage.key]):
                self.console.print(
                    f"[dim]✓ {stage.key}: already done ({done.seconds:.0f}s), skipped[/dim]", soft_wrap=True
                )
                outcomes.append(StageOutcome(stage, "done", done.seconds, done.metrics))
                continue
            if self.stop_requested:
                break
            if done is not None:
                self.console.print(
                    stage_files.rerun_reason(done, ids[stage.key]), soft_wrap=True, markup=False
                )
            outcome = self.run_stage(stage, ids[stage.key])
            outcomes.append(outcome)
            if outcome.status != "ran":
                break
        return outcomes

    def run_stage(self, stage: PlannedStage, config_id: str = "") -> StageOutcome:
        nproc = processes_for(stage, self.run.spec, self.nproc)
        # the attempt after the one whose progress.json is there (a stage stopped or failed before)
        previous = stage_files.read_progress(self.run_dir, stage.key)
        attempt = previous.attempt + 1 if previous else 1
        cmd = stage_command(stage, self.run_dir, nproc, self.metrics_port)
        self.log_dir.mkdir(parents=True, exist_ok=True)
        log_path = self.log_dir / f"{stage.key}.log"
        start, cpu_start = time.time(), _children_cpu_seconds()
        with open(log_path, "ab") as log:
            log.write(f"\n$ {' '.join(cmd)}\n# attempt {attempt}, config {config_id or '(none)'}\n".encode())
            log.flush()
            # A new session: the terminal's Ctrl-C reaches only us, and we forward SIGTERM so the stage
            # checkpoints before it exits (a SIGINT would interrupt it mid-step).
            proc = subprocess.Popen(
                cmd,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=self.env(attempt, config_id),
                start_new_session=True,
            )
            try:
                rc = self._watch(stage, proc, nproc)
            finally:
                if proc.poll() is None:  # we are failing ourselves: leave no stage running behind
                    _signal_group(proc, signal.SIGKILL)
                    proc.wait()
        seconds, cpu = time.time() - start, _children_cpu_seconds() - cpu_start
        if rc == 0:
            done = stage_files.read_done(self.run_dir, stage.key)
            return StageOutcome(stage, "ran", seconds, done.metrics if done else {}, cpu)
        status = "stopped" if self.stop_requested else "failed"
        if status == "failed":
            tail = deque(log_path.read_text(errors="replace").splitlines(), maxlen=25)
            self.console.print(
                f"[red]✗ {stage.key} exited with code {rc}[/red]; last lines of {log_path}:", soft_wrap=True
            )
            self.console.print("\n".join(tail), markup=False, highlight=False, soft_wrap=True)
        return StageOutcome(stage, status, seconds, {}, cpu)

    def _watch(self, stage: PlannedStage, proc: subprocess.Popen, nproc: int) -> int:
        label = stage.key + (f" ×{nproc}" if nproc > 1 else "")
        columns = (
            TextColumn("[bold]{task.description:<14}"),
            BarColumn(),
            TaskProgressColumn(),
            TextColumn("{task.fields[steps]:>13}"),
            TimeElapsedColumn(),
            TextColumn("{task.fields[info]}"),
        )
        with Progress(*columns, console=self.console, transient=False) as bars:
            task = bars.add_task(label, total=None, steps="", info="starting")
            stopping_since: float | None = None
            while True:
                try:
                    rc: int | None = proc.wait(timeout=POLL_SECONDS)
                except subprocess.TimeoutExpired:
                    rc = None
                p = stage_files.read_progress(self.run_dir, stage.key)
                if p and p.total_steps:
                    bars.update(
                        task,
                        total=p.total_steps,
                        completed=p.step,
                        steps=f"{p.step}/{p.total_steps}",
                        info=_progress_fields(p),
                    )
                if rc is not None:
                    if rc == 0:
                        total = bars.tasks[0].total or 1
                        bars.update(task, total=total, completed=total, info=_progress_fields(p) or "done")
                    return rc
                if self.stop_requested and stopping_since is None:
                    stopping_since = time.time()
                    bars.update(task, info="stopping: saving a checkpoint (Ctrl-C again to kill)")
                    _signal_group(proc, signal.SIGTERM)
                if self.kill_requested or (
                    stopping_since and time.time() - stopping_since > STOP_GRACE_SECONDS
                ):
                    _signal_group(proc, signal.SIGKILL)


def _children_cpu_seconds() -> float:
    """User + system CPU time of the finished (waited-for) child processes, their children included."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _signal_group(proc: subprocess.Popen, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, sig)


def summary_table(outcomes: list[StageOutcome]) -> Table:
    table = Table(title="nanorun run")
    for col in ("stage", "status", "time", "cpu", "metrics"):
        table.add_column(col)
    for o in outcomes:
        shown = {k: v for k, v in o.metrics.items() if k in SUMMARY_METRICS and v is not None}
        if not shown:
            shown = {k: v for k, v in list(o.metrics.items())[:4] if isinstance(v, int | float)}
        metrics = "  ".join(f"{k}={_fmt_metric(v)}" for k, v in shown.items())
        cpu = f"{o.cpu_seconds:.0f}s" if o.cpu_seconds is not None else ""
        table.add_row(o.stage.key, o.status, f"{o.seconds:.0f}s", cpu, metrics)
    return table


def default_log_dir(run_dir: str, name: str) -> Path:
    if storage.is_s3(run_dir):
        return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "nanorun" / "logs" / name
    return Path(run_dir) / "logs"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="nanorun run", description="Run an LLMRun file on this machine.")
    p.add_argument(
        "file",
        help="LLMRun or LLMSweep YAML file (apiVersion: nanorun.io/v1alpha1, kind: LLMRun or LLMSweep)",
    )
    p.add_argument(
        "--run-dir", default=None, help="run directory (local path or s3://); overrides spec.storage.uri"
    )
    p.add_argument("--serve", action="store_true", help="serve the chat model when training has finished")
    p.add_argument("--host", default="127.0.0.1", help="address the chat service listens on (with --serve)")
    p.add_argument("--port", type=int, default=8000, help="port of the chat service (with --serve)")
    p.add_argument(
        "--api-keys-file",
        default=None,
        metavar="FILE",
        help="API keys of the chat service, one per line (with --serve; needed when the file names "
        "serving.apiKeysSecret)",
    )
    p.add_argument(
        "--nproc-per-node",
        type=int,
        default=None,
        help="processes for distributed stages (default: local GPUs, capped by compute.gpusPerNode; 1 on CPU)",
    )
    p.add_argument("--metrics-port", type=int, default=None, help="Prometheus metrics port of the stages")
    p.add_argument("--log-dir", default=None, help="where stage logs go (default: <run-dir>/logs)")
    p.add_argument("--dry-run", action="store_true", help="print the stage commands and exit")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from nanorun.cli import sweep  # an LLMSweep file: its points one after another (cli/sweep.py)

    doc = sweep.read_doc(args.file)
    if sweep.is_sweep(doc):
        return sweep.run_sweep(args.file, doc, args)
    console = Console()
    try:
        run = load_run_file(args.file)
    except RunFileError as e:
        print(f"nanorun run: {e}", file=sys.stderr)  # plain text: no wrapping inside the CRD's messages
        return 2
    serve_access: list[str] = []
    if args.serve and run.spec.serving.enabled:
        try:
            serve_access = serve_access_flags(run.spec, args.api_keys_file)
        except RunFileError as e:
            print(f"nanorun run: {e}", file=sys.stderr)
            return 2
    run_dir = args.run_dir or run.spec.storage.uri
    if not storage.is_s3(run_dir):
        run_dir = str(Path(run_dir).expanduser().resolve())
    plan = stage_plan(run.spec)
    if args.dry_run:
        for stage in plan:
            nproc = processes_for(stage, run.spec, args.nproc_per_node)
            print(" ".join(stage_command(stage, run_dir, nproc, args.metrics_port)))
        return 0

    log_dir = Path(args.log_dir) if args.log_dir else default_log_dir(run_dir, run.name)
    console.print(
        f"[bold]nanorun run[/bold] {run.name}: {len(plan)} stages → {run_dir}  (logs in {log_dir})",
        soft_wrap=True,
    )
    local = LocalRun(
        run, run_dir, log_dir, console, nproc=args.nproc_per_node, metrics_port=args.metrics_port
    )
    handlers = {sig: signal.signal(sig, local.request_stop) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        outcomes = local.execute()
    finally:
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
    console.print(summary_table(outcomes))
    last = outcomes[-1].status if outcomes else "ran"
    if last == "stopped" or (local.stop_requested and len(outcomes) < len(plan)):
        console.print("Stopped. The stage saved a checkpoint; run the same command again to resume.")
        return 130
    if last == "failed":
        console.print("A stage failed; fix the cause and run the same command again to resume.")
        return 1
    report = storage.join(layout.report_dir(run_dir), "report.md")
    if storage.exists(report):
        console.print(f"Report: {report}", soft_wrap=True)
    if args.serve and not run.spec.serving.enabled:
        console.print("Not serving: spec.serving.enabled is false in the file.")
    elif args.serve:
        from nanorun.serving.cli import main as serve_main

        return serve_main(
            ["--checkpoint", run_dir, "--host", args.host, "--port", str(args.port), *serve_access]
        )
    return 0


def serve_access_flags(spec: LLMRunSpec, api_keys_file: str | None) -> list[str]:
    """`nanorun serve`'s access flags for spec.serving on this machine (RunFileError: it cannot serve)."""
    from nanorun.serving.cli import build_parser as serve_parser
    from nanorun.serving.cli import check_access

    s = spec.serving
    if api_keys_file:
        who = ["--api-keys-file", str(Path(api_keys_file).expanduser().resolve())]
    elif s.allow_unauthenticated:
        who = ["--allow-unauthenticated"]
    else:
        raise RunFileError(
            f"spec.serving.apiKeysSecret names the Secret {s.api_keys_secret!r}, which only a cluster has: "
            "give --api-keys-file FILE (the API keys, one per line) to serve on this machine"
        )
    flags = [
        *who,
        "--max-request-bytes",
        str(s.max_request_bytes),
        "--rate-limit",
        str(s.rate_limit_per_minute),
    ]
    problem = check_access(serve_parser().parse_args(["--checkpoint", "-", *flags]))
    if problem:
        raise RunFileError(problem)
    return flags


if __name__ == "__main__":
    sys.exit(main())
