"""`nanorun export`: a checkpoint of any stage as a Hugging Face model folder.

    nanorun export --checkpoint s3://bucket/run/sft/checkpoints/step_000700 --out ./d20-sft
    nanorun export --checkpoint run/pretrain/checkpoints/step_000040 --out s3://bucket/d2 --dtype float32

The folder (local or on S3) holds

    config.json               NanorunConfig, with `auto_map` naming the two files below
    configuration_nanorun.py  the configuration class   } loaded with trust_remote_code=True:
    modeling_nanorun.py       the model                 } nanorun's exact architecture
    model.safetensors         the weights in --dtype (bfloat16 by default: the compute dtype on GPUs)
    generation_config.json    BOS, the stop tokens (<|assistant_end|>, <|bos|>) and padding
    tokenizer.json            the run's tokenizer in the `tokenizers` format (tokenizer.py)
    tokenizer_config.json     its special tokens, and chat_template.jinja its chat template
    README.md                 a model card: where the weights come from, how to load them

transformers' own `NanoChat` class does not fit: nanorun's per-layer residual and x0 scalars, QK
gain, value embeddings, sliding windows and padded vocabulary are not in it, so the folder ships
its own model files (see modeling_nanorun.py).

The folder is built whole in a local temporary directory, then moved into place (a rename on a
local disk; on S3 an upload, config.json last, and everything uploaded deleted again if a file
fails), so no half-written folder is ever left at --out. An --out that exists is refused.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import sys
import tempfile
from pathlib import Path

import torch
from nanorun.pipeline import layout, storage
from nanorun.pipeline.errors import StageError, run_main
from nanorun.trainer.data.tokenizer import Tokenizer
from nanorun.trainer.hf.configuration_nanorun import NanorunConfig
from nanorun.trainer.hf.modeling_nanorun import NanorunForCausalLM
from nanorun.trainer.hf.tokenizer import EOS, hf_tokenizer
from nanorun.trainer.model.gpt import QK_GAIN, VE_GATE_CHANNELS, GPTConfig

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
CONFIG_FILE = "config.json"  # uploaded last: a folder with it is complete

# nanorun's parameter names (trainer/model/gpt.py) to the exported model's, in transformers' usual terms.
RENAMES = (
    (r"wte\.weight", "model.embed_tokens.weight"),
    (r"value_embeds\.(\d+)\.weight", r"model.value_embeds.\1.weight"),
    (r"(resid|x0)_lambdas", r"model.\1_lambdas"),
    (r"blocks\.(\d+)\.attn\.c_q\.weight", r"model.layers.\1.self_attn.q_proj.weight"),
    (r"blocks\.(\d+)\.attn\.c_k\.weight", r"model.layers.\1.self_attn.k_proj.weight"),
    (r"blocks\.(\d+)\.attn\.c_v\.weight", r"model.layers.\1.self_attn.v_proj.weight"),
    (r"blocks\.(\d+)\.attn\.c_proj\.weight", r"model.layers.\1.self_attn.o_proj.weight"),
    (r"blocks\.(\d+)\.attn\.ve_gate\.weight", r"model.layers.\1.self_attn.ve_gate.weight"),
    (r"blocks\.(\d+)\.mlp\.c_fc\.weight", r"model.layers.\1.mlp.up_proj.weight"),
    (r"blocks\.(\d+)\.mlp\.c_proj\.weight", r"model.layers.\1.mlp.down_proj.weight"),
    (r"lm_head\.weight", "lm_head.weight"),
)

NanorunConfig.register_for_auto_class()
NanorunForCausalLM.register_for_auto_class("AutoModelForCausalLM")


class ExportError(StageError):
    """The export cannot be done as asked; the message says what to change."""


def hf_name(name: str) -> str:
    """The exported model's name of nanorun parameter `name`."""
    for pattern, replacement in RENAMES:
        if re.fullmatch(pattern, name):
            return re.sub(pattern, replacement, name)
    raise ExportError(f"the checkpoint has a parameter nanorun's export does not know: {name}")


def hf_config(config: GPTConfig, tokenizer: Tokenizer) -> NanorunConfig:
    """The exported model's configuration: nanorun's, with every per-layer choice resolved."""
    if tokenizer.vocab_size != config.vocab_size:
        raise ExportError(
            f"the tokenizer has {tokenizer.vocab_size} tokens but the model was trained for "
            f"{config.vocab_size}: it is not this model's tokenizer"
        )
    bos, stops = tokenizer.bos_token_id, [tokenizer.encode_special(EOS), tokenizer.bos_token_id]
    return NanorunConfig(
        vocab_size=config.vocab_size,
        padded_vocab_size=config.padded_vocab_size,
        hidden_size=config.n_embd,
        num_hidden_layers=config.n_layer,
        num_attention_heads=config.n_head,
        num_key_value_heads=config.n_kv_head,
        max_position_embeddings=config.sequence_len,
        rope_theta=config.rope_base,
        layer_windows=config.layer_windows(),
        value_embed_layers=[i for i in range(config.n_layer) if config.has_value_embed(i)],
        ve_gate_channels=VE_GATE_CHANNELS,
        qk_gain=QK_GAIN,
        final_logit_softcapping=config.softcap if config.softcap > 0 else None,
        bos_token_id=bos,
        eos_token_id=stops,
        pad_token_id=bos,
    )


