"""The `rl` stage: on-policy reinforcement learning on math word problems (GRPO-style).

    python -m nanorun.trainer.chat_rl --run-dir URI [--task GSM8K|Arithmetic] [--num-iterations N] ...
    torchrun --nproc_per_node=8 -m nanorun.trainer.chat_rl --run-dir s3://bucket/runs/d20

Starts from sft's final checkpoint (or resumes from its own). Each step, every rank takes its
share of `--examples-per-step` problems and samples a group of `--num-samples` replies per problem
with the engine (calculator included). The reward is 1 for a right final answer, else 0; a reply's
advantage is its reward minus its group's mean (no std division, no KL, no clipping: nanochat's
simplified GRPO, i.e. REINFORCE with a group baseline). The loss is the advantage-weighted negative
log-likelihood of the sampled tokens (forced tool outputs and the prompt excluded), normalised per
token within each group. Every `--eval-every` steps and at the end, pass@1 and pass@k on held-out
problems. GSM8K needs a download; offline it falls back to the synthetic arithmetic problems.
LR: pretraining's times `--init-lr-frac` (0.05), linear to zero. Writes `<run-dir>/rl/`.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

import torch
from nanorun.pipeline import layout
from nanorun.pipeline.errors import run_main
from nanorun.pipeline.stages import source_keys
from nanorun.trainer.chat.conversation import render_for_completion
from nanorun.trainer.tasks.common import Task
from nanorun.trainer.tasks.mixtures import rl_tasks
from nanorun.trainer.training.common import add_common_args, exit_preempted, setup_stage, teardown
from nanorun.trainer.training.compilation import CompileClock, compiled_model
from nanorun.trainer.training.distributed import grad_norm, rank_and_world, sum_across_ranks
from nanorun.trainer.training.finetune import (
    add_finetune_args,
    check_examples_per_step,
    epoch_steps,
    finish,
    save_checkpoint,
    set_learning_rate,
    start_training,
)
from nanorun.trainer.training.loop import Evaluation, StepReport, run_loop


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m nanorun.trainer.chat_rl", description=__doc__.split("\n")[0])
    add_common_args(p)
    add_finetune_args(p, source=source_keys("rl"), init_lr_frac=0.05)
    p.add_argument("--task", default="GSM8K", choices=["GSM8K", "Arithmetic"], help="problems to learn from")
    p.add_argument(
        "--examples-per-step", type=int, default=16, help="problems per optimizer step (all ranks)"
    )
    p.add_argument("--num-samples", type=int, default=16, help="replies sampled per problem (the group)")
    p.add_argument("--max-new-tokens", type=int, default=256, help="longest reply in tokens")
    p.add_argument("--temperature", type=float, default=1.0, help="sampling temperature")
    p.add_argument("--top-k", type=int, default=50, help="sample from the k most likely tokens")
    p.add_argument("--eval-examples", type=int, default=400, help="held-out problems per pass@k evaluation")
    return p


def rollout(
    engine,
    tokenizer,
    task: Task,
    index: int,
    num_samples: int,
    max_new_tokens: int,
    temperature: float,
    top_k: int,
    seed: int,
) -> tuple[list[list[int]], list[list[int]], list[float], int]:
    """(completions, masks, rewards, prompt length) of one group of samples for problem `index`."""
    conversation = task[index]
    prompt = render_for_completion(tokenizer, conversation)
    completions, masks = engine.generate_batch(
        prompt,
        num_samples=num_samples,
        max_tokens=max_new_tokens,
        temperature=temperature,
        top_k=top_k,
        seed=seed,
    )
    rewards = [task.reward(conversation, tokenizer.decode(c[len(prompt) :])) for c in completions]
    return completions, masks, rewards, len(prompt)


def group_loss(
    model,
    completions: list[list[int]],
    masks: list[list[int]],
    rewards: list[float],
    pad: int,
    device,
    batch_size: int,
    scale: float,
) -> float:
    """Backpropagate the policy-gradient loss of one group; returns the loss value.

    advantage = reward - group mean; loss = -sum(advantage * log p(sampled token)) / sampled tokens.
    """
    advantages = torch.tensor(rewards, dtype=torch.float32) - sum(rewards) / len(rewards)
    width = max(len(c) for c in completions) - 1
    x = torch.full((len(completions), width), pad, dtype=torch.long)
    y = torch.full((len(completions), width), -1, dtype=torch.long)
    for row, (ids, mask) in enumerate(zip(completions, masks, strict=True)):
        targets = torch.tensor(ids[1:])
        targets[torch.tensor(mask[1:]) == 0] = -1  # prompt and forced tool outputs: not the policy's choice
        x[row, : len(ids) - 1] = torch.tensor(ids[:-1])
        y[row, : len(ids) - 1] = targets
    sampled = int((y >= 0).sum())
    if sampled == 0 or not advantages.any():
        return 0.0  # every sample got the same reward: nothing to learn from this group
    total = 0.0
    for i in range(0, len(completions), batch_size):
        xb, yb, ab = (
            x[i : i + batch_size].to(device),
            y[i : i + batch_size].to(device),
            advantages[i : i + batch_size].to(device),
        )
        logp = -model(xb, yb, loss_reduction="none")  # (B, T), 0 where the target is -1
        loss = -(logp * ab[:, None]).sum() / sampled * scale
        loss.backward()
        total += loss.item()
    return total


def pass_at_k(
    engine, tokenizer, task: Task, k: int, n: int, max_new_tokens: int, temperature: float, top_k: int, device
) -> dict[str, float]:
    """pass@1 and pass@k over the first `n` problems (k samples each), sharded over ranks."""
    rank, world = rank_and_world()
    hits1 = hitsk = total = 0
    from nanorun.trainer.chat.engine import ContextOverflowError

    for i in range(rank, min(n, len(task)), world):
        try:
            _, _, rewards, _ = rollout(
                engine, tokenizer, task, i, k, max_new_tokens, temperature, top_k, seed=10_000 + i
            )
        except ContextOverflowError:  # longer than the model's context: not counted, as in training
            continue
        hits1 += int(rewards[0] > 0)
        hitsk += int(any(r > 0 for r in rewards))
        total += 1
    hits1, hitsk, total = sum_across_ranks([hits1, hitsk, total], device)
    return {"pass@1": hits1 / max(total, 1), f"pass@{k}": hitsk / max(total, 1)}


def rl_step(
    model,
    optimizer,
    engine,
    tokenizer,
    task: Task,
    indices: list[int],
    args: Any,
    step: int,
    base_lrs: list[float],
    lrm: float,
    device,
    forward=None,
) -> dict[str, float]:
    """One on-policy step over this rank's problems `indices`; returns the rank's mean reward and loss.
    `forward`: the module scoring the samples (the compiled model, when the stage compiles), else `model`."""
    from nanorun.trainer.chat.engine import ContextOverflowError

    pad = tokenizer.encode_special("<|assistant_end|>")
    rewards_all, loss_sum, sampled_tokens = [], 0.0, 0
    for index in indices:
        model.eval()
        try:
            group = rollout(
                engine,
                tokenizer,
                task,
                index,
                args.num_samples,
                args.max_new_tokens,
                args.temperature,
                args.top_k,
                seed=step * 1_000_003 + index,
            )
        except ContextOverflowError:  # a problem longer than the model's context teaches nothing
            continue
        completions, masks, rewards, prompt_len = group
        model.train()
        loss_sum += group_loss(
            forward or model,
            completions,
            masks,
            rewards,
            pad,
            device,
            args.device_batch_size,
            1 / len(indices),
        )
        rewards_all += rewards
        sampled_tokens += sum(sum(m[prompt_len:]) for m in masks)
    norm = grad_norm(model)
    set_learning_rate(optimizer, base_lrs, lrm)
    optimizer.step()
    model.zero_grad(set_to_none=True)
    reward = sum(rewards_all) / max(len(rewards_all), 1)
    return {"reward": reward, "loss": loss_sum, "sampled_tokens": sampled_tokens, "grad_norm": norm}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    ctx = setup_stage("rl", args)
    if ctx.already_done:
        return teardown(ctx)
    from nanorun.trainer.chat.engine import Engine
    from nanorun.trainer.data.tokenizer import Tokenizer

    check_examples_per_step(args.examples_per_step, ctx.world_size)
    model, optimizer, start = start_training(ctx, args.source, args.init_lr_frac, args.weight_decay)
    tokenizer = Tokenizer.from_run_dir(ctx.run_dir)
    engine = Engine(model, tokenizer)
    train, test, report = rl_tasks(layout.task_data_dir(ctx.run_dir), args.task)
    ctx.print0(str(report))
    steps = epoch_steps(start, args, len(train))
    loop = {"num_iterations": steps}
    # Sampling runs the eager model (the engine's KV cache); the scoring forward sees rows padded to
    # each group's longest sample, so it compiles only with --compile (then with dynamic shapes).
    forward = compiled_model(model, args.compile, ctx.device, 0, static_shapes=False)
    clock = CompileClock(compiled=forward is not model)
    ctx.print0(
        f"rl: {start.describe()}, {steps} steps x {args.examples_per_step} problems x "
        f"{args.num_samples} samples"
    )

    def evaluate(step: int) -> dict[str, float]:
        return pass_at_k(
            engine,
            tokenizer,
            test,
            args.num_samples,
            args.eval_examples,
            args.max_new_tokens,
            args.temperature,
            args.top_k,
            ctx.device,
        )

    def train_step(step: int) -> StepReport:
        first = step * args.examples_per_step
        indices = [(first + i) % len(train) for i in range(ctx.rank, args.examples_per_step, ctx.world_size)]
        lrm = 1.0 - step / steps
        out = rl_step(
            model,
            optimizer,
            engine,
            tokenizer,
            train,
            indices,
            args,
            step,
            start.base_lrs,
            lrm,
            ctx.device,
            forward=forward,
        )
        reward, loss, tokens = sum_across_ranks(
            [out["reward"], out["loss"], out["sampled_tokens"]], ctx.device
        )
        reward, loss = reward / ctx.world_size, loss / ctx.world_size
        return StepReport(
            log=f"reward {reward:.4f} | loss {loss:.4f} | lrm {lrm:.3f}",
            loss=loss,
            lr=start.base_lrs[-1] * lrm,
            grad_norm=out["grad_norm"],
            tokens=int(tokens),
            record={"reward": reward, "loss": loss, "lrm": lrm},
            progress={"reward": reward},
        )

    def save(step: int, evals: dict[str, float]) -> str:
        meta = {"loop": {**loop, "evals": evals}}
        return save_checkpoint(ctx, step, model, optimizer, start, meta, args.keep_checkpoints)

    # pass@k samples with generators seeded per problem, never the training RNG: skipping it (when
    # preempted) leaves a resumed run on the uninterrupted run's path
    outcome = run_loop(
        ctx,
        model,
        first_step=start.step,
        steps=steps,
        train_step=train_step,
        evaluations=[Evaluation("pass@k", args.eval_every, evaluate)],
        save=save,
        save_every=args.save_every,
        checkpoint=start.resumed_from,
        evals=start.loop.get("evals", {}),
        clock=clock,
    )
    if outcome.preempted:
        return exit_preempted(ctx, outcome.checkpoint)
    metrics = {**outcome.evals, "steps": steps, "task": train.name, "tasks": report.used}
    return finish(ctx, outcome, metrics, str(outcome.evals))


if __name__ == "__main__":
    sys.exit(run_main(main))
