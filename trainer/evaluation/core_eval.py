"""The CORE metric (DCLM paper, arXiv:2406.11794) on the DCLM eval bundle, in its own format.

Bundle layout (as published; nanochat downloads the same zip):

    eval_bundle/core.yaml             icl_tasks: [{label, dataset_uri, num_fewshot: [k], icl_task_type,
                                                   continuation_delimiter}]
    eval_bundle/eval_meta_data.csv    'Eval Task', 'Random baseline' (percent), ...
    eval_bundle/eval_data/<dataset_uri>   one JSON object per line

Task types and scoring:
  - multiple_choice  {query, choices[], gold}: the prompt is the query, each choice a continuation;
                     the choice with the lowest mean loss wins.
  - schema           {context_options[], continuation, gold}: the contexts vary, the continuation is
                     shared; the context under which the continuation has the lowest mean loss wins.
  - language_modeling {context, continuation}: right when greedy decoding reproduces the continuation.
Few-shot examples are drawn per item with a fixed seed, excluding the item. Each task's accuracy is
centred on its random baseline, (acc - b) / (1 - b), and CORE is the mean over tasks.

    result = evaluate_core(model, tokenizer, bundle_dir, device, max_per_task=500)
"""

from __future__ import annotations

import csv
import json
import os
import random
import shutil
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
import yaml
from nanorun.pipeline.errors import StageError
from nanorun.trainer.training import liveness
from nanorun.trainer.training.distributed import rank_and_world, sum_tensors_across_ranks

EVAL_BUNDLE_URL = "https://karpathy-public.s3.us-west-2.amazonaws.com/eval_bundle.zip"
TASK_TYPES = ("multiple_choice", "schema", "language_modeling")


class EvalBundleError(StageError):
    """The eval bundle is missing, unreachable or malformed; the message says what to do."""


@dataclass
class CoreTask:
    label: str
    task_type: str
    num_fewshot: int
    delimiter: str
    random_baseline: float  # a fraction, 0..1
    items: list[dict[str, Any]]


def fetch_bundle(source: str, cache_dir: str | Path) -> Path:
    """A local eval-bundle directory: `source` itself when it is one, else the zip at `source`
    (https:// URL, s3:// URI or local .zip) extracted into `cache_dir` once."""
    src = Path(source)
    if src.is_dir():
        return src / "eval_bundle" if (src / "eval_bundle" / "core.yaml").exists() else src
    target = Path(cache_dir) / "eval_bundle"
    if (target / "core.yaml").exists():
        return target
    with tempfile.TemporaryDirectory(prefix="nanorun-bundle-") as tmp:
        zip_path = Path(tmp) / "eval_bundle.zip"
        try:
            if source.startswith(("http://", "https://")):
                import httpx

                with httpx.stream("GET", source, follow_redirects=True, timeout=60) as resp:
                    resp.raise_for_status()
                    with open(zip_path, "wb") as f:
                        for chunk in resp.iter_bytes(1 << 20):
                            f.write(chunk)
            else:
                from nanorun.pipeline import storage

                storage.download_to(source, zip_path)
        except Exception as err:
            raise EvalBundleError(
                f"could not fetch the eval bundle from {source} ({err}); on a machine without internet, "
                "copy eval_bundle.zip (or its extracted folder) somewhere and pass --eval-bundle PATH"
            ) from err
        try:
            with zipfile.ZipFile(zip_path) as z:
                z.extractall(tmp)
        except zipfile.BadZipFile as err:
            raise EvalBundleError(f"{source} is not a zip file: {err}") from err
        extracted = Path(tmp) / "eval_bundle"
        if not (extracted / "core.yaml").exists():
            raise EvalBundleError(f"{source} has no eval_bundle/core.yaml inside")
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(target, ignore_errors=True)
        shutil.move(str(extracted), target)
    return target


def default_cache_dir() -> Path:
    return Path(os.environ.get("NANORUN_CACHE", Path.home() / ".cache" / "nanorun"))


