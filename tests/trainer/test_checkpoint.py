"""Checkpoints: safetensors weights + sharded optimizer state + meta + commit marker, local and S3."""

from __future__ import annotations

import json

import pytest
import torch
from nanorun.pipeline import storage
from nanorun.pipeline.progress import Done, write_done
from nanorun.trainer.model.gpt import GPT, GPTConfig
from nanorun.trainer.training.checkpoint import (
    CheckpointError,
    checkpoint_dir,
    final_checkpoint,
    latest_checkpoint,
    list_checkpoints,
    load_model,
    load_optimizer,
    read_meta,
    resumable_checkpoint,
    save_checkpoint,
    verify_checkpoint,
)


def tiny_model(seed: int = 0) -> GPT:
    torch.manual_seed(seed)
    model = GPT(GPTConfig.from_depth(2, vocab_size=300, sequence_len=32, head_dim=32, window_pattern="L"))
    model.init_weights()
    return model


def optimizer_for(model: GPT):
    return model.setup_optimizer(
        matrix_lr=0.02, embedding_lr=0.2, unembedding_lr=0.004, scalar_lr=0.3, weight_decay=0.1
    )


def train_steps(model: GPT, opt, steps: int, seed: int = 1) -> None:
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        x = torch.randint(0, 300, (2, 32), generator=gen)
        model(x, x).backward()
        opt.step()
        model.zero_grad(set_to_none=True)


def test_model_round_trips_through_safetensors_with_meta(tmp_path):
    model = tiny_model()
    uri = save_checkpoint(str(tmp_path / "pretrain"), 7, model, None, {"note": "hello"})
    assert uri.endswith("checkpoints/step_000007")
    assert (
        b"pickle" not in (tmp_path / "pretrain/checkpoints/step_000007/model.safetensors").read_bytes()[:64]
    )
    loaded, meta = load_model(uri, "cpu")
    assert not loaded.training
    assert meta["step"] == 7 and meta["note"] == "hello" and meta["model_config"] == model.config.to_dict()
    for (name, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items(), strict=True):
        assert torch.equal(a, b), name
    x = torch.randint(0, 300, (1, 16))
    assert torch.equal(model.eval()(x), loaded(x))


def test_optimizer_state_resumes_the_same_trajectory(tmp_path):
    model, opt = tiny_model(), None
    opt = optimizer_for(model)
    train_steps(model, opt, 3)
    uri = save_checkpoint(str(tmp_path), 3, model, opt, {})
    train_steps(model, opt, 2, seed=2)

    resumed, _ = load_model(uri, "cpu")
    resumed.train()
    opt2 = optimizer_for(resumed)
    load_optimizer(uri, opt2)
    train_steps(resumed, opt2, 2, seed=2)
    for (name, a), (_, b) in zip(model.state_dict().items(), resumed.state_dict().items(), strict=True):
        assert torch.equal(a, b), name


def test_half_written_checkpoint_is_ignored(tmp_path):
    stage = str(tmp_path / "pretrain")
    model = tiny_model()
    good = save_checkpoint(stage, 10, model, None, {})
    half = checkpoint_dir(stage, 20)  # a save killed before its commit marker
    storage.write_bytes(storage.join(half, "model.safetensors"), b"\x00" * 100)
    storage.write_json(storage.join(half, "meta.json"), {"step": 20})
    assert latest_checkpoint(stage) == good
    with pytest.raises(CheckpointError, match="not a committed checkpoint"):
        load_model(half, "cpu")


def test_saving_again_replaces_a_half_written_directory_of_the_same_step(tmp_path):
    stage = str(tmp_path)
    half = checkpoint_dir(stage, 5)
    storage.write_bytes(storage.join(half, "junk.bin"), b"junk")
    save_checkpoint(stage, 5, tiny_model(), None, {})
    assert not storage.exists(storage.join(half, "junk.bin"))
    assert latest_checkpoint(stage) == half


def test_only_the_newest_checkpoints_are_kept(tmp_path):
    model = tiny_model()
    for step in range(1, 6):
        save_checkpoint(str(tmp_path), step, model, None, {}, keep_last=2)
    assert [s for s, _ in list_checkpoints(str(tmp_path))] == [4, 5]


def test_meta_records_the_config_id_of_the_run_that_saved_it(tmp_path, monkeypatch):
    monkeypatch.setenv("NANORUN_CONFIG_ID", "cfg-a")
    uri = save_checkpoint(str(tmp_path / "pretrain"), 3, tiny_model(), None, {})
    assert read_meta(uri)["config_id"] == "cfg-a"


