"""`nanorun run SWEEP.yaml`: run an LLMSweep on this machine, one point after another.

    nanorun run examples/sweep-tiny.yaml               # the sweep's directory: template.storage.uri
    nanorun run examples/sweep-tiny.yaml --dry-run     # list the points and their stage commands

The same children the operator creates on a cluster (operator/sweep/api.py): the tokenizer run (unless
template.tokenizer.from names one), then each point, run by `nanorun run`'s local executor
(cli/run.py `LocalRun`) with its progress bars, under a line that says which point of how many is
running. Finished stages are skipped and an interrupted one resumes, so running the same command
again continues the sweep where it stopped; a point that fails stops the sweep (fix the cause and
run again). Finally `python -m nanorun.trainer.sweep_report` writes `<sweep-dir>/report/report.md`.
"""

from __future__ import annotations

import argparse
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from nanorun.cli.run import (
    LocalRun,
    RunFile,
    RunFileError,
    StageOutcome,
    default_log_dir,
    processes_for,
    stage_command,
)
from nanorun.operator.api import API_VERSION, LLMRunSpec, SpecError
from nanorun.operator.reconcile.plan import stage_plan
from nanorun.operator.sweep.api import (
    KIND,
    LLMSweepSpec,
    parse_sweep_spec,
    point_infos,
    point_spec,
    sweep_dir,
    sweep_points,
    sweep_to_dict,
    tokenizer_run_name,
    tokenizer_spec,
    trains_tokenizer,
)
from nanorun.pipeline import storage
from nanorun.pipeline import sweep as sweep_files
from rich.console import Console
from rich.table import Table


@dataclass
class SweepFile:
    name: str
    spec: LLMSweepSpec


def _local(uri: str) -> str:
    return uri if not uri or storage.is_s3(uri) else str(Path(uri).expanduser().resolve())


def load_sweep_file(path: str, doc: dict[str, Any], run_dir: str | None = None) -> SweepFile:
    """Validate an LLMSweep document (the same checks and messages as the CRD); local directories
    become absolute, so every point finds the sweep's tokenizer wherever it runs from."""
    name = (doc.get("metadata") or {}).get("name") or Path(path).stem
    try:
        spec = parse_sweep_spec(doc.get("spec"))
    except SpecError as e:
        raise RunFileError(f"{path}: the {KIND} {name!r} is invalid:\n{e}") from None
    data = sweep_to_dict(spec)
    storage_ = data["template"]["storage"]
    storage_["uri"] = _local(run_dir or storage_["uri"])
    tokenizer = data["template"].setdefault("tokenizer", {})
    tokenizer["from"] = _local(tokenizer.get("from", ""))
    return SweepFile(name, parse_sweep_spec(data))


def children(sweep: SweepFile) -> list[tuple[str, str, LLMRunSpec]]:
    """(run name, what it is, spec) of every child, in the order they run."""
    spec = sweep.spec
    out = []
    if trains_tokenizer(spec):
        out.append((tokenizer_run_name(sweep.name), "the sweep's tokenizer", tokenizer_spec(spec)))
    for p in sweep_points(sweep.name, spec):
        horizon = (
            f"{p.flop_budget:.3g} FLOPs"
            if p.flop_budget is not None
            else f"{p.tokens_per_param:g} tokens/param"
        )
        out.append((p.name, f"depth {p.depth}, {horizon}", point_spec(spec, p)))
    return out


def points_table(sweep: SweepFile, results: dict[str, tuple[str, float, list[StageOutcome]]]) -> Table:
    table = Table(title=f"nanorun sweep {sweep.name}")
    for col in ("point", "status", "time", "val bpb", "CORE"):
        table.add_column(col)
    for name, (status, seconds, outcomes) in results.items():
        metrics: dict[str, Any] = {}
        for o in outcomes:
            metrics.update({k: v for k, v in o.metrics.items() if v is not None})
        bpb, core = metrics.get("val_bpb"), metrics.get("core")
        table.add_row(
            name,
            status,
            f"{seconds:.0f}s",
            f"{bpb:.4f}" if isinstance(bpb, float) else "",
            f"{core:.4f}" if isinstance(core, float) else "",
        )
    return table


def run_sweep(path: str, doc: dict[str, Any], args: argparse.Namespace) -> int:
    """`nanorun run` for a file of kind LLMSweep (the parsed `args` of cli/run.py)."""
    try:
        sweep = load_sweep_file(path, doc, args.run_dir)
    except RunFileError as e:
        print(f"nanorun run: {e}", file=sys.stderr)
        return 2
    root = sweep_dir(sweep.spec)
    todo = children(sweep)
    if args.dry_run:
        for name, what, spec in todo:
            print(f"# {name}: {what}")
            for stage in stage_plan(spec):
                nproc = processes_for(stage, spec, args.nproc_per_node)
                print(" ".join(stage_command(stage, spec.storage.uri, nproc, args.metrics_port)))
        print(f"# report\n{sys.executable} -m nanorun.trainer.sweep_report --run-dir {root}")
        return 0

    console = Console()
    log_root = Path(args.log_dir) if args.log_dir else None
    points = len(todo) - trains_tokenizer(sweep.spec)
    console.print(f"[bold]nanorun run[/bold] sweep {sweep.name}: {points} points → {root}", soft_wrap=True)
    sweep_files.write_manifest(root, point_infos(sweep.name, sweep.spec))
    results: dict[str, tuple[str, float, list[StageOutcome]]] = {}
    current: list[LocalRun] = []

    def stop(signum: int, frame: Any) -> None:
        for local in current:
            local.request_stop(signum, frame)

    handlers = {sig: signal.signal(sig, stop) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        for i, (name, what, spec) in enumerate(todo):
            n = i + 1 - trains_tokenizer(sweep.spec)
            label = f"point {n}/{points}" if n > 0 else "tokenizer"
            console.rule(f"[bold]{label}[/bold]: {name} ({what})")
            log_dir = log_root / name if log_root else default_log_dir(spec.storage.uri, name)
            local = LocalRun(RunFile(name, spec), spec.storage.uri, log_dir, console, args.nproc_per_node)
            current[:] = [local]
            start = time.time()
            outcomes = local.execute()
            last = outcomes[-1].status if outcomes else "done"
            stopped = local.stop_requested and (last == "stopped" or len(outcomes) < len(stage_plan(spec)))
            status = "stopped" if stopped else "failed" if last == "failed" else "done"
            results[name] = (status, time.time() - start, outcomes)
            if status != "done":
                break
    finally:
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
    console.print(points_table(sweep, results))
    statuses = {s for s, _, _ in results.values()}
    if "stopped" in statuses:
        console.print("Stopped. Run the same command again to continue the sweep.")
        return 130
    if "failed" in statuses:
        console.print("A point failed; fix the cause and run the same command again to continue the sweep.")
        return 1
    report = subprocess.run([sys.executable, "-m", "nanorun.trainer.sweep_report", "--run-dir", root])
    if report.returncode:
        return report.returncode
    console.print(f"Report: {sweep_files.report_dir(root)}/report.md", soft_wrap=True)
    return 0


def is_sweep(doc: Any) -> bool:
    return isinstance(doc, dict) and doc.get("apiVersion") == API_VERSION and doc.get("kind") == KIND


def read_doc(path: str) -> Any:
    try:
        return yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError):
        return None  # cli/run.py's own loading says what is wrong with the file
