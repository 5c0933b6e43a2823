"""The sweep report: one table of a sweep's points and the scaling-law plots, in the sweep's directory.

    python -m nanorun.trainer.sweep_report --run-dir SWEEP_DIR

Reads `<sweep-dir>/sweep.json` (the points, written by the operator or `nanorun run` before any point
trains) and each point's done.json files (pretrain: params, tokens, FLOPs, val bpb, time; baseEval:
CORE and val bpb), and writes `<sweep-dir>/report/`:

- `report.md`: a row per point (depth, parameters, tokens, FLOPs, val bpb, CORE, time, GPU-hours =
  time × the point's GPUs), the best point, and for isoFLOP sweeps the compute-optimal parameters and
  tokens per budget with the fitted exponents of N_opt ∝ C^a and D_opt ∝ C^b (Hoffmann et al. 2022,
  approach 2: trainer/evaluation/scaling.py);
- `points.csv`: the same table, for notebooks;
- `bpb_vs_flops.png`: val bpb against training FLOPs, one line per depth;
- isoFLOP sweeps: `isoflop.png` (val bpb against parameters, one curve per budget, with the fitted
  parabola and its minimum) and `optimal.png` (N_opt and D_opt against FLOPs, with the power laws);
- ladders: `bpb_vs_params.png` (val bpb against parameters).

Parameters are the scaling parameters (block matrices and LM head) that nanochat's horizon and
scaling_laws.sh count. Points that have not finished are listed without numbers and left out of the
fits. One process; it only reads files, so running it again rewrites the same report.
"""

from __future__ import annotations

import argparse
import csv
import io
import sys
from dataclasses import dataclass
from typing import Any

from nanorun.pipeline import progress, storage
from nanorun.pipeline import sweep as sweep_files
from nanorun.pipeline.errors import run_main
from nanorun.trainer.evaluation.scaling import ComputeOptimal, compute_optimal


@dataclass
class PointResult:
    info: sweep_files.PointInfo
    params: int | None = None
    tokens: int | None = None
    flops: float | None = None
    val_bpb: float | None = None
    core: float | None = None
    seconds: float | None = None

    @property
    def finished(self) -> bool:
        return None not in (self.params, self.tokens, self.flops, self.val_bpb)

    @property
    def gpu_hours(self) -> float | None:
        return None if self.seconds is None else self.seconds * self.info.gpus / 3600


def read_point(sweep_dir: str, info: sweep_files.PointInfo) -> PointResult:
    """A point's numbers from its done.json files (none while it has not finished pretraining)."""
    run_dir = sweep_files.point_dir(sweep_dir, info)
    pre = progress.read_done(run_dir, "pretrain")
    ev = progress.read_done(run_dir, "baseEval")
    result = PointResult(info)
    if pre is None:
        return result
    m = pre.metrics
    result.params = m.get("scaling_params") or m.get("params")
    result.tokens, result.flops = m.get("tokens"), m.get("flops")
    result.val_bpb = (ev.metrics.get("val_bpb") if ev else None) or m.get("val_bpb")
    result.core = ev.metrics.get("core") if ev else m.get("core")
    result.seconds = pre.seconds + (ev.seconds if ev else 0.0)
    return result


def read_points(sweep_dir: str) -> list[PointResult]:
    infos = sweep_files.read_manifest(sweep_dir)
    if infos is None:
        raise SystemExit(f"no {sweep_files.MANIFEST_FILE} in {sweep_dir}: not a sweep's directory")
    return [read_point(sweep_dir, i) for i in infos]


def fit(points: list[PointResult]) -> ComputeOptimal | None:
    """The isoFLOP fits over the finished points of a sweep with budgets (None for a ladder)."""
    rows = [
        (p.info.flop_budget, p.params, p.tokens, p.val_bpb)
        for p in points
        if p.finished and p.info.flop_budget is not None
    ]
    return compute_optimal(rows) if rows else None


# --- plots ------------------------------------------------------------------------------------------


def _figure(width: float = 6.0, height: float = 4.0):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(width, height))
    return plt, fig, ax


def _png(plt, fig, ax) -> bytes:
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    plt.close(fig)
    return buffer.getvalue()


