"""Checkpoints per the stage contract, on a local disk or S3, resumable on any number of ranks.

    <run-dir>/<stage>/checkpoints/step_NNNNNN/
        model.safetensors   weights (fp32 master copy; never pickle), written by rank 0
        optim/              optimizer state in torch.distributed.checkpoint format: every rank writes
                            its own shard, keyed by parameter name, so a run saved on N ranks loads
                            on M ranks (nanochat's per-rank optimizer files need the same GPU count)
        meta.json           model config, step, data-loader state, RNG, loop state, metrics,
                            config_id (NANORUN_CONFIG_ID of the run that saved it)
        COMMITTED           the commit marker, written last: a directory without it is ignored;
                            removed first when a step directory is written again. It lists every
                            file of the checkpoint with its size and a checksum of its contents
                            (BLAKE2b-128, computed when it is written), so a file truncated,
                            lost or changed inside later is found before it is trained on

Fencing: `save_checkpoint` asks `liveness.ensure_current()` before it changes the step directory,
before each rank uploads its shard, and right before the COMMITTED marker, so a rank of an attempt
that a newer one replaced (still running on a lost node) raises `Superseded` and never commits, nor
deletes or overwrites what the newer attempt wrote. Every file written, and every file checked on
resume, counts as progress for the rank's heartbeat.

`save_checkpoint` and `resumable_checkpoint` are collective (every rank writes its optimizer shard;
rank 0 alone reads candidates through and tells the others which one to resume): call them on every
rank. Each rank writes its shard to a local temporary directory, checksums it and copies or uploads
it. Local run directories shared by several nodes must be on a shared filesystem.

    latest_checkpoint(stage_dir)          newest committed checkpoint, or None
    resumable_checkpoint(stage_dir)       newest intact committed checkpoint of this configuration:
                                          where a stage resumes (another config id: start from the
                                          input; a damaged one: a warning, and the one before it)
    verify_checkpoint(uri)                CheckpointError naming the first file not as committed
                                          (size, then contents)
    load_model(uri, device)               (GPT in eval mode, meta); a damaged meta.json or weights
                                          file is a CheckpointError naming it (no fallback: the
                                          caller asked for this checkpoint)
    load_optimizer(uri, optimizer)        restore the sharded optimizer state (any world size)
    final_checkpoint(run_dir, stage)      the checkpoint a finished stage's done.json points at
"""

from __future__ import annotations

import base64
import json
import pickle
import random
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from nanorun.pipeline import storage
from nanorun.pipeline.errors import StageError, one_line
from nanorun.pipeline.layout import DONE_FILE, STEP_DIR, checkpoint_dir, checkpoints_dir, stage_dir
from nanorun.pipeline.progress import current_config_id, read_done
from nanorun.pipeline.stages import by_key
from nanorun.trainer.training import liveness
from nanorun.trainer.training.distributed import barrier, gather_objects, is_distributed, rank_and_world
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors
from torch.distributed.checkpoint.api import CheckpointException

COMMIT_MARKER = "COMMITTED"
WEIGHTS_FILE = "model.safetensors"
META_FILE = "meta.json"
OPTIM_DIR = "optim"
DCP_METADATA = ".metadata"  # the index torch.distributed.checkpoint writes beside its data files
CHECKSUMS = "blake2b"  # the marker's {file: storage.checksum of its contents}; absent in older markers

# Checkpoints this process saved, or chose to resume from after reading them through. Saving such a
# step again keeps it (SIGTERM right after a periodic save, or right after resuming). Any other
# committed directory of this configuration at a step the run reaches is one a resume skipped as
# damaged, since resuming takes the newest intact one: it is replaced. Every rank holds the same set.
_known_good: set[str] = set()


class CheckpointError(StageError):
    """A checkpoint is missing or unusable; the message says which file and what to do."""


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    return getattr(model, "_orig_mod", model)  # torch.compile wraps the module


def is_committed(checkpoint_uri: str) -> bool:
    return storage.exists(storage.join(checkpoint_uri, COMMIT_MARKER))


def list_checkpoints(stage_dir_uri: str) -> list[tuple[int, str]]:
    """(step, uri) of every checkpoint directory, committed or not, oldest first."""
    root = checkpoints_dir(stage_dir_uri)
    out = []
    for name in storage.list_dirs(root):
        m = STEP_DIR.match(name)
        if m:
            out.append((int(m.group(1)), storage.join(root, name)))
    return sorted(out)


