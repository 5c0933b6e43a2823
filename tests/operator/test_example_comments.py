"""The numbers written in the example LLMRuns' comments are the numbers the code computes: parameter
counts (from the model the trainer builds), the characters a shard count buys and whether they cover
the tokens the horizon needs, and the batch arithmetic next to `totalBatchSize` and `numIterations`."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
import yaml
from nanorun.operator.api import parse_spec
from nanorun.trainer.model.gpt import GPT, GPTConfig

REPO = Path(__file__).resolve().parents[2]
EXAMPLES = sorted((REPO / "manifests" / "examples").glob("*.yaml")) + [REPO / "examples" / "tiny.yaml"]
# karpathy/fineweb-edu-100b-shuffle: about 250M characters a shard, and nanochat's tokenizer reads
# about 4.8 characters a token (both from nanochat's speedrun.sh, which sizes its download with them).
SHARD_CHARS, CHARS_PER_TOKEN = 250e6, 4.8
SCALE = {"K": 1e3, "M": 1e6, "B": 1e9}


def model(spec) -> GPT:
    m = spec.model
    shape = {
        "aspect_ratio": m.aspect_ratio,
        "head_dim": m.head_dim,
        "n_kv_head": m.n_kv_head,
        "window_pattern": m.window_pattern,
    }  # unset: the trainer's defaults, as base_train builds it
    config = GPTConfig.from_depth(
        m.depth, spec.tokenizer.vocab_size, m.max_seq_len, **{k: v for k, v in shape.items() if v is not None}
    )
    with torch.device("meta"):
        return GPT(config)


def number(value: str, unit: str) -> float:
    return float(value) * SCALE[unit]


@pytest.mark.parametrize("example", EXAMPLES, ids=lambda p: p.name)
def test_the_comments_of_an_example_say_what_the_code_computes(example: Path):
    text = example.read_text()
    spec = parse_spec(yaml.safe_load(text)["spec"])
    pretrain = spec.stages.pretrain
    checked = 0

    stated = re.search(r"\(([\d.]+)([MB]) parameters, ([\d.]+)([MB]) of them", text)
    if stated:
        gpt = model(spec)
        assert number(*stated.group(1, 2)) == pytest.approx(gpt.num_params(), rel=0.01), stated.group(0)
        assert number(*stated.group(3, 4)) == pytest.approx(gpt.num_scaling_params(), rel=0.01), stated.group(
            0
        )
        checked += 1

    shards = re.search(
        r"shards: (\d+) +# ~(\d+)B characters \(250M a shard\): (\d+) x ([\d.]+)M tokens need ~(\d+)B", text
    )
    if shards:
        count, chars, ratio, scaling, needed = shards.groups()
        assert int(count) == spec.data.shards and int(ratio) == pretrain.target_param_data_ratio
        assert float(chars) * 1e9 == pytest.approx(spec.data.shards * SHARD_CHARS, rel=0.05)
        gpt = model(spec)
        assert float(scaling) * 1e6 == pytest.approx(gpt.num_scaling_params(), rel=0.01)
        need = pretrain.target_param_data_ratio * gpt.num_scaling_params() * CHARS_PER_TOKEN
        assert float(needed) * 1e9 == pytest.approx(need, rel=0.05)
        assert spec.data.shards * SHARD_CHARS > need  # the shards cover the horizon
        checked += 1

    procs = spec.compute.nodes * (spec.compute.gpus_per_node or 1)
    for a, b, c in re.findall(
        r"totalBatchSize: \d+ +# (\d+) x (\d+) tokens x (\d+) processes = one micro-step", text
    ):
        assert (int(a), int(b), int(c)) == (pretrain.device_batch_size, spec.model.max_seq_len, procs)
        assert int(a) * int(b) * int(c) == pretrain.total_batch_size
        checked += 1
    for n, a, b in re.findall(r"totalBatchSize: \d+ +# (\w+) micro-steps? of (\d+) [x×] (\d+) tokens", text):
        steps = {"one": 1, "two": 2}.get(n) or int(n)
        assert (int(a), int(b)) == (pretrain.device_batch_size, spec.model.max_seq_len)
        assert steps * int(a) * int(b) * procs == pretrain.total_batch_size
        checked += 1
    for tokens, unit in re.findall(r"numIterations: \d+ +# ([\d.]+)([KMB]) tokens", text):
        assert number(tokens, unit) == pytest.approx(
            pretrain.num_iterations * pretrain.total_batch_size, rel=0.05
        )
        checked += 1
    assert checked, f"{example.name}: no numbers found to check"
