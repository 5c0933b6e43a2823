"""The `eval` stage: evaluate a chat model on ARC-Easy/Challenge, MMLU, GSM8K, HumanEval and
SpellingBee, and summarise them as ChatCORE.

    python -m nanorun.trainer.chat_eval --run-dir URI [--source latest|all|sft|...] [-a "ARC-Easy|GSM8K"]
    torchrun --nproc_per_node=8 -m nanorun.trainer.chat_eval --run-dir s3://bucket/runs/d20 --source all

- `--source latest` evaluates the newest finished of rl, sft, midtrain; `all` evaluates each of them
  that finished (the report's MID/SFT/RL columns); a stage's key evaluates that stage (its old module
  name, e.g. chat_sft, is accepted too).
- Multiple-choice tasks (ARC, MMLU) are scored by the letter with the highest logit; GSM8K,
  HumanEval and SpellingBee sample a reply (greedy by default) and check it (HumanEval runs the code
  in `nanorun.trainer.chat.execution`'s sandbox).
- ChatCORE = mean over the tasks of (accuracy - random baseline) / (1 - baseline); tasks whose data
  cannot be downloaded are skipped, reported, and ChatCORE is then marked partial.
- Each task's result is saved as soon as it is known (`eval/results/<source>/<task>.json`), so an
  interrupted evaluation resumes with the tasks still missing. Sample replies go to
  `eval/samples/<source>.jsonl` for the report.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any

from nanorun.pipeline import layout, storage
from nanorun.pipeline.errors import run_main
from nanorun.pipeline.liveness import EVALUATING
from nanorun.pipeline.progress import is_done
from nanorun.pipeline.stages import CHAT_KEYS, MODEL_KEYS
from nanorun.trainer.chat.execution import SandboxUnavailable
from nanorun.trainer.tasks.common import Task, run_categorical_eval, run_generative_eval
from nanorun.trainer.tasks.hf import TaskDataUnavailable
from nanorun.trainer.tasks.mixtures import CHATCORE_TASKS, EVAL_TASKS, RANDOM_BASELINE
from nanorun.trainer.training import liveness
from nanorun.trainer.training.common import add_common_args, setup_stage, teardown

SAMPLES_PER_TASK = 3


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m nanorun.trainer.chat_eval", description=__doc__.split("\n")[0]
    )
    add_common_args(p)
    p.add_argument("--source", default="latest", help=f"latest | all | a stage ({', '.join(MODEL_KEYS)})")
    p.add_argument(
        "-a", "--tasks", default="|".join(CHATCORE_TASKS), help=f"'|'-separated, from {'|'.join(EVAL_TASKS)}"
    )
    p.add_argument("--max-problems", type=int, default=None, help="at most N problems per task")
    p.add_argument("--num-samples", type=int, default=1, help="samples per generative problem (pass@k)")
    p.add_argument("--max-new-tokens", type=int, default=512, help="longest generated reply")
    p.add_argument("--temperature", type=float, default=0.0, help="sampling temperature (0 = greedy)")
    p.add_argument("--top-k", type=int, default=50, help="sample from the k most likely tokens")
    p.add_argument("--batch-size", type=int, default=8, help="rows per forward pass for multiple choice")
    return p


def chatcore(results: dict[str, float]) -> tuple[float | None, list[str]]:
    """Mean of the baseline-centred accuracies of the ChatCORE tasks present in `results`."""
    present = [t for t in CHATCORE_TASKS if t in results]
    if not present:
        return None, []
    centred = [
        (results[t] - RANDOM_BASELINE.get(t, 0.0)) / (1.0 - RANDOM_BASELINE.get(t, 0.0)) for t in present
    ]
    return sum(centred) / len(centred), present


def sources_to_evaluate(run_dir: str, source: str) -> list[str]:
    """The keys of the finished stages `--source` names (all: in pipeline order)."""
    finished = [s for s in reversed(CHAT_KEYS) if is_done(run_dir, s)]  # newest first
    if source == "latest":
        chosen = finished[:1]
    elif source == "all":
        chosen = finished[::-1]
    else:
        if source not in MODEL_KEYS:
            raise SystemExit(
                f"--source must be latest, all or one of {', '.join(MODEL_KEYS)}, got {source!r}"
            )
        chosen = [source] if is_done(run_dir, source) else []
    if not chosen:
        raise SystemExit(
            f"nothing to evaluate for --source {source}: none of {', '.join(CHAT_KEYS)} has finished in {run_dir}"
        )
    return chosen


def load_tasks(ctx, names: list[str]) -> tuple[dict[str, Task], dict[str, str]]:
    """(tasks that could be loaded, {skipped task: reason})."""
    tasks, skipped = {}, {}
    for name in names:
        try:
            tasks[name] = EVAL_TASKS[name](layout.task_data_dir(ctx.run_dir))
        except (TaskDataUnavailable, SandboxUnavailable) as err:  # no data, or no safe place to run its code
            skipped[name] = err.reason
            ctx.print0(f"skipping {name}: {err}")
    return tasks, skipped


def evaluate_source(
    ctx, args, source: str, tasks: dict[str, Task], skipped: dict[str, str], tokenizer
) -> dict[str, Any]:
    from nanorun.trainer.chat.engine import Engine
    from nanorun.trainer.training.checkpoint import final_checkpoint, load_model

    checkpoint = final_checkpoint(ctx.run_dir, source)
    model, _ = load_model(checkpoint, ctx.device)
    engine = Engine(model, tokenizer)
    results_dir = storage.join(ctx.stage_dir, "results", source)
    results: dict[str, float] = {}
    samples: list[dict[str, Any]] = []
    for name, task in tasks.items():
        saved = storage.read_json_or_none(storage.join(results_dir, f"{name}.json"))
        if saved is not None:  # evaluated before an interruption
            results[name] = saved["accuracy"]
            samples += saved.get("samples", [])
            continue
        t0 = time.time()
        task_samples: list[dict[str, Any]] = []
        if task.eval_type == "categorical":
            out = run_categorical_eval(
                task,
                model,
                tokenizer,
                batch_size=args.batch_size,
                max_problems=args.max_problems,
                device=ctx.device,
            )
        else:
            out = run_generative_eval(
                task,
                engine,
                tokenizer,
                num_samples=args.num_samples,
                max_new_tokens=args.max_new_tokens,
                temperature=args.temperature,
                top_k=args.top_k,
                max_problems=args.max_problems,
                device=ctx.device,
                samples_out=task_samples,
            )
        results[name] = out["accuracy"]
        samples += task_samples[:SAMPLES_PER_TASK]
        ctx.print0(
            f"{source}: {name} {out['accuracy']:.4f} ({int(out['correct'])}/{int(out['total'])}) in {time.time() - t0:.1f} s"
        )
        if ctx.is_master:
            storage.write_json(
                storage.join(results_dir, f"{name}.json"), {**out, "samples": task_samples[:SAMPLES_PER_TASK]}
            )
        ctx.progress(flush=True, message=f"{source}: {name} {out['accuracy']:.4f}")
    score, included = chatcore(results)
    summary = {
        "source": source,
        "checkpoint": checkpoint,
        "results": results,
        "ChatCORE": score,
        "chatcore_tasks": included,
        "chatcore_partial": set(included) != set(CHATCORE_TASKS),
        "skipped": skipped,
    }
    if ctx.is_master:
        storage.write_json(storage.join(ctx.stage_dir, f"{source}.json"), summary)
        lines = "".join(json.dumps(s) + "\n" for s in samples)
        storage.write_text(storage.join(ctx.stage_dir, "samples", f"{source}.jsonl"), lines)
    return summary


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    ctx = setup_stage("eval", args)
    if ctx.already_done:
        return teardown(ctx)
    liveness.set_phase(EVALUATING)  # the whole stage: each batch is progress
    from nanorun.trainer.data.tokenizer import Tokenizer

    names = [t.strip() for t in args.tasks.split("|") if t.strip()]
    unknown = [t for t in names if t not in EVAL_TASKS]
    if unknown:
        raise SystemExit(f"unknown task(s) {unknown}; choose from {'|'.join(EVAL_TASKS)}")
    tokenizer = Tokenizer.from_run_dir(ctx.run_dir)
    sources = sources_to_evaluate(ctx.run_dir, args.source)
    tasks, skipped = load_tasks(ctx, names)
    summaries = {}
    for i, source in enumerate(sources):
        ctx.progress(flush=True, step=i, total_steps=len(sources), message=f"evaluating {source}")
        summaries[source] = evaluate_source(ctx, args, source, tasks, skipped, tokenizer)
        s = summaries[source]
        chat = (
            "n/a"
            if s["ChatCORE"] is None
            else f"{s['ChatCORE']:.4f}" + (" (partial)" if s["chatcore_partial"] else "")
        )
        ctx.print0(f"{source}: ChatCORE {chat}")
    ctx.progress(flush=True, step=len(sources), total_steps=len(sources))
    latest = summaries[sources[-1] if args.source == "all" else sources[0]]
    metrics = {
        **latest["results"],
        "ChatCORE": latest["ChatCORE"],
        "source": latest["source"],
        "by_source": summaries,
    }
    ctx.done(metrics, {"results": {s: storage.join(ctx.stage_dir, f"{s}.json") for s in summaries}})
    return teardown(ctx)


if __name__ == "__main__":
    sys.exit(run_main(main))