def plot_bpb_vs_flops(points: list[PointResult]) -> bytes:
    plt, fig, ax = _figure()
    for depth in sorted({p.info.depth for p in points}):
        mine = sorted((p.flops, p.val_bpb) for p in points if p.info.depth == depth)
        ax.plot(*zip(*mine, strict=True), marker="o", label=f"d{depth}")
    ax.set_xscale("log")
    ax.set_xlabel("training FLOPs")
    ax.set_ylabel("val bpb")
    ax.set_title("validation bits per byte by depth")
    return _png(plt, fig, ax)


def plot_isoflop(points: list[PointResult], fits: ComputeOptimal) -> bytes:
    import numpy as np

    plt, fig, ax = _figure()
    optimum = {o.flops: o for o in fits.optima}
    for budget in sorted({p.info.flop_budget for p in points}):
        curve = sorted((p.params, p.val_bpb) for p in points if p.info.flop_budget == budget)
        n, bpb = (np.array(v, dtype=float) for v in zip(*curve, strict=True))
        line = ax.plot(n, bpb, "o", label=f"{budget:.3g} FLOPs")[0]
        if len(n) >= 3:
            parabola = np.polyfit(np.log(n), bpb, 2)
            grid = np.geomspace(n.min(), n.max(), 50)
            ax.plot(grid, np.polyval(parabola, np.log(grid)), "-", color=line.get_color(), alpha=0.6)
        if budget in optimum:
            o = optimum[budget]
            ax.plot([o.params], [o.loss], "*", markersize=12, color=line.get_color())
    ax.set_xscale("log")
    ax.set_xlabel("parameters (scaling)")
    ax.set_ylabel("val bpb")
    ax.set_title("isoFLOP curves (★ fitted optimum)")
    return _png(plt, fig, ax)


def plot_optimal(fits: ComputeOptimal) -> bytes:
    import numpy as np

    plt, fig, ax = _figure()
    cs = np.array([o.flops for o in fits.optima])
    grid = np.geomspace(cs.min(), cs.max(), 20)
    for values, law, name in (
        ([o.params for o in fits.optima], fits.params, "N_opt (parameters)"),
        ([o.tokens for o in fits.optima], fits.tokens, "D_opt (tokens)"),
    ):
        line = ax.plot(cs, values, "o", label=name)[0]
        if law is not None:
            ax.plot(grid, law(grid), "-", color=line.get_color(), label=f"∝ C^{law.exponent:.3f}")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("training FLOPs C")
    ax.set_title("compute-optimal model size and data")
    return _png(plt, fig, ax)


def plot_bpb_vs_params(points: list[PointResult]) -> bytes:
    plt, fig, ax = _figure()
    mine = sorted((p.params, p.val_bpb, p.info.depth) for p in points)
    ax.plot([m[0] for m in mine], [m[1] for m in mine], marker="o", label="val bpb")
    for n, bpb, depth in mine:
        ax.annotate(f"d{depth}", (n, bpb), textcoords="offset points", xytext=(4, 4), fontsize=8)
    ax.set_xscale("log")
    ax.set_xlabel("parameters (scaling)")
    ax.set_ylabel("val bpb")
    ax.set_title("the ladder: val bpb by model size")
    return _png(plt, fig, ax)


# --- the report -------------------------------------------------------------------------------------

COLUMNS = ("point", "depth", "params", "tokens", "flops", "val_bpb", "core", "seconds", "gpu_hours")


