"""`nanorun export`: the Hugging Face folder computes, generates and tokenizes exactly as nanorun does.

Two models are exported (fp32): the tiny trained run's weights (`tiny_base_run`) run with a
16-token sliding window on its first layer, and a random grouped-query model (tests/fixtures/chat_model.py).
Both have value embeddings; the prompts are longer than the window."""

from __future__ import annotations

import ast
import shutil
from pathlib import Path

import pytest
import torch
from nanorun.pipeline import storage
from nanorun.trainer.chat.conversation import render_conversation, render_for_completion
from nanorun.trainer.chat.engine import Engine
from nanorun.trainer.data.tokenizer import Tokenizer
from nanorun.trainer.hf.export import export_checkpoint, main
from nanorun.trainer.model.gpt import GPT, GPTConfig
from nanorun.trainer.training.checkpoint import final_checkpoint, load_model, save_checkpoint

from tests.fixtures.chat_model import save_chat_checkpoint, tiny_chat_model
from tests.fixtures.tiny_run import small_tokenizer

transformers = pytest.importorskip("transformers")

WINDOW = 16
NEW_TOKENS = 64
MULTILINGUAL = (
    "The quick brown fox, naïvely: 1234567 apples!\n\n"
    "Größenwahn über Straße. Ça va? ¿Qué tal? Здравствуй, мир. 你好，世界。 こんにちは 🙂🚀\t"
    "  indented    spaces\r\nx = f(a, b) ** 2  # don't we'll they're\u00a0done\u2028"
)
CHAT = {
    "messages": [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "What is 12*3? Answer in Deutsch, bitte."},
        {
            "role": "assistant",
            "content": [
                {"type": "text", "text": "Let me compute: "},
                {"type": "python", "text": "12*3"},
                {"type": "python_output", "text": "36"},
                {"type": "text", "text": " Sechsunddreißig."},
            ],
        },
        {"role": "user", "content": [{"type": "text", "text": "Und 你好?"}]},
        {"role": "assistant", "content": "Hallo!"},
    ]
}


def windowed_copy(model: GPT) -> GPT:
    """The same weights, run with a WINDOW-token sliding window on every layer but the last."""
    config = GPTConfig.from_dict({**model.config.to_dict(), "window_pattern": "SL", "short_window": WINDOW})
    copy = GPT(config)
    copy.load_state_dict(model.state_dict())
    return copy.eval()


@pytest.fixture(scope="module", params=[pytest.param("trained", marks=pytest.mark.slow), "grouped-query"])
def exported(request, tmp_path_factory):
    """(nanorun model, nanorun tokenizer, the exported folder) of one of the two models."""
    root = tmp_path_factory.mktemp("export")
    run = str(root / "run")
    if request.param == "trained":
        base_run = request.getfixturevalue("tiny_base_run")
        shutil.copytree(Path(base_run) / "tokenizer", Path(run) / "tokenizer")
        trained, _ = load_model(final_checkpoint(base_run, "pretrain"), "cpu")
        model = windowed_copy(trained)
        tokenizer = Tokenizer.from_run_dir(run)
    else:
        tokenizer = small_tokenizer()
        tokenizer.save(f"{run}/tokenizer")
        # No tool calls (the engine would run the calculator) and no stops: 64 tokens every time.
        mute = [tokenizer.encode_special(t) for t in ("<|python_start|>", "<|assistant_end|>", "<|bos|>")]
        model = tiny_chat_model(tokenizer.vocab_size, seed=3, mute=tuple(mute))
    assert model.config.layer_windows()[0] == WINDOW and model.config.value_embeds
    checkpoint = save_checkpoint(storage.join(run, "sft"), 1, model, None, {})
    folder = export_checkpoint(checkpoint, str(root / "hf"), dtype="float32")
    return model, tokenizer, folder


def hf_model(folder: str):
    return transformers.AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True).eval()


def hf_tokenizer(folder: str):
    return transformers.AutoTokenizer.from_pretrained(folder, trust_remote_code=True)


def prompts(tokenizer: Tokenizer, lengths: tuple[int, ...]) -> list[list[int]]:
    ids = tokenizer.encode(MULTILINGUAL * 4, prepend="<|bos|>")
    return [ids[i : i + n] for i, n in zip((0, 7, 19), lengths, strict=False)]