def hf_model(model: torch.nn.Module, tokenizer: Tokenizer, dtype: torch.dtype) -> NanorunForCausalLM:
    """The exported model holding `model`'s weights (nanorun's GPT) in `dtype`."""
    config = hf_config(model.config, tokenizer)
    config.dtype = dtype
    with torch.device("meta"):
        hf = NanorunForCausalLM(config)
    state = {hf_name(k): v.detach().to(dtype) for k, v in model.state_dict().items()}
    hf.load_state_dict(state, strict=True, assign=True)
    hf.generation_config.update(
        bos_token_id=config.bos_token_id,
        eos_token_id=config.eos_token_id,
        pad_token_id=config.pad_token_id,
        max_length=config.max_position_embeddings,  # nanorun's engine stops when the context is full
    )
    return hf.eval()


def model_card(checkpoint_uri: str, step: int | None, config: GPTConfig, dtype: str) -> str:
    return f"""---
library_name: transformers
pipeline_tag: text-generation
---

# nanorun model

Exported by `nanorun export` from `{checkpoint_uri}` (step {step if step is not None else "?"}), weights in {dtype}.

- {config.n_layer} layers, width {config.n_embd}, {config.n_head} query heads and {config.n_kv_head} key/value heads,
  context {config.sequence_len} tokens, vocabulary {config.vocab_size} (padded to {config.padded_vocab_size})
- window pattern `{config.window_pattern}` (layer windows {config.layer_windows()}), value embeddings:
  {"on" if config.value_embeds else "off"}

```python
from transformers import AutoModelForCausalLM, AutoTokenizer

model = AutoModelForCausalLM.from_pretrained(FOLDER, trust_remote_code=True)
tokenizer = AutoTokenizer.from_pretrained(FOLDER, trust_remote_code=True)
chat = [{{"role": "user", "content": "Why is the sky blue?"}}]
inputs = tokenizer.apply_chat_template(chat, add_generation_prompt=True, return_tensors="pt", return_dict=True)
reply = model.generate(**inputs, max_new_tokens=128)
print(tokenizer.decode(reply[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True))
```
"""


def write_folder(checkpoint: str, local_dir: Path, dtype: str, tokenizer_uri: str | None = None) -> None:
    """Write the whole exported folder into the (existing, empty) local directory `local_dir`.
    `checkpoint` is what `nanorun serve` takes: a checkpoint, or a stage or run folder's newest one."""
    from nanorun.trainer.chat.engine import load_chat_model

    if dtype not in DTYPES:
        raise ExportError(f"--dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    try:
        model, tokenizer, info = load_chat_model(checkpoint, tokenizer_uri, device="cpu")
    except layout.NotACheckpointPath as err:  # a checkpoint outside any run, and no --tokenizer
        raise ExportError(f"{err}: name the tokenizer's folder with --tokenizer") from None
    config, hf = model.config, hf_model(model, tokenizer, DTYPES[dtype])
    del model  # only the exported copy of the weights stays in memory
    hf.save_pretrained(local_dir)
    hf_tokenizer(tokenizer, model_max_length=hf.config.max_position_embeddings).save_pretrained(local_dir)
    (local_dir / "README.md").write_text(model_card(info["checkpoint"], info["step"], config, dtype))


def _refuse_existing(out_uri: str) -> None:
    if storage.is_s3(out_uri):
        if storage.list_files(out_uri):
            raise ExportError(f"{out_uri} exists: export into a new folder, or delete it first")
    elif Path(out_uri).exists():
        raise ExportError(f"{out_uri} exists: export into a new folder, or delete it first")


def export_checkpoint(
    checkpoint_uri: str,
    out_uri: str,
    dtype: str = "bfloat16",
    tokenizer_uri: str | None = None,
    replace: bool = False,
) -> str:
    """Write the Hugging Face folder of `checkpoint_uri` at `out_uri` (local or s3://); returns it.

    `replace`: delete what is at `out_uri` first (the export stage re-running), else refuse it."""
    out_uri = out_uri.rstrip("/")
    if not replace:
        _refuse_existing(out_uri)
    if storage.is_s3(out_uri):
        with tempfile.TemporaryDirectory(prefix="nanorun-export-") as tmp:
            write_folder(checkpoint_uri, Path(tmp), dtype, tokenizer_uri)
            if replace:
                storage.delete_prefix(out_uri)
            _upload(Path(tmp), out_uri)
        return out_uri
    out = Path(out_uri)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".partial", dir=out.parent))
    umask = os.umask(0)
    os.umask(umask)
    try:
        tmp.chmod(0o777 & ~umask)  # mkdtemp's 0700 would stay with the folder once it is renamed
        write_folder(checkpoint_uri, tmp, dtype, tokenizer_uri)
        if replace and out.exists():
            shutil.rmtree(out)
        tmp.rename(out)  # atomic: the folder appears whole or not at all
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return str(out)


def _upload(local_dir: Path, out_uri: str) -> None:
    """Upload every file, config.json last; on a failure delete what was uploaded, then re-raise."""
    files = sorted(storage.walk_local(local_dir), key=lambda p: p.name == CONFIG_FILE)
    try:
        for path in files:
            storage.upload_from(path, storage.join(out_uri, path.relative_to(local_dir).as_posix()))
    except BaseException:
        storage.delete_prefix(out_uri)
        raise


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="nanorun export", description=__doc__.split("\n")[0])
    p.add_argument(
        "--checkpoint",
        required=True,
        help="a committed checkpoint, or a stage or run folder (its newest checkpoint); local or s3://",
    )
    p.add_argument("--out", required=True, help="the folder to write (local or s3://); must not exist")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bfloat16", help="dtype of the saved weights")
    p.add_argument(
        "--tokenizer",
        default=None,
        help="the tokenizer's folder (default: the checkpoint's run's tokenizer/)",
    )
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)

    def export() -> int:
        out = export_checkpoint(args.checkpoint, args.out, args.dtype, args.tokenizer)
        print(f"exported {args.checkpoint} to {out}")
        return 0

    return run_main(export)


if __name__ == "__main__":
    sys.exit(main())
