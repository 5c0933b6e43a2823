"""The sweep report from points' done.json files: the table, the best point, the fitted exponents
of the compute-optimal size and data, and the charts; unfinished points are listed, not fitted."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
from nanorun.pipeline import sweep as sweep_files
from nanorun.pipeline.progress import Done, write_done
from nanorun.trainer import sweep_report

A = 0.45  # the synthetic points' compute-optimal size grows as C^A


def write_point(sweep_dir: str, info: sweep_files.PointInfo, params: float, bpb: float, core: float) -> None:
    run_dir = sweep_files.point_dir(sweep_dir, info)
    flops = info.flop_budget or 6 * params * params * info.tokens_per_param
    tokens = flops / (6 * params)
    pretrain = {
        "scaling_params": int(params),
        "params": int(params * 1.3),
        "tokens": int(tokens),
        "flops": flops,
    }
    write_done(run_dir, Done(stage="pretrain", seconds=3600.0, metrics={**pretrain, "val_bpb": bpb}))
    write_done(run_dir, Done(stage="baseEval", seconds=360.0, metrics={"val_bpb": bpb, "core": core}))


def isoflop_sweep(sweep_dir: str, unfinished: str = "") -> list[sweep_files.PointInfo]:
    infos = []
    for budget in (1e18, 1e19, 1e20):
        n_opt = 0.1 * budget**A
        for depth, factor in zip((8, 12, 16, 20, 24), (0.25, 0.5, 1.0, 2.0, 4.0), strict=True):
            info = sweep_files.PointInfo(
                f"s-d{depth}-f{budget:.0e}", f"d{depth}-f{budget:.0e}", depth, budget, gpus=8
            )
            infos.append(info)
            if info.name != unfinished:
                bpb = 1.2 - 0.03 * np.log10(budget) + 0.02 * np.log(factor) ** 2
                write_point(sweep_dir, info, n_opt * factor, bpb, core=0.1 * np.log10(budget))
    sweep_files.write_manifest(sweep_dir, infos)
    return infos


def test_an_isoflop_report_fits_the_exponents_and_lists_every_point(tmp_path):
    sweep_dir = str(tmp_path)
    infos = isoflop_sweep(sweep_dir, unfinished="s-d24-f1e+20")
    assert sweep_report.main(["--run-dir", sweep_dir]) == 0
    text = Path(sweep_dir, "report", "report.md").read_text()
    assert f"N_opt ∝ C^{A:.3f}" in text and f"D_opt ∝ C^{1 - A:.3f}" in text
    assert "14 of 15 points finished" in text
    assert "Best point: **s-d16-f1e+20**" in text  # the optimum of the largest budget
    for name in ("bpb_vs_flops.png", "isoflop.png", "optimal.png"):
        assert Path(sweep_dir, "report", name).read_bytes().startswith(b"\x89PNG"), name
    rows = list(csv.DictReader(Path(sweep_dir, "report", "points.csv").read_text().splitlines()))
    assert [r["point"] for r in rows] == [i.name for i in infos]
    unfinished = next(r for r in rows if r["point"] == "s-d24-f1e+20")
    assert unfinished["val_bpb"] == "" and unfinished["flops"] == ""
    first = rows[0]
    assert float(first["gpu_hours"]) == 8 * (3600 + 360) / 3600  # time × the point's GPUs
    assert "| s-d8-f1e+18 | 8 |" in text


def test_a_ladder_report_plots_bpb_against_params(tmp_path):
    sweep_dir = str(tmp_path)
    infos = [sweep_files.PointInfo(f"m-d{d}", f"d{d}", d, tokens_per_param=8, gpus=8) for d in (10, 14, 18)]
    for info, params, bpb in zip(infos, (1e8, 2e8, 4e8), (0.95, 0.9, 0.86), strict=True):
        write_point(sweep_dir, info, params, bpb, core=0.1)
    sweep_files.write_manifest(sweep_dir, infos)
    assert sweep_report.main(["--run-dir", sweep_dir]) == 0
    text = Path(sweep_dir, "report", "report.md").read_text()
    assert "ladder: every depth at 8 tokens per parameter" in text and "Best point: **m-d18**" in text
    assert "N_opt" not in text
    assert Path(sweep_dir, "report", "bpb_vs_params.png").exists()