def latest_checkpoint(stage_dir_uri: str) -> str | None:
    """The newest committed checkpoint of a stage, or None (half-written ones are skipped)."""
    for _, uri in reversed(list_checkpoints(stage_dir_uri)):
        if is_committed(uri):
            return uri
    return None


def saved_config_id(checkpoint_uri: str) -> str:
    """The config id a committed checkpoint was saved under ("": saved by a stage run with no id)."""
    meta = storage.read_json_or_none(storage.join(checkpoint_uri, META_FILE))
    return str(meta.get("config_id") or "") if isinstance(meta, dict) else ""


def _marker(checkpoint_uri: str) -> dict[str, Any]:
    """The COMMITTED marker of a checkpoint: {"step", "committed_at", "files": {name: size},
    CHECKSUMS: {name: checksum}} ("files" and CHECKSUMS are absent in markers older than them)."""
    uri = storage.join(checkpoint_uri, COMMIT_MARKER)
    try:
        marker = storage.read_json(uri)
    except FileNotFoundError:
        raise CheckpointError(
            f"{checkpoint_uri} is not a committed checkpoint (no {COMMIT_MARKER} marker): it was never "
            "completely written; use latest_checkpoint() or a step that finished saving"
        ) from None
    except ValueError as err:  # JSON or UTF-8 decoding
        raise CheckpointError(f"checkpoint file {uri} is corrupt: {err}") from None
    if not isinstance(marker, dict):
        raise CheckpointError(f"checkpoint file {uri} is corrupt: not a JSON object")
    return marker


def _check_contents(checkpoint_uri: str, marker: dict[str, Any], name: str, actual: str) -> None:
    """CheckpointError naming file `name` when the checksum of its contents is not the one committed."""
    expected = (marker.get(CHECKSUMS) or {}).get(name)
    if expected and actual != expected:
        raise CheckpointError(
            f"checkpoint file {storage.join(checkpoint_uri, name)} is corrupt: its contents "
            f"changed since it was committed ({CHECKSUMS} checksum mismatch)"
        )


def verify_checkpoint(checkpoint_uri: str) -> None:
    """Raise CheckpointError naming the first file that is not as the COMMITTED marker lists it:
    missing, truncated or grown (one listing), then changed inside at the same size (every file is
    read once and checksummed: a bit flipped on disk, garbage written over it).

    Older markers check what they list: without checksums, sizes only; without a file list, nothing
    (their damage shows when loaded: load_weights, load_optimizer and read_meta name the file)."""
    marker = _marker(checkpoint_uri)
    committed = marker.get("files") or {}
    present = storage.file_sizes(checkpoint_uri) if committed else {}
    for name, size in sorted(committed.items()):
        if present.get(name) != size:
            found = "missing" if name not in present else f"{present[name]} bytes"
            raise CheckpointError(
                f"checkpoint file {storage.join(checkpoint_uri, name)} is corrupt: {found}, "
                f"{size} bytes were committed"
            )
    for name in sorted(marker.get(CHECKSUMS) or {}):
        try:
            actual = storage.file_checksum(storage.join(checkpoint_uri, name))
            liveness.progressed()
        except FileNotFoundError:
            raise CheckpointError(
                f"checkpoint file {storage.join(checkpoint_uri, name)} is missing"
            ) from None
        _check_contents(checkpoint_uri, marker, name, actual)


def _newest_intact(stage_dir_uri: str, config_id: str) -> tuple[str | None, list[str]]:
    """(the newest committed checkpoint of `config_id` (any, when empty) whose every file is as
    committed, the damaged ones passed over); one warning line for each of those, saying where the
    stage resumes."""
    chosen, damaged = None, []
    for _, uri in reversed(list_checkpoints(stage_dir_uri)):
        if not is_committed(uri):
            continue
        try:
            meta = read_meta(uri)  # against its checksum: the config id below must be the one saved
            if config_id and str(meta.get("config_id") or "") != config_id:
                continue
            verify_checkpoint(uri)
        except CheckpointError as err:
            damaged.append((uri, err))
            continue
        chosen = uri
        break
    then = f"resuming from {chosen}" if chosen else "no earlier checkpoint to resume from: starting over"
    for _, err in damaged:
        print(f"warning: {one_line(err)}; {then}", file=sys.stderr, flush=True)
    return chosen, [uri for uri, _ in damaged]