def _fmt(value: Any, kind: str = "") -> str:
    if value is None:
        return "-"
    if kind == "big":
        return f"{value:.3g}"
    if isinstance(value, float):
        return f"{value:.4f}"
    return str(value)


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    h, rest = divmod(int(round(seconds)), 3600)
    m, s = divmod(rest, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


def row(p: PointResult) -> dict[str, Any]:
    return {
        "point": p.info.name,
        "depth": p.info.depth,
        "params": p.params,
        "tokens": p.tokens,
        "flops": p.flops,
        "val_bpb": p.val_bpb,
        "core": p.core,
        "seconds": p.seconds,
        "gpu_hours": p.gpu_hours,
    }


def render(points: list[PointResult], fits: ComputeOptimal | None, charts: list[str]) -> str:
    done = [p for p in points if p.finished]
    lines = ["# Sweep report", ""]
    budgets = sorted({p.info.flop_budget for p in points if p.info.flop_budget is not None})
    if budgets:
        axis = "isoFLOP: every depth at " + ", ".join(f"{b:.3g}" for b in budgets) + " training FLOPs"
    else:
        axis = f"ladder: every depth at {points[0].info.tokens_per_param:g} tokens per parameter"
    lines += [f"{len(done)} of {len(points)} points finished; {axis}.", ""]
    lines += [
        "| point | depth | params | tokens | FLOPs | val bpb | CORE | time | GPU-hours |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for p in points:
        lines.append(
            f"| {p.info.name} | {p.info.depth} | {_fmt(p.params, 'big')} | {_fmt(p.tokens, 'big')} | "
            f"{_fmt(p.flops, 'big')} | {_fmt(p.val_bpb)} | {_fmt(p.core)} | {_duration(p.seconds)} | "
            f"{_fmt(p.gpu_hours, 'big') if p.info.gpus else '- (CPU)'} |"
        )
    total = sum(p.gpu_hours or 0 for p in done)
    if done:
        best = min(done, key=lambda p: p.val_bpb)
        lines += ["", f"Best point: **{best.info.name}** (val bpb {best.val_bpb:.4f}).", ""]
        if any(p.info.gpus for p in done):
            lines += [f"GPU-hours of the finished points: {total:.3g}.", ""]
    if fits is not None:
        lines += ["## Compute-optimal models (Hoffmann et al. 2022, approach 2)", ""]
        lines += [
            "A parabola in log parameters through each budget's val bpb; its minimum is that budget's "
            "compute-optimal size N_opt, and D_opt the tokens a model of that size trains on within the budget.",
            "",
        ]
        if fits.optima:
            lines += [
                "| FLOPs | N_opt | D_opt | tokens per parameter | val bpb at the optimum |",
                "|---:|---:|---:|---:|---:|",
            ]
        for o in fits.optima:
            lines.append(
                f"| {o.flops:.3g} | {o.params:.3g} | {o.tokens:.3g} | {o.tokens / o.params:.3g} | {o.loss:.4f} |"
            )
        missing = [b for b in budgets if b not in {o.flops for o in fits.optima}]
        if missing:
            lines += [
                "",
                "No optimum for " + ", ".join(f"{b:.3g}" for b in missing) + " FLOPs: fewer than 3 finished "
                "sizes, or the lowest bpb at the smallest or largest size (train a wider range of depths).",
            ]
        lines.append("")
        if fits.params is not None and fits.tokens is not None:
            lines += [
                f"Fitted: **N_opt ∝ C^{fits.params.exponent:.3f}**, **D_opt ∝ C^{fits.tokens.exponent:.3f}** "
                f"(over {len(fits.optima)} budgets; Hoffmann et al. find 0.50 and 0.50).",
                "",
            ]
        else:
            lines += ["Exponents need optima at 2 budgets or more.", ""]
    lines += [f"![{c}]({c})" for c in charts]
    return "\n".join(lines) + "\n"


def write_report(sweep_dir: str) -> str:
    points = read_points(sweep_dir)
    done = [p for p in points if p.finished]
    fits = fit(points)
    out = sweep_files.report_dir(sweep_dir)
    charts: dict[str, bytes] = {}
    if done:
        charts["bpb_vs_flops.png"] = plot_bpb_vs_flops(done)
        if fits is not None:
            charts["isoflop.png"] = plot_isoflop(done, fits)
            if fits.optima:
                charts["optimal.png"] = plot_optimal(fits)
        else:
            charts["bpb_vs_params.png"] = plot_bpb_vs_params(done)
    for name, png in charts.items():
        storage.write_bytes(storage.join(out, name), png)
    table = io.StringIO()
    writer = csv.DictWriter(table, fieldnames=COLUMNS)
    writer.writeheader()
    writer.writerows(row(p) for p in points)
    storage.write_text(storage.join(out, "points.csv"), table.getvalue())
    uri = storage.join(out, "report.md")
    storage.write_text(uri, render(points, fits, list(charts)))
    return uri


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m nanorun.trainer.sweep_report", description=__doc__.split("\n")[0]
    )
    p.add_argument("--run-dir", required=True, help="the sweep's directory (its template's storage.uri)")
    p.add_argument("--metrics-port", type=int, default=None, help="unused: accepted like every stage's")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    uri = write_report(args.run_dir.rstrip("/"))
    print(f"sweep report: {uri}")
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