def test_resume_skips_checkpoints_of_another_config_and_takes_its_own(tmp_path, monkeypatch):
    stage, model = str(tmp_path / "pretrain"), tiny_model()
    monkeypatch.setenv("NANORUN_CONFIG_ID", "cfg-a")
    own = save_checkpoint(stage, 2, model, None, {})
    monkeypatch.setenv("NANORUN_CONFIG_ID", "cfg-old")
    monkeypatch.setattr(
        "nanorun.trainer.training.checkpoint._prune", lambda *a, **k: None
    )  # keep both configs' here
    other = save_checkpoint(stage, 4, model, None, {})
    assert latest_checkpoint(stage) == other  # the newest of any config (what serving looks for)
    assert resumable_checkpoint(stage, "cfg-a") == own
    assert resumable_checkpoint(stage, "cfg-new") is None  # a re-run after a spec change: from the input
    monkeypatch.setenv("NANORUN_CONFIG_ID", "cfg-a")
    assert resumable_checkpoint(stage) == own  # default: this process's NANORUN_CONFIG_ID
    monkeypatch.delenv("NANORUN_CONFIG_ID")
    assert resumable_checkpoint(stage) == other  # no id: any checkpoint, as before ids existed


def test_a_rerun_saving_a_step_an_earlier_config_saved_replaces_it_marker_first(tmp_path, monkeypatch):
    stage = str(tmp_path / "pretrain")
    monkeypatch.setenv("NANORUN_CONFIG_ID", "cfg-old")
    old = save_checkpoint(stage, 3, tiny_model(seed=0), None, {"note": "old"})
    later_old = save_checkpoint(stage, 6, tiny_model(seed=0), None, {"note": "old"})
    marker = storage.join(old, "COMMITTED")
    removals = []
    delete_prefix = storage.delete_prefix

    def watched_delete_prefix(prefix: str) -> int:
        removals.append((prefix, storage.exists(marker)))
        return delete_prefix(prefix)

    monkeypatch.setattr(storage, "delete_prefix", watched_delete_prefix)
    monkeypatch.setenv("NANORUN_CONFIG_ID", "cfg-new")
    new_model = tiny_model(seed=1)
    uri = save_checkpoint(stage, 3, new_model, None, {"note": "new"})
    assert uri == old
    assert (old, False) in removals  # the directory's files went after its marker, never before
    meta = read_meta(uri)
    assert (meta["note"], meta["config_id"]) == ("new", "cfg-new")
    loaded, _ = load_model(uri, "cpu")
    assert torch.equal(loaded.state_dict()["lm_head.weight"], new_model.state_dict()["lm_head.weight"])
    # the earlier config's other checkpoint stays (the chat service may be serving it) and does not
    # count towards this configuration's keep_last
    assert read_meta(later_old)["config_id"] == "cfg-old"
    save_checkpoint(stage, 4, new_model, None, {}, keep_last=1)
    assert [s for s, _ in list_checkpoints(stage)] == [4, 6]


def test_saving_a_step_this_config_already_committed_keeps_it(tmp_path, monkeypatch):
    stage = str(tmp_path / "pretrain")
    monkeypatch.setenv("NANORUN_CONFIG_ID", "cfg-a")
    uri = save_checkpoint(stage, 3, tiny_model(), None, {"note": "periodic"})
    save_checkpoint(stage, 3, tiny_model(seed=1), None, {"note": "sigterm"})  # SIGTERM right after the save
    assert read_meta(uri)["note"] == "periodic"


def test_final_checkpoint_follows_done_json_and_explains_when_missing(tmp_path):
    run = str(tmp_path)
    with pytest.raises(CheckpointError, match="has not finished"):
        final_checkpoint(run, "pretrain")
    uri = save_checkpoint(storage.join(run, "pretrain"), 3, tiny_model(), None, {})
    write_done(run, Done(stage="pretrain", seconds=1.0, outputs={"checkpoint": uri}))
    assert final_checkpoint(run, "pretrain") == uri