def bundle_or_none(source: str, log: Any = print) -> Path | None:
    """The bundle for `source` ('auto' = download the published one); None, with a note, when 'auto'
    cannot be fetched (no internet). An explicitly given bundle that fails is an error."""
    if source != "auto":
        return fetch_bundle(source, default_cache_dir())
    try:
        return fetch_bundle(EVAL_BUNDLE_URL, default_cache_dir())
    except EvalBundleError as err:
        log(f"CORE skipped: {err}")
        return None


def load_tasks(bundle_dir: str | Path, max_per_task: int = -1) -> list[CoreTask]:
    bundle = Path(bundle_dir)
    for name in ("core.yaml", "eval_meta_data.csv", "eval_data"):
        if not (bundle / name).exists():
            raise EvalBundleError(f"{bundle} is not an eval bundle: {name} is missing")
    config = yaml.safe_load((bundle / "core.yaml").read_text(encoding="utf-8"))
    with open(bundle / "eval_meta_data.csv", encoding="utf-8", newline="") as f:
        baselines = {row["Eval Task"]: float(row["Random baseline"]) for row in csv.DictReader(f)}
    tasks = []
    for spec in config.get("icl_tasks") or []:
        label, task_type = spec["label"], spec["icl_task_type"]
        if task_type not in TASK_TYPES:
            raise EvalBundleError(f"task {label}: unknown icl_task_type {task_type!r} (known: {TASK_TYPES})")
        if label not in baselines:
            raise EvalBundleError(f"task {label} has no row in eval_meta_data.csv")
        path = bundle / "eval_data" / spec["dataset_uri"]
        if not path.exists():
            raise EvalBundleError(f"task {label}: data file {path} is missing")
        items = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        # the files are often sorted; shuffle once (fixed seed) so a --max-per-task subset is representative
        random.Random(1337).shuffle(items)
        if max_per_task > 0:
            items = items[:max_per_task]
        fewshot = spec.get("num_fewshot", [0])
        tasks.append(
            CoreTask(
                label=label,
                task_type=task_type,
                num_fewshot=int(fewshot[0] if isinstance(fewshot, list) else fewshot),
                delimiter=spec.get("continuation_delimiter", " "),
                random_baseline=baselines[label] / 100.0,
                items=items,
            )
        )
    if not tasks:
        raise EvalBundleError(f"{bundle}/core.yaml lists no icl_tasks")
    return tasks


# ----------------------------------------------------------------------------------------------
# Prompts: the token sequences to score, and which span of each is scored


def render(task: CoreTask, item: dict[str, Any], shots: list[dict[str, Any]]) -> list[str]:
    d = task.delimiter
    if task.task_type == "multiple_choice":
        prefix = "".join(f"{s['query']}{d}{s['choices'][s['gold']]}\n\n" for s in shots)
        return [f"{prefix}{item['query']}{d}{choice}" for choice in item["choices"]]
    if task.task_type == "schema":
        prefix = "".join(f"{s['context_options'][s['gold']]}{d}{s['continuation']}\n\n" for s in shots)
        return [f"{prefix}{ctx}{d}{item['continuation']}" for ctx in item["context_options"]]
    prefix = "".join(f"{s['context'].strip()}{d}{s['continuation']}\n\n" for s in shots)
    without = f"{prefix}{item['context'].strip()}{d}".strip()
    return [without, f"{prefix}{item['context'].strip()}{d}{item['continuation']}"]


def common_length(seqs: list[list[int]], from_end: bool = False) -> int:
    n = min(len(s) for s in seqs)
    for i in range(n):
        idx = -1 - i if from_end else i
        if any(s[idx] != seqs[0][idx] for s in seqs):
            return i
    return n


def spans(task: CoreTask, tokens: list[list[int]]) -> tuple[list[list[int]], list[int], list[int]]:
    """(sequences, start, end): the scored tokens of sequence i are tokens[i][start[i]:end[i]]."""
    if task.task_type == "multiple_choice":  # shared prompt, different continuations
        start = common_length(tokens)
        return tokens, [start] * len(tokens), [len(t) for t in tokens]
    if task.task_type == "schema":  # different contexts, shared continuation
        suffix = common_length(tokens, from_end=True)
        return tokens, [len(t) - suffix for t in tokens], [len(t) for t in tokens]
    without, with_ = tokens
    if with_[: len(without)] != without or len(without) >= len(with_):
        raise EvalBundleError(f"task {task.label}: the prompt does not tokenize as a prefix of prompt+answer")
    return [with_], [len(without)], [len(with_)]


