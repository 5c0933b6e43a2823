"""The example sweeps are valid, and the numbers in their comments are what the code computes:
the tiny example's FLOPs per token and steps (from the model base_train builds), and the cluster
example's GPU-hours = FLOPs / (H100 dense bf16 peak × the MFU the comment states)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
import yaml
from nanorun.cli.sweep import load_sweep_file
from nanorun.operator.sweep.api import point_spec, sweep_points
from nanorun.trainer.model.gpt import GPT, GPTConfig

REPO = Path(__file__).resolve().parents[2]
TINY, CLUSTER = REPO / "examples" / "sweep-tiny.yaml", REPO / "examples" / "sweep-d10-d20.yaml"
H100_BF16_PEAK = 989e12  # FLOP/s, dense bf16 (NVIDIA H100 SXM datasheet)


def load(path: Path):
    return load_sweep_file(str(path), yaml.safe_load(path.read_text()))


def flops_per_token(spec) -> float:
    m = spec.model
    shape = {"aspect_ratio": m.aspect_ratio, "head_dim": m.head_dim, "window_pattern": m.window_pattern}
    config = GPTConfig.from_depth(
        m.depth, spec.tokenizer.vocab_size, m.max_seq_len, **{k: v for k, v in shape.items() if v is not None}
    )
    with torch.device("meta"):
        return GPT(config).estimate_flops()


@pytest.mark.parametrize("path", [TINY, CLUSTER], ids=lambda p: p.name)
def test_the_example_sweeps_are_valid_and_every_point_has_a_horizon(path):
    sweep = load(path)
    points = sweep_points(sweep.name, sweep.spec)
    assert len(points) == len(sweep.spec.depths) * len(sweep.spec.flop_budgets)
    for p in points:
        assert point_spec(sweep.spec, p).stages.pretrain.target_flops == p.flop_budget


def test_the_tiny_examples_flops_per_token_and_steps_are_the_models():
    text, sweep = TINY.read_text(), load(TINY)
    stated = re.search(
        r"are ([\d.e]+) \(d2\), ([\d.e]+) \(d3\) and ([\d.e]+) \(d4\), so ([\d.e]+) FLOPs", text
    )
    steps = re.search(r"FLOPs are (\d+), (\d+) and (\d+) steps of (\d+) tokens", text)
    budget, batch = float(stated.group(4)), int(steps.group(4))
    assert batch == sweep.spec.template.stages.pretrain.total_batch_size
    by_depth = {p.depth: point_spec(sweep.spec, p) for p in sweep_points(sweep.name, sweep.spec)}
    for i, depth in enumerate((2, 3, 4)):
        fpt = flops_per_token(by_depth[depth])
        assert float(stated.group(1 + i)) == pytest.approx(fpt, rel=0.05), depth
        assert int(steps.group(1 + i)) == round(budget / (fpt * batch)), depth  # base_train's plan_run


def test_the_cluster_examples_gpu_hours_are_its_flops_at_the_stated_mfu():
    text, sweep = CLUSTER.read_text(), load(CLUSTER)
    mfu, peak = re.search(r"at (\d+)% MFU of an H100's (\d+) TFLOP/s", text).groups()
    assert float(peak) * 1e12 == H100_BF16_PEAK
    per_gpu_second = float(mfu) / 100 * H100_BF16_PEAK
    depths = len(sweep.spec.depths)
    rows = re.findall(r"#   ([\d.e+]+) FLOPs x (\d+) depths: ([\d.]+) GPU-hours", text)
    assert [float(b) for b, _, _ in rows] == sweep.spec.flop_budgets
    for budget, n, hours in rows:
        assert int(n) == depths
        assert float(hours) == round(float(budget) * depths / per_gpu_second / 3600, 1), budget
    total, node_hours = re.search(
        r"total: ([\d.]+) GPU-hours, ([\d.]+) hours of one 8-GPU node", text
    ).groups()
    expected = sum(sweep.spec.flop_budgets) * depths / per_gpu_second / 3600
    assert float(total) == round(expected, 1)
    assert float(node_hours) == round(expected / sweep.spec.template.compute.gpus_per_node, 1)
    assert sweep.spec.template.compute.gpus_per_node == 8