def test_s3_checkpoint_with_optimizer_round_trips(s3_run_dir):
    stage = storage.join(s3_run_dir, "pretrain")
    model = tiny_model()
    opt = optimizer_for(model)
    train_steps(model, opt, 2)
    uri = save_checkpoint(stage, 2, model, opt, {"dataloader": {"count": 1}})
    assert uri.startswith("s3://") and latest_checkpoint(stage) == uri
    assert json.loads(storage.read_text(storage.join(uri, "COMMITTED")))["step"] == 2
    assert any(f.endswith("/optim/.metadata") for f in storage.list_files(uri))
    loaded, meta = load_model(uri, "cpu")
    opt2 = optimizer_for(loaded)
    load_optimizer(uri, opt2)
    assert read_meta(uri)["dataloader"] == {"count": 1}
    train_steps(model, opt, 1, seed=5)
    loaded.train()
    train_steps(loaded, opt2, 1, seed=5)
    for (name, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items(), strict=True):
        assert torch.equal(a, b), name
    verify_checkpoint(uri)  # every file read back from S3 and checksummed
    weights = storage.join(uri, "model.safetensors")
    data = bytearray(storage.read_bytes(weights))
    data[len(data) // 2] ^= 0xFF
    storage.write_bytes(weights, bytes(data))
    with pytest.raises(CheckpointError, match=f"checkpoint file {weights} is corrupt: its contents changed"):
        verify_checkpoint(uri)


def truncate(path, keep: int = 100) -> None:
    path.write_bytes(path.read_bytes()[:keep])


def test_a_truncated_file_is_named_and_resume_falls_back_to_the_checkpoint_before(tmp_path, capsys):
    stage = str(tmp_path / "pretrain")
    model = tiny_model()
    opt = optimizer_for(model)
    for step in (3, 6):
        save_checkpoint(stage, step, model, opt, {})
    weights = tmp_path / "pretrain/checkpoints/step_000006/model.safetensors"
    truncate(weights)
    with pytest.raises(
        CheckpointError, match=f"checkpoint file {weights} is corrupt: 100 bytes, \\d+ bytes were committed"
    ):
        verify_checkpoint(checkpoint_dir(stage, 6))
    assert resumable_checkpoint(stage) == checkpoint_dir(stage, 3)
    assert f"warning: checkpoint file {weights} is corrupt" in capsys.readouterr().err
    assert [s for s, _ in list_checkpoints(stage)] == [
        3,
        6,
    ]  # nothing deleted: the damaged one stays to be looked at
    save_checkpoint(stage, 6, model, opt, {})  # the resumed run reaching step 6 again replaces it
    assert resumable_checkpoint(stage) == checkpoint_dir(stage, 6)
    load_model(checkpoint_dir(stage, 6), "cpu")


def test_damage_the_file_list_cannot_see_fails_the_load_naming_the_file(tmp_path):
    stage = str(tmp_path / "pretrain")
    model = tiny_model()
    uri = save_checkpoint(stage, 3, model, optimizer_for(model), {})
    ckpt = tmp_path / "pretrain/checkpoints/step_000003"
    weights = ckpt / "model.safetensors"
    weights.write_bytes(b"\xff" * weights.stat().st_size)  # same size, garbage
    with pytest.raises(CheckpointError, match=f"checkpoint file {weights} is corrupt"):
        load_model(uri, "cpu")
    (ckpt / "meta.json").write_text("{half a docum")
    (ckpt / "COMMITTED").write_text('{"step": 3}')  # a marker that predates file lists
    with pytest.raises(CheckpointError, match=f"checkpoint file {ckpt / 'meta.json'} is missing or corrupt"):
        read_meta(uri)


def test_a_corrupt_optimizer_shard_is_a_checkpoint_error_naming_the_directory(tmp_path):
    stage = str(tmp_path / "pretrain")
    model = tiny_model()
    uri = save_checkpoint(stage, 3, model, optimizer_for(model), {})
    for shard in (tmp_path / "pretrain/checkpoints/step_000003/optim").glob("*.distcp"):
        truncate(shard, 10)
    with pytest.raises(CheckpointError, match=f"optimizer state in {uri}/optim is missing or corrupt"):
        load_optimizer(uri, optimizer_for(tiny_model()))


def flip_bytes(path, at: float = 0.5, count: int = 8) -> None:
    """Damage that keeps the size: `count` bytes inverted from `at` (a fraction of the file) on."""
    data = bytearray(path.read_bytes())
    start = int(len(data) * at)
    data[start : start + count] = bytes(b ^ 0xFF for b in data[start : start + count])
    path.write_bytes(bytes(data))


def marker(uri: str) -> dict:
    return storage.read_json(storage.join(uri, "COMMITTED"))


def test_the_marker_records_a_checksum_of_every_file_of_every_rank(tmp_path):
    model = tiny_model()
    uri = save_checkpoint(str(tmp_path), 3, model, optimizer_for(model), {})
    m = marker(uri)
    assert set(m["blake2b"]) == set(m["files"])  # weights, meta.json and each optim/ file
    assert any(name.startswith("optim/") and name.endswith(".distcp") for name in m["blake2b"])
    for name, digest in m["blake2b"].items():
        assert storage.file_checksum(storage.join(uri, name)) == digest, name


@pytest.mark.parametrize("damaged", ["model.safetensors", "optim"])
def test_same_size_damage_of_the_newest_checkpoint_resumes_from_the_one_before(tmp_path, capsys, damaged):
    stage = str(tmp_path / "pretrain")
    model = tiny_model()
    opt = optimizer_for(model)
    for step in (3, 6):
        save_checkpoint(stage, step, model, opt, {})
    newest = tmp_path / "pretrain/checkpoints/step_000006"
    # the middle of the file: tensor data, which neither safetensors nor DCP would notice
    target = (
        newest / "model.safetensors"
        if damaged == "model.safetensors"
        else next((newest / "optim").glob("*.distcp"))
    )
    size = target.stat().st_size
    flip_bytes(target)
    assert target.stat().st_size == size
    with pytest.raises(
        CheckpointError,
        match=f"checkpoint file {target} is corrupt: its contents changed since it was committed",
    ):
        verify_checkpoint(str(newest))

    assert resumable_checkpoint(stage) == checkpoint_dir(stage, 3)
    warning = capsys.readouterr().err.splitlines()
    assert len(warning) == 1  # one line: the file, what is wrong, where the stage resumes instead
    assert warning[0].startswith(f"warning: checkpoint file {target} is corrupt: its contents changed")
    assert warning[0].endswith(f"; resuming from {checkpoint_dir(stage, 3)}")
    assert [s for s, _ in list_checkpoints(stage)] == [3, 6]  # left to be looked at

    save_checkpoint(stage, 6, model, opt, {})  # the resumed run reaching step 6 replaces it...
    verify_checkpoint(str(newest))  # ...whole
    assert resumable_checkpoint(stage) == checkpoint_dir(stage, 6)


def test_loading_a_damaged_checkpoint_for_evaluation_names_the_file(tmp_path):
    uri = save_checkpoint(str(tmp_path / "pretrain"), 3, tiny_model(), None, {})
    weights = tmp_path / "pretrain/checkpoints/step_000003/model.safetensors"
    flip_bytes(weights)  # safetensors itself would load these weights without a word
    with pytest.raises(CheckpointError, match=f"^checkpoint file {weights} is corrupt: its contents changed"):
        load_model(uri, "cpu")


def test_a_damaged_meta_json_is_named_and_resume_falls_back(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("NANORUN_CONFIG_ID", "cfg-a")
    stage = str(tmp_path / "pretrain")
    model = tiny_model()
    for step in (3, 6):
        save_checkpoint(stage, step, model, None, {"note": "hello"})
    meta = tmp_path / "pretrain/checkpoints/step_000006/meta.json"
    meta.write_text(meta.read_text().replace('"hello"', '"HELLO"'))  # still valid JSON, same size
    with pytest.raises(CheckpointError, match=f"checkpoint file {meta} is corrupt: its contents changed"):
        read_meta(checkpoint_dir(stage, 6))
    assert resumable_checkpoint(stage) == checkpoint_dir(stage, 3)
    assert f"warning: checkpoint file {meta} is corrupt" in capsys.readouterr().err

    meta.write_text("{" + " " * (meta.stat().st_size - 1))  # not JSON: not taken for another config's either
    assert resumable_checkpoint(stage) == checkpoint_dir(stage, 3)
    assert f"warning: checkpoint file {meta} is corrupt" in capsys.readouterr().err


def test_pruning_keeps_the_checkpoint_resumed_from_until_a_newer_good_one_exists(tmp_path, capsys):
    stage = str(tmp_path / "pretrain")
    model = tiny_model()
    for step in (3, 6):
        save_checkpoint(stage, step, model, None, {}, keep_last=1)
    assert [s for s, _ in list_checkpoints(stage)] == [6]
    save_checkpoint(stage, 3, model, None, {}, keep_last=5)  # an older good one, as a longer keep_last leaves
    flip_bytes(tmp_path / "pretrain/checkpoints/step_000006/model.safetensors")
    assert resumable_checkpoint(stage) == checkpoint_dir(stage, 3)
    # the resumed run saves step 4 with keep_last=1: the damaged step 6 does not count against it, so
    # neither the step just saved nor (until then) the one resumed from is pruned on its account
    save_checkpoint(stage, 4, model, None, {}, keep_last=1)
    assert [s for s, _ in list_checkpoints(stage)] == [4, 6]
    assert resumable_checkpoint(stage) == checkpoint_dir(stage, 4)
    assert "step_000006/model.safetensors is corrupt" in capsys.readouterr().err


def test_checkpoints_saved_before_checksums_still_verify_and_load(tmp_path):
    stage = str(tmp_path / "pretrain")
    model = tiny_model()
    uri = save_checkpoint(stage, 3, model, optimizer_for(model), {})
    m = marker(uri)
    del m["blake2b"]  # a marker written before checksums: sizes only
    storage.write_json(storage.join(uri, "COMMITTED"), m)
    verify_checkpoint(uri)
    assert resumable_checkpoint(stage) == uri
    loaded, _ = load_model(uri, "cpu")
    load_optimizer(uri, optimizer_for(loaded))
    storage.write_json(storage.join(uri, "COMMITTED"), {"step": 3})  # older still: no file list
    verify_checkpoint(uri)
    load_model(uri, "cpu")
