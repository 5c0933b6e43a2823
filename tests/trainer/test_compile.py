"""torch.compile on CPU: the compiled model trains exactly like the eager one, its forward compiles
as one graph, the stages compile where it pays, and compile time is reported apart from step time."""

from __future__ import annotations

import copy
import shutil
from pathlib import Path

import pytest
import torch
from nanorun.pipeline import layout
from nanorun.pipeline.progress import read_done, read_progress
from nanorun.trainer.model.gpt import GPTConfig, build_model
from nanorun.trainer.training import compilation
from nanorun.trainer.training.compilation import CPU_MIN_FLOPS, CompileClock, compiled_model, should_compile

from tests.fixtures.post_training import MID_FLAGS, SFT_FLAGS, copy_run, run_post_stage, stage_done
from tests.fixtures.tiny_run import check, run_stage

pytestmark = pytest.mark.usefixtures("one_torch_thread")

CPU, CUDA = torch.device("cpu"), torch.device("cuda")


def tiny_model() -> torch.nn.Module:
    torch.manual_seed(0)
    config = GPTConfig.from_depth(2, vocab_size=256, sequence_len=32, aspect_ratio=32, head_dim=32)
    return build_model(config, "cpu")


def batches(n: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Rows counting up by a row's own stride from a random start: a pattern the model can learn."""
    g = torch.Generator().manual_seed(1)
    rows = []
    for _ in range(n):
        start, stride = torch.randint(0, 256, (4, 1), generator=g), torch.randint(1, 4, (4, 1), generator=g)
        rows.append((start + stride * torch.arange(33)) % 256)
    return [(t[:, :-1], t[:, 1:]) for t in rows]


def train_losses(model: torch.nn.Module, forward: torch.nn.Module, data) -> list[float]:
    optimizer = model.setup_optimizer(
        matrix_lr=0.01, embedding_lr=0.1, unembedding_lr=0.004, scalar_lr=0.1, weight_decay=0.0
    )
    losses = []
    for x, y in data:
        loss = forward(x, y)
        loss.backward()
        optimizer.step()
        model.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses


@pytest.mark.slow
def test_compiled_training_steps_give_the_eager_losses():
    eager = tiny_model()
    compiled = copy.deepcopy(eager)
    data = batches(4)
    expected = train_losses(eager, eager, data)
    got = train_losses(compiled, torch.compile(compiled, dynamic=False), data)
    # Same weights, same batches: the fused kernels change only rounding (fp32 on CPU).
    assert got == pytest.approx(expected, rel=1e-4, abs=1e-5)
    assert expected[-1] < expected[0]  # the steps trained something: a real comparison


def test_the_forward_compiles_as_one_graph_for_training_and_for_evaluation():
    model = tiny_model()
    x, y = batches(1)[0]
    train = torch._dynamo.explain(model)(x, y)
    assert train.graph_break_count == 0, train.break_reasons
    assert train.graph_count == 1
    model.eval()
    with torch.no_grad():
        evaluation = torch._dynamo.explain(model)(x, y, loss_reduction="none")
    assert evaluation.graph_break_count == 0, evaluation.break_reasons


def test_the_flag_decides_else_gpus_and_long_cpu_runs_compile():
    assert should_compile(None, CUDA, train_flops=0)
    assert not should_compile(None, CPU, train_flops=CPU_MIN_FLOPS / 10)  # a short CPU run: eager
    assert should_compile(None, CPU, train_flops=CPU_MIN_FLOPS)
    assert should_compile(True, CPU, train_flops=0)  # --compile
    assert not should_compile(False, CUDA, train_flops=1e20)  # --no-compile
    # shapes that change every batch would recompile: only when asked for
    assert not should_compile(None, CUDA, train_flops=1e20, static_shapes=False)
    assert should_compile(True, CUDA, train_flops=0, static_shapes=False)


def test_without_a_cxx_compiler_only_the_flag_compiles(monkeypatch):
    monkeypatch.setattr(compilation, "compiler_available", lambda: False)
    assert not should_compile(None, CUDA, train_flops=1e20)  # eager, rather than failing at step 1
    assert should_compile(True, CUDA, train_flops=0)


def test_compiled_model_shares_the_parameters_of_the_model():
    model = tiny_model()
    assert compiled_model(model, False, CPU, 0) is model
    forward = compiled_model(model, True, CPU, 0)
    assert forward is not model
    assert list(forward.parameters())[0] is list(model.parameters())[0]


def test_the_first_step_and_first_evaluation_batch_of_a_compiled_model_are_compile_time():
    clock = CompileClock(compiled=True)
    assert clock.step_seconds(30.0) is None  # the step that compiled
    assert clock.step_seconds(0.5) == 0.5
    clock.eval_batch_seconds(4.0)
    clock.eval_batch_seconds(0.1)  # later evaluations reuse the graph
    assert clock.seconds == 34.0
    eager = CompileClock(compiled=False)
    assert eager.step_seconds(2.0) == 2.0 and eager.seconds == 0.0


@pytest.mark.slow
def test_pretrain_reports_compile_time_apart_from_step_time(tiny_base_run, tmp_path):
    run_dir = tmp_path / "run"
    tokenizer = layout.stage_dir(str(run_dir), "tokenizer")
    shutil.copytree(layout.stage_dir(tiny_base_run, "tokenizer"), tokenizer)  # its tokenizer only
    flags = ["--data", str(Path(tiny_base_run).parent / "data")]
    flags += ["--depth", "2", "--max-seq-len", "64", "--head-dim", "64", "--window-pattern", "L"]
    flags += ["--device-batch-size", "4", "--total-batch-size", "256", "--num-iterations", "4"]
    flags += ["--eval-every", "2", "--eval-tokens", "256", "--sample-every", "-1", "--data-streams", "1"]
    flags += ["--doc-buffer", "8", "--device", "cpu", "--compile"]
    proc = check(run_stage("base_train", "--run-dir", str(run_dir), *flags, timeout=600))
    assert "torch.compile on" in proc.stdout
    step_lines = [
        line for line in proc.stdout.splitlines() if line.startswith("step 0000") and "/4 |" in line
    ]
    assert "compile + first step" in step_lines[0] and "tok/s" not in step_lines[0]
    assert all("tok/s" in line for line in step_lines[1:]) and len(step_lines) == 4
    done, progress = read_done(str(run_dir), "pretrain"), read_progress(str(run_dir), "pretrain")
    assert done.metrics["compile_seconds"] > 0
    assert progress.compile_seconds == pytest.approx(done.metrics["compile_seconds"])
    assert progress.tokens_per_sec > 0


@pytest.mark.slow
def test_midtrain_and_sft_train_compiled_when_asked_and_report_the_compile(tiny_mid_run, tmp_path):
    # midtrain again from the same base checkpoint, compiled (packed rows: static shapes)
    mid = copy_run(tiny_mid_run, tmp_path / "mid")
    shutil.rmtree(layout.stage_dir(mid, "midtrain"))
    proc = check(run_post_stage("midtrain", mid, [*MID_FLAGS, "--compile"], timeout=600))
    assert "torch.compile on" in proc.stdout and "compile + first step" in proc.stdout
    assert stage_done(mid, "midtrain")["metrics"]["compile_seconds"] > 0
    # sft compiled on request, with dynamic shapes for its padded rows
    sft = copy_run(tiny_mid_run, tmp_path / "sft")
    proc = check(run_post_stage("sft", sft, [*SFT_FLAGS, "--compile"], timeout=600))
    assert "compile + first step" in proc.stdout
    done = stage_done(sft, "sft")
    assert done["metrics"]["compile_seconds"] > 0 and done["metrics"]["val_bpb"] > 0