def left_padded(rows: list[list[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(map(len, rows))
    ids = torch.tensor([[pad] * (width - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    return ids, mask


def test_the_folder_loads_without_nanorun_and_holds_the_asked_dtype(exported):
    model, _, folder = exported
    names = {p.name for p in Path(folder).iterdir()}
    assert {"config.json", "model.safetensors", "generation_config.json", "tokenizer.json"} <= names
    assert {"modeling_nanorun.py", "configuration_nanorun.py", "chat_template.jinja"} <= names
    for name in ("modeling_nanorun.py", "configuration_nanorun.py"):  # torch and transformers only
        imported = {
            (node.module if isinstance(node, ast.ImportFrom) else alias.name).split(".")[0]
            for node in ast.walk(ast.parse((Path(folder) / name).read_text()))
            if isinstance(node, ast.Import | ast.ImportFrom) and not getattr(node, "level", 0)
            for alias in node.names
        }
        assert imported <= {"__future__", "torch", "transformers"}, (name, imported)
    hf = hf_model(folder)
    assert type(hf).__name__ == "NanorunForCausalLM" and hf.dtype == torch.float32
    assert hf.config.layer_windows == model.config.layer_windows()
    # generate stops where nanorun's engine does, pads with BOS, and ends when the context is full
    tokenizer = hf_tokenizer(folder)
    stops = tokenizer.convert_tokens_to_ids(["<|assistant_end|>", "<|bos|>"])
    generation = transformers.GenerationConfig.from_pretrained(folder)
    assert generation.eos_token_id == stops and generation.pad_token_id == tokenizer.pad_token_id == stops[1]
    assert generation.max_length == model.config.sequence_len


def test_logits_equal_nanoruns_on_a_left_padded_batch_longer_than_the_window(exported):
    model, tokenizer, folder = exported
    hf = hf_model(folder)
    rows = prompts(tokenizer, (80, 23, 50))
    assert all(len(r) > WINDOW + 1 for r in rows)
    ids, mask = left_padded(rows, tokenizer.bos_token_id)
    with torch.no_grad():
        logits = hf(input_ids=ids, attention_mask=mask).logits
        for i, row in enumerate(rows):
            expected = model(torch.tensor([row]))[0]
            got = logits[i, ids.size(1) - len(row) :]
            assert got.shape == expected.shape == (len(row), tokenizer.vocab_size)
            torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)


def test_greedy_generate_returns_the_engines_tokens(exported):
    model, tokenizer, folder = exported
    hf = hf_model(folder)
    engine = Engine(model, tokenizer)
    stops = {tokenizer.encode_special("<|assistant_end|>"), tokenizer.bos_token_id}
    rows = prompts(tokenizer, (40, 21))
    ids, mask = left_padded(rows, tokenizer.bos_token_id)
    with torch.no_grad():
        out = hf.generate(input_ids=ids, attention_mask=mask, max_new_tokens=NEW_TOKENS, do_sample=False)
    lengths = []
    for i, row in enumerate(rows):
        (completion,), _ = engine.generate_batch(row, max_tokens=NEW_TOKENS, temperature=0.0)
        expected = completion[len(row) :]
        generated = out[i, ids.size(1) :].tolist()
        stop = next((j for j, t in enumerate(generated) if t in stops), len(generated))
        assert generated[:stop] == expected
        lengths.append(len(expected))
    if tokenizer.vocab_size == 1024:  # the grouped-query model has no stop tokens to stop on
        assert lengths == [NEW_TOKENS, NEW_TOKENS]


def test_the_tokenizer_encodes_and_decodes_as_nanoruns(exported):
    _, tokenizer, folder = exported
    hf = hf_tokenizer(folder)
    ids = tokenizer.encode(MULTILINGUAL)
    assert hf.encode(MULTILINGUAL, add_special_tokens=False) == ids
    assert hf.decode(ids) == tokenizer.decode(ids) == MULTILINGUAL
    rendered, _ = render_conversation(tokenizer, CHAT)
    assert hf.decode(rendered) == tokenizer.decode(rendered)
    assert hf.bos_token_id == tokenizer.bos_token_id and hf.eos_token == "<|assistant_end|>"


def test_the_chat_template_gives_the_engines_token_ids(exported):
    _, tokenizer, folder = exported
    hf = hf_tokenizer(folder)

    def template(conversation, **kwargs) -> list[int]:
        out = hf.apply_chat_template(conversation["messages"], tokenize=True, return_dict=True, **kwargs)
        return list(out["input_ids"])

    assert template(CHAT) == render_conversation(tokenizer, CHAT)[0]
    assert template(CHAT, add_generation_prompt=True) == render_for_completion(tokenizer, CHAT)
    no_system = {"messages": CHAT["messages"][1:4]}
    assert template(no_system, add_generation_prompt=True) == render_for_completion(tokenizer, no_system)
    with pytest.raises(Exception, match="alternate"):
        template({"messages": [{"role": "assistant", "content": "hi"}]})


def test_a_bad_export_says_why_and_leaves_nothing_behind(tiny_chat_run, tmp_path, capsys):
    checkpoint = final_checkpoint_of(tiny_chat_run)
    out = tmp_path / "out"

    def refused(argv: list[str], message: str) -> None:
        assert main(argv) == 1
        assert message in capsys.readouterr().err
        assert sorted(p.name for p in tmp_path.iterdir()) == [p.name for p in sorted(before)]

    before = list(tmp_path.iterdir())
    refused(
        ["--checkpoint", str(Path(tiny_chat_run) / "tokenizer"), "--out", str(out)],
        "no checkpoint at",
    )
    no_model = save_checkpoint(str(tmp_path / "run" / "sft"), 1, torch.nn.Linear(2, 2), None, {})
    before = list(tmp_path.iterdir())
    tokenizer = str(Path(tiny_chat_run) / "tokenizer")
    refused(
        ["--checkpoint", no_model, "--out", str(out), "--tokenizer", tokenizer], "it is not a GPT checkpoint"
    )

    corrupt = tmp_path / "corrupt"
    shutil.copytree(Path(checkpoint).parents[2], corrupt / "run")
    weights = corrupt / "run" / "sft" / "checkpoints" / Path(checkpoint).name / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0xFF
    weights.write_bytes(bytes(data))
    before = list(tmp_path.iterdir())
    refused(["--checkpoint", str(weights.parent), "--out", str(out)], "model.safetensors is corrupt")

    out.mkdir()
    (out / "mine.txt").write_text("keep me")
    before = list(tmp_path.iterdir())
    refused(["--checkpoint", checkpoint, "--out", str(out)], f"{out} exists")
    assert [p.name for p in out.iterdir()] == ["mine.txt"]


def final_checkpoint_of(run_dir: str) -> str:
    from nanorun.trainer.training.checkpoint import latest_checkpoint

    return latest_checkpoint(storage.join(run_dir, "sft"))


def test_export_from_s3_to_s3(s3_run_dir, tmp_path):
    tokenizer = small_tokenizer()
    tokenizer.save(storage.join(s3_run_dir, "tokenizer"))
    model = tiny_chat_model(tokenizer.vocab_size, seed=5)
    checkpoint = save_chat_checkpoint(s3_run_dir, model)
    out = storage.join(s3_run_dir, "hf")
    assert main(["--checkpoint", checkpoint, "--out", out, "--dtype", "bfloat16"]) == 0
    files = storage.file_sizes(out)
    assert {"config.json", "model.safetensors", "modeling_nanorun.py", "tokenizer.json"} <= set(files)
    local = tmp_path / "hf"
    for name in files:
        storage.download_to(storage.join(out, name), local / name)
    hf = hf_model(str(local))
    assert hf.dtype == torch.bfloat16
    ids = torch.tensor([tokenizer.encode(MULTILINGUAL, prepend="<|bos|>")[:40]])
    with torch.no_grad():
        expected = model(ids)
        got = hf(input_ids=ids).logits
    # bf16 weights and activations: as close as nanorun's own bf16 compute is to its fp32 one
    assert (got - expected).abs().max() < 0.1 * expected.abs().max()
    assert main(["--checkpoint", checkpoint, "--out", out]) == 1  # it exists now


def test_an_upload_that_fails_midway_leaves_nothing_on_s3(s3_run_dir, tiny_chat_run, monkeypatch):
    uploaded: list[str] = []
    upload = storage.upload_from

    def failing_after_three(path, uri) -> None:
        if len(uploaded) == 3:
            raise ConnectionResetError("connection reset by peer")
        upload(path, uri)
        uploaded.append(uri)

    monkeypatch.setattr(storage, "upload_from", failing_after_three)
    out = storage.join(s3_run_dir, "hf")
    with pytest.raises(ConnectionResetError):
        export_checkpoint(final_checkpoint_of(tiny_chat_run), out)
    assert len(uploaded) == 3 and not any(
        u.endswith("/config.json") for u in uploaded
    )  # config.json goes last
    assert storage.list_files(out) == []


def test_a_checkpoint_outside_a_run_needs_its_tokenizer_named(tiny_chat_run, tmp_path, capsys):
    loose = tmp_path / "loose"
    shutil.copytree(final_checkpoint_of(tiny_chat_run), loose)
    assert main(["--checkpoint", str(loose), "--out", str(tmp_path / "a")]) == 1
    assert "name the tokenizer's folder with --tokenizer" in capsys.readouterr().err
    tokenizer = str(Path(tiny_chat_run) / "tokenizer")
    assert main(["--checkpoint", str(loose), "--out", str(tmp_path / "b"), "--tokenizer", tokenizer]) == 0
    assert hf_tokenizer(str(tmp_path / "b")).vocab_size == small_tokenizer().vocab_size
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b", "loose"]


def test_a_run_folder_exports_its_newest_checkpoint(tiny_chat_run, tmp_path):
    from nanorun.cli.main import main as nanorun_main

    assert nanorun_main(["export", "--checkpoint", tiny_chat_run, "--out", str(tmp_path / "hf")]) == 0
    card = (tmp_path / "hf" / "README.md").read_text()
    assert f"from `{final_checkpoint_of(tiny_chat_run)}`" in card  # sft's, the newest model stage's
