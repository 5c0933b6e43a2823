"""The `report` stage: one Markdown report card of a whole run, with plots.

    python -m nanorun.trainer.report --run-dir URI [--gpu-hour-price 3.0]

Reads what the other stages left in the run directory (done.json, progress.json, history.jsonl,
the eval stage's results and samples) and writes `<run-dir>/report/`:

- `report.md`: environment (hardware, software, git commit), the exported Hugging Face folder when
  the export stage ran, a metrics table by stage like nanochat's
  BASE/MID/SFT/RL summary (CORE, ARC-E/C, MMLU, GSM8K, HumanEval, SpellingBee, ChatCORE, bpb),
  per-stage wall time with an estimated cost (GPU-hours x `--gpu-hour-price`; GPU-hours = wall time
  x processes), sample conversations, and the plots;
- `loss.png` (training loss by stage), `bpb.png` (validation bits per byte by stage) and, when RL
  ran, `rl.png` (mean reward and pass@k).

Stages that did not run are shown as "-"; the report is written even for a partial run.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from nanorun.pipeline import layout, storage
from nanorun.pipeline.errors import run_main
from nanorun.pipeline.progress import read_done, read_progress
from nanorun.pipeline.stages import CHAT_KEYS, MODEL_KEYS, MODEL_STAGES
from nanorun.pipeline.stages import STAGES as PIPELINE
from nanorun.trainer.training.common import add_common_args, setup_stage, teardown

STAGES = tuple(s.key for s in PIPELINE if s.key != "report")  # the stages reported on
COLUMNS = {s.report_column: s.key for s in MODEL_STAGES}
TABLE_ROWS = (
    "CORE",
    "ARC-Easy",
    "ARC-Challenge",
    "MMLU",
    "GSM8K",
    "HumanEval",
    "SpellingBee",
    "ChatCORE",
    "val bpb",
)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m nanorun.trainer.report", description=__doc__.split("\n")[0])
    add_common_args(p)
    p.add_argument(
        "--gpu-hour-price", type=float, default=3.0, help="price of one GPU-hour, for the cost estimate"
    )
    p.add_argument("--currency", default="$", help="currency symbol of --gpu-hour-price")
    p.add_argument("--samples", type=int, default=6, help="sample conversations to include")
    return p


def read_history(run_dir: str, stage: str) -> list[dict[str, Any]]:
    uri = storage.join(layout.stage_dir(run_dir, stage), layout.HISTORY_FILE)
    text = storage.read_text(uri) if storage.exists(uri) else ""
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def git_commit() -> str:
    if os.environ.get("NANORUN_GIT_COMMIT"):
        return os.environ["NANORUN_GIT_COMMIT"]
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short=12", "HEAD"],
            cwd=Path(__file__).parent,
            capture_output=True,
            text=True,
            timeout=10,
        )
        dirty = subprocess.run(
            ["git", "status", "--porcelain"],
            cwd=Path(__file__).parent,
            capture_output=True,
            text=True,
            timeout=10,
        )
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    if out.returncode != 0:
        return "unknown (not a git checkout; set NANORUN_GIT_COMMIT)"
    return out.stdout.strip() + (" (with uncommitted changes)" if dirty.stdout.strip() else "")


def environment() -> dict[str, str]:
    import psutil
    import torch

    try:
        from importlib.metadata import version

        nanorun_version = version("nanorun")
    except Exception:  # not installed as a distribution (e.g. run from a source tree)
        nanorun_version = "unknown"
    gpus = (
        [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        if torch.cuda.is_available()
        else []
    )
    return {
        "platform": platform.platform(),
        "CPU": f"{platform.processor() or platform.machine()}, {psutil.cpu_count(logical=True)} logical cores",
        "memory": f"{psutil.virtual_memory().total / 2**30:.1f} GiB",
        "GPUs": f"{len(gpus)} x {gpus[0]}" if gpus else "none",
        "python": sys.version.split()[0],
        "torch": torch.__version__ + (f" (CUDA {torch.version.cuda})" if torch.version.cuda else ""),
        "nanorun": nanorun_version,
        "git commit": git_commit(),
    }


def metrics_table(run_dir: str) -> dict[str, dict[str, float | None]]:
    """{row: {column: value}} for the BASE/MID/SFT/RL table."""
    table: dict[str, dict[str, float | None]] = {row: dict.fromkeys(COLUMNS) for row in TABLE_ROWS}
    pretrain, base_eval = read_done(run_dir, "pretrain"), read_done(run_dir, "baseEval")
    for done in (pretrain, base_eval):  # baseEval's numbers win over pretrain's
        if done is not None:
            for key, row in (("core", "CORE"), ("CORE", "CORE"), ("val_bpb", "val bpb")):
                if done.metrics.get(key) is not None:
                    table[row]["BASE"] = done.metrics[key]
    for column, stage in COLUMNS.items():
        if column == "BASE":
            continue
        done = read_done(run_dir, stage)
        if done is not None and done.metrics.get("val_bpb") is not None:
            table["val bpb"][column] = done.metrics["val_bpb"]
        if column == "RL" and done is not None and done.metrics.get("task") == "GSM8K":
            table["GSM8K"]["RL"] = done.metrics.get("pass@1")  # rl's own held-out pass@1
        evaluated = storage.read_json_or_none(
            storage.join(layout.stage_dir(run_dir, "eval"), f"{stage}.json")
        )
        if evaluated:
            for task, accuracy in evaluated["results"].items():
                if task in table:
                    table[task][column] = accuracy
            table["ChatCORE"][column] = evaluated.get("ChatCORE")
    return table


def stage_costs(run_dir: str, price: float) -> list[dict[str, Any]]:
    rows = []
    for stage in STAGES:
        done = read_done(run_dir, stage)
        if done is None:
            continue
        progress = read_progress(run_dir, stage)
        processes = progress.world_size if progress else 1
        gpu_hours = done.seconds * processes / 3600
        rows.append(
            {
                "stage": stage,
                "seconds": done.seconds,
                "compile_seconds": done.metrics.get("compile_seconds") or 0.0,
                "processes": processes,
                "gpu_hours": gpu_hours,
                "cost": gpu_hours * price,
            }
        )
    return rows


def plot_curves(
    histories: dict[str, list[dict[str, Any]]], key: str, ylabel: str, title: str
) -> bytes | None:
    """A PNG with one panel per stage that recorded `key`; None when no stage did."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = {
        s: [(r["step"], r[key]) for r in h if r.get(key) is not None and "step" in r]
        for s, h in histories.items()
    }
    panels = {s: points for s, points in panels.items() if points}
    if not panels:
        return None
    fig, axes = plt.subplots(1, len(panels), figsize=(4.5 * len(panels), 3.5), squeeze=False)
    for ax, (stage, points) in zip(axes[0], panels.items(), strict=True):
        steps, values = zip(*points, strict=True)
        ax.plot(steps, values, marker="o" if len(points) < 20 else None, markersize=3)
        ax.set_title(stage)
        ax.set_xlabel("step")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    plt.close(fig)
    return buffer.getvalue()


def fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4f}"
    return str(value)


def duration(seconds: float) -> str:
    h, rest = divmod(int(round(seconds)), 3600)
    m, s = divmod(rest, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s"


def sample_conversations(run_dir: str, limit: int) -> list[dict[str, Any]]:
    samples_dir = storage.join(layout.stage_dir(run_dir, "eval"), "samples")
    evaluated = [s for s in reversed(CHAT_KEYS) if storage.exists(storage.join(samples_dir, f"{s}.jsonl"))]
    if not evaluated:
        return []
    text = storage.read_text(storage.join(samples_dir, f"{evaluated[0]}.jsonl"))
    return [{**json.loads(line), "source": evaluated[0]} for line in text.splitlines() if line.strip()][
        :limit
    ]


def exported_model(run_dir: str) -> list[str]:
    """The report's lines on the export stage's Hugging Face folder (none when it did not run)."""
    done = read_done(run_dir, "export")
    if done is None or not done.outputs.get("model"):
        return []
    return [
        "",
        "## Exported model",
        "",
        f"Hugging Face folder: [{done.outputs['model']}]({done.outputs['model']}) ({done.metrics.get('dtype', '?')} "
        f"weights of the {done.metrics.get('source', '?')} checkpoint `{done.outputs.get('checkpoint', '?')}`). "
        "Load it with `AutoModelForCausalLM.from_pretrained(FOLDER, trust_remote_code=True)`; see docs/export.md.",
    ]


def render_report(
    run_dir: str,
    env: dict[str, str],
    table: dict,
    costs: list[dict],
    plots: list[str],
    samples: list[dict],
    currency: str,
    price: float,
) -> str:
    lines = [
        f"# nanorun report: {run_dir}",
        "",
        f"Generated {time.strftime('%Y-%m-%d %H:%M:%S %Z')}.",
        "",
        "## Environment",
        "",
    ]
    lines += ["| | |", "|---|---|"] + [f"| {k} | {v} |" for k, v in env.items()]
    lines += exported_model(run_dir)
    lines += [
        "",
        "## Summary",
        "",
        "| Metric | " + " | ".join(COLUMNS) + " |",
        "|---" * (len(COLUMNS) + 1) + "|",
    ]
    lines += [f"| {row} | " + " | ".join(fmt(table[row][c]) for c in COLUMNS) + " |" for row in TABLE_ROWS]
    lines += [
        "",
        "GSM8K under RL is the rl stage's held-out pass@1 unless the eval stage evaluated rl. ChatCORE is the mean "
        "of the baseline-centred accuracies of the tasks that were evaluated.",
        "",
    ]
    total_seconds = sum(c["seconds"] for c in costs)
    total_cost = sum(c["cost"] for c in costs)
    lines += [
        "## Wall time and estimated cost",
        "",
        f"GPU-hours = wall time x processes; price {currency}{price:.2f} per GPU-hour. Compile: the part "
        "of the wall time torch.compile took (the steps that compiled), apart from the training steps.",
        "",
    ]
    lines += ["| Stage | Wall time | Compile | Processes | GPU-hours | Cost |", "|---|---|---|---|---|---|"]
    lines += [
        f"| {c['stage']} | {duration(c['seconds'])} | {duration(c['compile_seconds']) if c['compile_seconds'] else '-'} "
        f"| {c['processes']} | {c['gpu_hours']:.3f} | {currency}{c['cost']:.2f} |"
        for c in costs
    ]
    total_compile = sum(c["compile_seconds"] for c in costs)
    lines += [
        f"| **total** | **{duration(total_seconds)}** | {duration(total_compile) if total_compile else '-'} "
        f"| | | **{currency}{total_cost:.2f}** |",
        "",
    ]
    if plots:
        lines += ["## Curves", ""] + [f"![{Path(p).stem}]({p})" for p in plots] + [""]
    if samples:
        lines += ["## Sample conversations", ""]
        for s in samples:
            prompt = next((m["content"] for m in s["prompt"] if m["role"] == "user"), "")
            lines += [
                f"**{s['task']}** ({s['source']}, {'passed' if s.get('passed') else 'failed'})",
                "",
                "> " + str(prompt).strip().replace("\n", "\n> "),
                "",
                "```text",
                str(s["reply"]).strip(),
                "```",
                "",
            ]
    return "\n".join(lines) + "\n"


def write_report(run_dir: str, price: float = 3.0, currency: str = "$", samples: int = 6) -> str:
    """Write `<run-dir>/report/` and return the URI of report.md."""
    out = layout.report_dir(run_dir)
    histories = {s: read_history(run_dir, s) for s in MODEL_KEYS}
    plots = []
    for name, key, ylabel, title in (
        ("loss.png", "loss", "loss (nats/token)", "training loss"),
        ("bpb.png", "val_bpb", "bits per byte", "validation bits per byte"),
        ("rl.png", "reward", "mean reward", "RL: mean reward per step"),
    ):
        png = plot_curves(histories, key, ylabel, title)
        if png is not None:
            storage.write_bytes(storage.join(out, name), png)
            plots.append(name)
    text = render_report(
        run_dir,
        environment(),
        metrics_table(run_dir),
        stage_costs(run_dir, price),
        plots,
        sample_conversations(run_dir, samples),
        currency,
        price,
    )
    uri = storage.join(out, "report.md")
    storage.write_text(uri, text)
    return uri


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    ctx = setup_stage("report", args)
    if ctx.already_done:
        return teardown(ctx)
    uri = None
    if ctx.is_master:
        uri = write_report(ctx.run_dir, args.gpu_hour_price, args.currency, args.samples)
        ctx.print0(f"report: {uri}")
    ctx.done({"stages": [c["stage"] for c in stage_costs(ctx.run_dir, args.gpu_hour_price)]}, {"report": uri})
    return teardown(ctx)


if __name__ == "__main__":
    sys.exit(run_main(main))
