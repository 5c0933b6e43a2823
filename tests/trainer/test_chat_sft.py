"""sft: padded rows with masked targets; the loss falls on fixture conversations."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from nanorun.pipeline.progress import read_progress
from nanorun.trainer.chat.conversation import render_conversation
from nanorun.trainer.chat_sft import sft_batch
from nanorun.trainer.tasks.customjson import IDENTITY_PATH, CustomJSON

from tests.fixtures.post_training import (
    OFFLINE,
    SFT_FLAGS,
    assert_idempotent,
    assert_resumes_exactly,
    copy_run,
    stage_done,
    stage_history,
)
from tests.fixtures.tiny_run import stage_env
from tests.tasks.byte_tokenizer import ByteTokenizer
from tests.trainer.tiny_models import tiny_gpt, tiny_optimizer

pytestmark = pytest.mark.usefixtures("one_torch_thread")

TOK = ByteTokenizer()


def test_rows_are_padded_and_only_assistant_tokens_are_targets():
    short = {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}
    long = {"messages": [{"role": "user", "content": "ccc"}, {"role": "assistant", "content": "dd"}]}
    x, y = sft_batch(TOK, [short, long], max_len=64, device="cpu")
    ids_long, mask_long = render_conversation(TOK, long)
    assert x.shape == y.shape == (2, len(ids_long) - 1)
    assert x[1].tolist() == ids_long[:-1]
    assert y[1].tolist() == [t if m else -1 for t, m in zip(ids_long[1:], mask_long[1:], strict=True)]
    ids_short, _ = render_conversation(TOK, short)
    pad = TOK.encode_special("<|assistant_end|>")
    assert x[0, len(ids_short) - 1 :].tolist() == [pad] * (x.shape[1] - len(ids_short) + 1)
    assert (y[0, len(ids_short) - 1 :] == -1).all()  # padding is never a target
    assert [t for t in y[0].tolist() if t >= 0] == TOK.encode("b") + [pad]  # "b" and <|assistant_end|>


def test_sft_loss_falls_on_fixture_conversations():
    model = tiny_gpt(TOK.vocab_size, sequence_len=256)
    optimizer = tiny_optimizer(model)
    identity = CustomJSON(IDENTITY_PATH)
    x, y = sft_batch(TOK, [identity[i] for i in range(2)], max_len=256, device="cpu")
    losses = []
    for _ in range(10):
        loss = model(x, y)
        loss.backward()
        optimizer.step()
        model.zero_grad(set_to_none=True)
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0], losses


@pytest.mark.slow
def test_chat_sft_starts_from_mid_train_and_its_loss_falls(tiny_sft_run):
    done = stage_done(tiny_sft_run, "sft")
    assert done["outputs"]["checkpoint"].endswith("sft/checkpoints/step_000004")
    meta = json.loads((Path(done["outputs"]["checkpoint"]) / "meta.json").read_text())
    assert meta["source"] == "midtrain"
    losses = [r["loss"] for r in stage_history(tiny_sft_run, "sft") if "loss" in r]
    assert len(losses) == 4 and min(losses[2:]) < losses[0]


@pytest.mark.slow
def test_interrupted_chat_sft_resumes_to_the_same_weights(tiny_sft_run, tmp_path):
    assert_resumes_exactly("sft", tiny_sft_run, tmp_path / "run", SFT_FLAGS, resume_step=2, final_step=4)


@pytest.mark.slow
def test_finished_chat_sft_is_a_no_op(tiny_sft_run, tmp_path):
    assert_idempotent("sft", tiny_sft_run, tmp_path / "run", SFT_FLAGS)


def test_chat_sft_without_a_finished_source_stage_says_what_to_run(tmp_path):
    from nanorun.trainer.training.finetune import source_checkpoint

    with pytest.raises(SystemExit, match="none of the source stages midtrain, pretrain has finished"):
        source_checkpoint(str(tmp_path / "run"), "midtrain,pretrain")


@pytest.mark.slow
def test_sigterm_saves_a_checkpoint_and_exits_for_a_retry(tiny_mid_run, tmp_path):
    run_dir = copy_run(tiny_mid_run, tmp_path / "run")
    flags = ["--device", "cpu", "--num-iterations", "1000", *SFT_FLAGS[4:]]
    proc = subprocess.Popen(
        [sys.executable, "-m", "nanorun.trainer.chat_sft", "--run-dir", run_dir, *flags],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=stage_env(**OFFLINE, NANORUN_ATTEMPT="5"),
    )
    for line in proc.stdout:
        if line.startswith("step 000002/1000"):
            proc.send_signal(signal.SIGTERM)
            break
    output = proc.communicate(timeout=120)[0]
    assert proc.returncode == 143, output
    steps = sorted(p.name for p in (Path(run_dir) / "sft" / "checkpoints").iterdir())
    assert steps and (Path(run_dir) / "sft" / "checkpoints" / steps[-1] / "COMMITTED").exists()
    assert int(steps[-1].removeprefix("step_")) >= 2 and not (Path(run_dir) / "sft" / "done.json").exists()
    progress = read_progress(run_dir, "sft")  # the marker, through finetune's loop like mid_train and chat_rl
    assert (progress.stopped, progress.attempt) == (
        "preempted",
        5,
    ) and "SIGTERM checkpoint saved in" in output
    assert progress.last_checkpoint.endswith(steps[-1])


@pytest.mark.slow
def test_two_ranks_log_the_tokens_and_loss_of_all_ranks(tiny_mid_run, tmp_path):
    # Both runs train the same 4 conversations in their first step: one rank all of them, two ranks
    # two each. The step's token count and token-level mean loss are of the whole step either way.
    flags = [f if f != "4" else "1" for f in SFT_FLAGS[:4]] + SFT_FLAGS[4:]  # --num-iterations 1
    runs = {n: copy_run(tiny_mid_run, tmp_path / f"ranks{n}") for n in (1, 2)}
    procs = {
        n: subprocess.Popen(
            [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n}"]
            + ["-m", "nanorun.trainer.chat_sft", "--run-dir", run, *flags],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=stage_env(**OFFLINE),
        )
        for n, run in runs.items()
    }
    steps = {}
    for n, proc in procs.items():
        out, _ = proc.communicate(timeout=300)
        assert proc.returncode == 0, out
        ((loss, tokens),) = re.findall(r"step \d+/1 \| loss (\d+\.\d+) \|.* (\d+) tokens", out)
        steps[n] = (float(loss), int(tokens))
    assert steps[2][1] == steps[1][1] > 0
    assert steps[2][0] == pytest.approx(steps[1][0], rel=1e-3)