@torch.no_grad()
def score_item(
    model: torch.nn.Module, tokenizer: Any, task: CoreTask, idx: int, device: torch.device
) -> bool:
    item = task.items[idx]
    shots: list[dict[str, Any]] = []
    if task.num_fewshot > 0:
        others = [i for i in range(len(task.items)) if i != idx]
        rng = random.Random(1234 + idx)
        shots = [task.items[i] for i in rng.sample(others, min(task.num_fewshot, len(others)))]
    tokens = tokenizer.encode_batch(render(task, item, shots), prepend=tokenizer.bos_token_id)
    seqs, starts, ends = spans(task, tokens)
    max_len = getattr(getattr(model, "config", None), "sequence_len", None)
    if max_len:  # keep the end of over-long prompts: the scored span is at the end
        crop = [max(0, len(s) - max_len) for s in seqs]
        seqs = [s[c:] for s, c in zip(seqs, crop, strict=True)]
        starts = [max(1, st - c) for st, c in zip(starts, crop, strict=True)]
        ends = [e - c for e, c in zip(ends, crop, strict=True)]
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), tokenizer.bos_token_id, dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(s, dtype=torch.long)
    ids = ids.to(device)
    logits = model(ids).float()
    # position p predicts token p+1: the span [start, end) is scored by positions [start-1, end-1)
    losses = F.cross_entropy(logits[:, :-1].transpose(1, 2), ids[:, 1:], reduction="none")
    if task.task_type == "language_modeling":
        s, e = starts[0], ends[0]
        return bool(torch.equal(logits[0, s - 1 : e - 1].argmax(-1), ids[0, s:e]))
    mean_losses = [
        losses[i, s - 1 : e - 1].mean().item() for i, (s, e) in enumerate(zip(starts, ends, strict=True))
    ]
    return mean_losses.index(min(mean_losses)) == item["gold"]


def evaluate_task(model: torch.nn.Module, tokenizer: Any, task: CoreTask, device: torch.device) -> float:
    """Accuracy on one task; items are strided over ranks and the results summed."""
    rank, world = rank_and_world()
    correct = torch.zeros(len(task.items), dtype=torch.float32, device=device)
    for idx in range(rank, len(task.items), world):
        liveness.progressed()  # an evaluation item, for this rank's heartbeat
        correct[idx] = float(score_item(model, tokenizer, task, idx, device))
    sum_tensors_across_ranks(correct)
    return correct.mean().item() if len(task.items) else 0.0


def evaluate_core(
    model: torch.nn.Module,
    tokenizer: Any,
    bundle_dir: str | Path,
    device: torch.device,
    max_per_task: int = -1,
    log: Any = None,
) -> dict[str, Any]:
    """{"results": {label: accuracy}, "centered": {label: centred accuracy}, "core": mean centred}."""
    results, centered = {}, {}
    for task in load_tasks(bundle_dir, max_per_task):
        acc = evaluate_task(model, tokenizer, task, device)
        results[task.label] = acc
        centered[task.label] = (acc - task.random_baseline) / (1.0 - task.random_baseline)
        if log is not None:
            log(
                f"  {task.label:<36} {task.num_fewshot}-shot  acc {acc:.4f}  centered {centered[task.label]:+.4f}"
            )
    return {"results": results, "centered": centered, "core": sum(centered.values()) / len(centered)}


def write_csv(result: dict[str, Any]) -> str:
    lines = ["task,accuracy,centered"]
    lines += [f"{k},{result['results'][k]:.6f},{result['centered'][k]:.6f}" for k in result["results"]]
    lines.append(f"CORE,,{result['core']:.6f}")
    return "\n".join(lines) + "\n"