def resumable_checkpoint(stage_dir_uri: str, config_id: str | None = None) -> str | None:
    """Where a stage resumes: its newest committed checkpoint saved under `config_id` (default: this
    process's NANORUN_CONFIG_ID). Without an id (a stage run by hand), any checkpoint. A checkpoint
    of another configuration is not resumed: a re-run after a spec change starts from its input.

    Collective: rank 0 reads the candidates through (every file against its size and checksum) and
    the other ranks take its choice, so a checkpoint is downloaded once to check it, not once per
    rank. A damaged checkpoint (a file not as committed) is skipped with a warning naming the file,
    and the one before it is used: the steps since are trained again, identically. The damaged one
    is left for inspection; the run replaces it when it saves that step again, and pruning never
    counts it against an older intact one (see _prune)."""
    config_id = current_config_id() if config_id is None else config_id
    found = _newest_intact(stage_dir_uri, config_id) if rank_and_world()[0] == 0 else None
    if is_distributed():
        box = [found]
        dist.broadcast_object_list(box, src=0)
        found = box[0]
    uri, damaged = found
    _known_good.difference_update(
        damaged
    )  # damaged since this process saved it: saving that step replaces it
    if uri:
        _known_good.add(uri)
    return uri


def rng_state() -> dict[str, Any]:
    state = {
        "torch": base64.b64encode(torch.get_rng_state().numpy().tobytes()).decode(),
        "python": base64.b64encode(pickle.dumps(random.getstate())).decode(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = base64.b64encode(torch.cuda.get_rng_state().numpy().tobytes()).decode()
    return state


def restore_rng(state: dict[str, Any] | None) -> None:
    if not state:
        return
    torch.set_rng_state(torch.frombuffer(bytearray(base64.b64decode(state["torch"])), dtype=torch.uint8))
    random.setstate(pickle.loads(base64.b64decode(state["python"])))  # our own bytes, from meta.json
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(
            torch.frombuffer(bytearray(base64.b64decode(state["cuda"])), dtype=torch.uint8)
        )


def _dcp(fn: Any, state: dict, **kwargs: Any) -> None:
    with warnings.catch_warnings():  # one process without a process group is a supported case, not news
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        fn(state, **kwargs)


def optimizer_save_planner() -> Any:
    """DCP's planner with entries that every rank holds (replicated ones) saved by rank 0 only, not
    spread over the ranks: a resuming rank then needs rank 0's file and its own (see
    optimizer_files_for), not a piece of every file."""
    return dcp.DefaultSavePlanner(dedup_save_to_lowest_rank=True)


def _save_optimizer(optimizer: Any, ckpt_uri: str) -> dict[str, str]:
    """Write this rank's optimizer shard (and, on rank 0, DCP's `.metadata`) under `optim/`; returns
    {file name in the checkpoint: checksum} of the files this rank wrote. DCP writes into a local
    temporary directory, so each rank checksums exactly its own files (just written: read from the
    page cache) before copying or uploading them, also when all ranks share one run directory."""
    state = optimizer.sharded_state_dict()
    checksums = {}
    with tempfile.TemporaryDirectory(prefix="nanorun-optim-") as tmp:
        _dcp(dcp.save, state, storage_writer=dcp.FileSystemWriter(tmp), planner=optimizer_save_planner())
        for path in storage.walk_local(tmp):
            name = f"{OPTIM_DIR}/{path.relative_to(tmp).as_posix()}"
            checksums[name] = storage.file_checksum(path)
            storage.upload_from(path, storage.join(ckpt_uri, name))
            liveness.progressed()
    return checksums


def _gather(checksums: dict[str, str]) -> dict[str, str]:
    """Every rank's {file: checksum}, merged (on every rank: the marker is written by rank 0)."""
    return {name: value for part in gather_objects(checksums) for name, value in (part or {}).items()}


def save_checkpoint(
    stage_dir_uri: str,
    step: int,
    model: torch.nn.Module,
    optimizer: Any | None,
    meta: dict[str, Any],
    keep_last: int = 3,
) -> str:
    """Write checkpoint `step` (collective), commit it, prune to the newest `keep_last`; returns its URI.

    meta.json records `config_id` (NANORUN_CONFIG_ID); only checkpoints of the same id are pruned.
    The COMMITTED marker records every file's size and a checksum of its contents: weights and meta
    are checksummed from the bytes in memory, optimizer shards by the rank that wrote them.
    """
    uri, config_id = checkpoint_dir(stage_dir_uri, step), current_config_id()
    # every rank decides alike (each holds the same _known_good): the directory is only changed by
    # rank 0, after the barrier below
    same = uri in _known_good and is_committed(uri) and saved_config_id(uri) == config_id
    barrier()
    if same:  # e.g. SIGTERM right after a periodic save of the same step
        return uri
    liveness.ensure_current()  # every rank: its shard goes into the step directory below
    if rank_and_world()[0] == 0 and storage.list_files(uri):
        delete_checkpoint(uri)  # a re-run reaching a step an earlier run saved, or an interrupted save
    barrier()
    checksums = _gather(_save_optimizer(optimizer, uri)) if optimizer is not None else {}
    barrier()
    if rank_and_world()[0] == 0:
        module = _unwrap(model)
        tensors = {k: v.detach().to("cpu").contiguous() for k, v in module.state_dict().items()}
        weights = save_safetensors(tensors)
        storage.write_bytes(storage.join(uri, WEIGHTS_FILE), weights)
        checksums[WEIGHTS_FILE] = storage.checksum(weights)
        liveness.progressed()
        full_meta = {
            "step": step,
            "saved_at": time.time(),
            "world_size": rank_and_world()[1],
            "has_optimizer": optimizer is not None,
            "rng": rng_state(),
            "config_id": config_id,
            **meta,
        }
        if "model_config" not in full_meta and hasattr(module, "config"):
            full_meta["model_config"] = module.config.to_dict()
        meta_bytes = storage.json_bytes(full_meta)
        storage.write_bytes(storage.join(uri, META_FILE), meta_bytes)
        checksums[META_FILE] = storage.checksum(meta_bytes)
        liveness.progressed()
        # every rank's files are in place (barrier above): the marker lists them as they are now
        marker = {
            "step": step,
            "committed_at": time.time(),
            "files": storage.file_sizes(uri),
            CHECKSUMS: checksums,
        }
        liveness.ensure_current()  # the last check: the marker is the commit
        storage.write_json(storage.join(uri, COMMIT_MARKER), marker)
        _prune(stage_dir_uri, keep_last, newest=step, config_id=config_id)
    _known_good.add(uri)
    barrier()
    return uri


def _prune(stage_dir_uri: str, keep_last: int, newest: int, config_id: str) -> None:
    """Keep the newest `keep_last` committed checkpoints up to step `newest` (the one just saved).
    Checkpoints of later steps are left out of the count and alone: only a resume that found them
    damaged runs behind them, so counting them could delete the intact ones it resumed from (and
    the one just saved); they go when the run saves their step again or they age out below it."""
    committed = [(s, u) for s, u in list_checkpoints(stage_dir_uri) if s <= newest and is_committed(u)]
    # Only this configuration's checkpoints count towards `keep_last`; those of an earlier one (the
    # stage ran again after a spec change) are left alone: one may be what the chat service serves
    # until this run's final checkpoint replaces it.
    committed = [(s, u) for s, u in committed if not config_id or saved_config_id(u) == config_id]
    doomed = [u for _, u in committed[:-keep_last]] if keep_last > 0 else []
    # half-written directories older than the one just committed are garbage from interrupted saves
    doomed += [u for s, u in list_checkpoints(stage_dir_uri) if s < newest and not is_committed(u)]
    for u in doomed:
        delete_checkpoint(u)


def delete_checkpoint(checkpoint_uri: str) -> None:
    """Remove a checkpoint directory, its COMMITTED marker first: no reader ever sees the marker
    beside half-deleted files, or beside the new files of a save into the same step directory."""
    storage.delete(storage.join(checkpoint_uri, COMMIT_MARKER))
    storage.delete_prefix(checkpoint_uri)


def read_meta(checkpoint_uri: str) -> dict[str, Any]:
    """meta.json of a committed checkpoint, checked against its committed checksum."""
    marker = _marker(checkpoint_uri)
    meta_uri = storage.join(checkpoint_uri, META_FILE)
    try:
        data = storage.read_bytes(meta_uri)
        _check_contents(checkpoint_uri, marker, META_FILE, storage.checksum(data))
        return json.loads(data)
    except (FileNotFoundError, ValueError) as err:  # ValueError: JSON or UTF-8 decoding
        raise CheckpointError(f"checkpoint file {meta_uri} is missing or corrupt: {err}") from err


def load_weights(checkpoint_uri: str, model: torch.nn.Module) -> None:
    """Copy the checkpoint's weights into `model` (strict: every parameter must match), after checking
    them against their committed checksum (cheap: the bytes are in memory anyway)."""
    marker = _marker(checkpoint_uri)
    weights_uri = storage.join(checkpoint_uri, WEIGHTS_FILE)
    try:
        data = storage.read_bytes(weights_uri)  # storage errors other than a missing file pass as they are
    except FileNotFoundError as err:
        raise CheckpointError(f"checkpoint file {weights_uri} is missing") from err
    _check_contents(checkpoint_uri, marker, WEIGHTS_FILE, storage.checksum(data))
    try:
        tensors = load_safetensors(data)
    except Exception as err:  # safetensors raises its own SafetensorError on a bad header or length
        raise CheckpointError(f"checkpoint file {weights_uri} is corrupt: {err}") from err
    _unwrap(model).load_state_dict(tensors, strict=True, assign=False)


def load_model(
    checkpoint_uri: str, device: torch.device | str, dtype: torch.dtype | None = None
) -> tuple[torch.nn.Module, dict[str, Any]]:
    """Build the GPT a checkpoint describes and load its weights; returns (model in eval mode, meta)."""
    from nanorun.trainer.model.gpt import GPTConfig, build_model

    meta = read_meta(checkpoint_uri)
    if "model_config" not in meta:
        raise CheckpointError(f"{checkpoint_uri}/meta.json has no model_config; it is not a GPT checkpoint")
    model = build_model(GPTConfig.from_dict(meta["model_config"]), torch.device(device))
    load_weights(checkpoint_uri, model)
    if dtype is not None:
        model.to(dtype=dtype)
    model.eval()
    return model, meta


def load_optimizer(checkpoint_uri: str, optimizer: Any) -> None:
    """Restore the optimizer state saved at `checkpoint_uri`, resharded for the current world size."""
    meta = read_meta(checkpoint_uri)
    if not meta.get("has_optimizer", True):
        raise CheckpointError(f"{checkpoint_uri} was saved without optimizer state")
    state = optimizer.sharded_state_dict()
    source = storage.join(checkpoint_uri, OPTIM_DIR)
    if storage.is_s3(source):
        # Only DCP's index and the files this rank's part of the state is in: on 8 ranks each one
        # fetches about an eighth of the optimizer state, not all of it.
        with tempfile.TemporaryDirectory(prefix="nanorun-optim-") as tmp:
            try:
                storage.download_to(storage.join(source, DCP_METADATA), Path(tmp) / DCP_METADATA)
                for name in optimizer_files_for(state, tmp):
                    storage.download_to(storage.join(source, name), Path(tmp) / name)
                    liveness.progressed()
            except (
                OSError,
                storage.StorageError,
                CheckpointException,
                ValueError,
                pickle.UnpicklingError,
            ) as err:
                raise CheckpointError(f"optimizer state in {source} is missing or corrupt: {err}") from err
            _load_optimizer_files(state, tmp, source)
    else:
        _load_optimizer_files(state, source, source)
    optimizer.load_sharded_state_dict(state)


def optimizer_files_for(state: dict, local_dir: str) -> set[str]:
    """The files of the DCP checkpoint in `local_dir` (only its `.metadata` need be there) that
    hold the entries of `state`, this rank's template: what DCP's own load plan for this rank reads."""
    metadata = dcp.FileSystemReader(local_dir).read_metadata()
    planner = dcp.DefaultLoadPlanner()
    planner.set_up_planner(state, metadata, is_coordinator=False)
    return {
        metadata.storage_data[item.storage_index].relative_path for item in planner.create_local_plan().items
    }


def _load_optimizer_files(state: dict, local_dir: str, source: str) -> None:
    try:
        _dcp(dcp.load, state, storage_reader=dcp.FileSystemReader(local_dir))
    except (OSError, RuntimeError, ValueError, pickle.UnpicklingError, CheckpointException) as err:
        # CheckpointException (a BaseException) carries the failures of every rank
        raise CheckpointError(f"optimizer state in {source} is missing or corrupt: {err}") from err


def final_checkpoint(run_dir: str, stage: str) -> str:
    """The checkpoint a finished stage's done.json points at (a clear error when there is none).
    `stage`: its key."""
    try:
        named = by_key(stage)
    except ValueError as err:
        raise CheckpointError(str(err)) from None
    stage, done = named.key, read_done(run_dir, named.key)
    if done is None:
        raise CheckpointError(
            f"stage {stage!r} has not finished in {run_dir}: no "
            f"{storage.join(stage_dir(run_dir, stage), DONE_FILE)}; "
            f"run `python -m {named.entry_point} --run-dir {run_dir}` first"
        )
    uri = done.outputs.get("checkpoint")
    if not uri:
        raise CheckpointError(
            f"{stage}/done.json in {run_dir} names no checkpoint (outputs: {json.dumps(done.outputs)})"
        )
    if not is_committed(uri):
        raise CheckpointError(f"{stage}/done.json points at {uri}, which is missing or not committed")
    return uri
