"""A sweep's directory and its list of points: what the executors (the operator, `nanorun run`)
write before any point trains and what the sweep report reads.

    <sweep-dir>/                 the template's storage.uri
      sweep.json                 the points: name, folder, depth, horizon, GPUs (written first)
      tokenizer/                 the run that trains the sweep's one tokenizer (tokenizer/)
      <point>/                   one run directory per point, e.g. d12-f1e18/ (pretrain/, baseEval/)
      report/                    report.md, points.csv and the charts (python -m nanorun.trainer.sweep_report)

Torch-free: the operator image imports it.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from nanorun.pipeline import storage

MANIFEST_FILE = "sweep.json"
TOKENIZER_DIR = "tokenizer"
REPORT_DIR = "report"


@dataclass(frozen=True)
class PointInfo:
    """One point of a sweep as the report needs it."""

    name: str  # the child run's name, e.g. "scaling-d12-f1e18"
    folder: str  # its run directory under the sweep's, e.g. "d12-f1e18"
    depth: int
    flop_budget: float | None = None  # isoFLOP points: the FLOPs its pretraining spends
    tokens_per_param: float | None = None  # ladder points: training tokens per scaling parameter
    gpus: int = 0  # GPUs its training stages use (nodes × gpusPerNode), for GPU-hours


def point_dir(sweep_dir: str, point: PointInfo) -> str:
    return storage.join(sweep_dir, point.folder)


def tokenizer_run_dir(sweep_dir: str) -> str:
    return storage.join(sweep_dir, TOKENIZER_DIR)


def report_dir(sweep_dir: str) -> str:
    return storage.join(sweep_dir, REPORT_DIR)


def manifest(points: list[PointInfo]) -> dict:
    return {"points": [asdict(p) for p in points]}


def write_manifest(sweep_dir: str, points: list[PointInfo]) -> None:
    storage.write_json(storage.join(sweep_dir, MANIFEST_FILE), manifest(points))


def read_manifest(sweep_dir: str) -> list[PointInfo] | None:
    data = storage.read_json_or_none(storage.join(sweep_dir, MANIFEST_FILE))
    if data is None:
        return None
    return [PointInfo(**p) for p in data["points"]]
