"""torch.compile for the training stages: when a stage compiles its model, and the time it takes.

    add_compile_arg(parser)                                   # --compile / --no-compile (default: auto)
    forward = compiled_model(model, args.compile, ctx.device, train_flops)  # `model` when not compiled
    clock = CompileClock(compiled=forward is not model)
    seconds = clock.step_seconds(dt)   # None for a step that compiled: its time is compile time
    evaluate_bpb(forward, batches, steps, token_bytes, clock=clock)  # times its first batch

`forward` shares its parameters with `model` (torch.compile wraps the module, it does not copy it):
the optimizer, checkpoints and gradient clipping keep using `model`, the forward passes use
`forward`. Compilation is lazy: the first call with a new input signature (the first training
step; the first evaluation, which runs without gradients and with a per-token loss) traces and
compiles, later calls reuse the graph. See https://pytorch.org/docs/stable/generated/torch.compile.html.

When (`--compile` forces it, `--no-compile` turns it off, no flag: auto):
- on a GPU, always (nanochat compiles its model on CUDA, scripts/base_train.py);
- on a CPU, when the stage's training work (model FLOPs per token x tokens per step x steps) is at
  least `CPU_MIN_FLOPS`: compiling the forward and backward costs tens of seconds on a CPU, which a
  small or short run never earns back (the tests' tiny runs take seconds), while a run of several
  minutes gains more than that: steps 1.6x faster at depth 4 (docs/benchmarks.md, "Training
  throughput");
- never without a C++ compiler on the PATH (inductor builds its CPU kernels, and Triton its GPU
  launchers, with one at run time), so an image without one trains eagerly instead of failing;
- never for inputs whose shapes change from batch to batch (`static_shapes=False`: the sft and
  rl stages' padded rows), unless forced, since every new shape would compile again.

Compile time is reported apart from step time: `CompileClock` counts the first training step after
a (re)start of a compiled model, and the first batch of its first evaluation, as compile time (each
includes that one step's or batch's own work), so tokens/s and the step-time averages only ever
see steady steps.
"""

from __future__ import annotations

import argparse
import functools
import shutil
from dataclasses import dataclass

import torch

# auto: a CPU run compiles when it trains at least this many FLOPs, a few minutes of eager steps on
# two cores (about 40 GFLOP/s of model work): enough for the 1.6x faster steps to repay the compile.
CPU_MIN_FLOPS = 1e13


def add_compile_arg(parser: argparse.ArgumentParser | argparse._ArgumentGroup) -> None:
    parser.add_argument(
        "--compile",
        action=argparse.BooleanOptionalAction,
        default=None,
        help=f"torch.compile the model (default: on GPUs; on CPUs for runs of {CPU_MIN_FLOPS:.0e}+ FLOPs)",
    )


@functools.cache
def compiler_available() -> bool:
    """Whether a C++ compiler is on the PATH, which torch.compile's default backend needs."""
    return any(shutil.which(cxx) for cxx in ("g++", "c++", "clang++"))


def should_compile(
    flag: bool | None, device: torch.device, train_flops: float, static_shapes: bool = True
) -> bool:
    """The policy above: `flag` when given, else a GPU, or a CPU with enough work; static shapes
    and a compiler only."""
    if flag is not None:
        return flag
    worth_it = device.type == "cuda" or train_flops >= CPU_MIN_FLOPS
    return static_shapes and worth_it and compiler_available()


def compiled_model(
    model: torch.nn.Module,
    flag: bool | None,
    device: torch.device,
    train_flops: float,
    static_shapes: bool = True,
) -> torch.nn.Module:
    """`model` compiled when `should_compile` says so, else `model` itself. Static shapes compile
    one graph per signature (`dynamic=False`, nanochat's choice); varying shapes let torch mark the
    changing dimensions dynamic after the first recompile (`dynamic=None`)."""
    if not should_compile(flag, device, train_flops, static_shapes):
        return model
    return torch.compile(model, dynamic=False if static_shapes else None)


@dataclass
class CompileClock:
    """Splits compile time from step time: the first step of a compiled model is compile time."""

    compiled: bool
    seconds: float = 0.0  # compile time so far (this process)
    _pending: bool = True
    _eval_pending: bool = True

    @property
    def compiling(self) -> bool:
        """Whether the next training step compiles the model."""
        return self.compiled and self._pending

    def step_seconds(self, dt: float) -> float | None:
        """The step's time as step time, or None when it compiled (its `dt` is added to `seconds`)."""
        if self.compiled and self._pending:
            self._pending = False
            self.seconds += dt
            return None
        return dt

    def eval_batch_seconds(self, dt: float) -> None:
        """An evaluation's first batch took `dt`: the first evaluation's counts as compile time."""
        if self.compiled and self._eval_pending:
            self._eval_pending = False
            self.seconds += dt
