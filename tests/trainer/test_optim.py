"""MuonAdamW: orthogonalisation, schedules, and the ZeRO-2 distributed step (gloo, 2 processes on CPU):
same update as one process, and optimizer state saved at one world size resumes at the other."""

import json
import math
import os
import socket
import warnings
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import torch.multiprocessing as mp
from nanorun.trainer.model.gpt import GPT, GPTConfig
from nanorun.trainer.model.optim import MuonAdamW, lr_multiplier, muon_momentum, muon_update, orthogonalize
from nanorun.trainer.training.checkpoint import optimizer_files_for, optimizer_save_planner

pytestmark = pytest.mark.usefixtures("one_torch_thread")

STEPS_BEFORE_SAVE = 3


def make_model() -> GPT:
    # depth 3: the value-embedding gate group then holds 2 matrices, the (64, 64) group 6: uneven splits
    config = GPTConfig.from_depth(
        3, vocab_size=120, sequence_len=16, aspect_ratio=16, head_dim=16, window_pattern="SL", short_window=4
    )
    model = GPT(config)
    torch.manual_seed(0)
    model.init_weights()
    # Random weights everywhere: at init the blocks are identities (zero output projections), which
    # leaves the residual scalars with pure rounding-noise gradients that Adam would amplify.
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 2:
                p.normal_(0.0, p.size(-1) ** -0.5)
    return model


def make_optimizer(model: GPT) -> MuonAdamW:
    return model.setup_optimizer(
        matrix_lr=0.02, embedding_lr=0.3, unembedding_lr=0.01, scalar_lr=0.5, weight_decay=0.1
    )


def global_batch() -> torch.Tensor:
    return torch.randint(0, 120, (4, 17), generator=torch.Generator().manual_seed(1))


def train(model: GPT, optimizer: MuonAdamW, steps: int, rank: int = 0, world: int = 1) -> None:
    batch = global_batch()
    rows = batch.size(0) // world
    local = batch[rank * rows : (rank + 1) * rows]  # each rank takes its slice of the global batch
    for _ in range(steps):
        half = rows // 2  # two micro-batches: step() must reduce accumulated gradients
        for micro in (local[:half], local[half:]):
            (model(micro[:, :-1], micro[:, 1:]) / 2).backward()
        optimizer.step()
        model.zero_grad(set_to_none=True)


def distributed_worker(rank: int, world: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    try:
        model = make_model()
        optimizer = make_optimizer(model)
        assert optimizer.distributed
        train(model, optimizer, STEPS_BEFORE_SAVE, rank, world)
        if rank == 0:
            torch.save(model.state_dict(), os.path.join(out, "params_saved.pt"))
        state = optimizer.sharded_state_dict()
        with open(os.path.join(out, f"layout_rank{rank}.json"), "w") as f:
            json.dump(
                {
                    "wte_rows": optimizer.state[model.wte.weight]["exp_avg"].size(0),
                    "muon_keys": sorted(k for k in state["state"] if k.startswith("blocks.")),
                },
                f,
            )
        dcp.save(state, checkpoint_id=os.path.join(out, "optimizer"), planner=optimizer_save_planner())
        template = make_optimizer(make_model()).sharded_state_dict()
        needed = optimizer_files_for(template, os.path.join(out, "optimizer"))
        with open(os.path.join(out, f"files_rank{rank}.json"), "w") as f:
            json.dump(sorted(needed), f)
        train(model, optimizer, 1, rank, world)
        if rank == 0:
            torch.save(model.state_dict(), os.path.join(out, "params_next.pt"))

        # Resume the one-process run (saved by the fixture) on these two ranks.
        model = make_model()
        model.load_state_dict(torch.load(os.path.join(out, "world1_params.pt")))
        optimizer = make_optimizer(model)
        state = make_optimizer(make_model()).sharded_state_dict()
        dcp.load(state, checkpoint_id=os.path.join(out, "world1_optimizer"))
        optimizer.load_sharded_state_dict(state)
        train(model, optimizer, 1, rank, world)
        if rank == 0:
            torch.save(model.state_dict(), os.path.join(out, "world1_resumed_on_two.pt"))
    finally:
        dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def two_rank_run(tmp_path_factory) -> str:
    """A one-process run (3 steps, save, 1 step), then the same on two ranks, which also resume the
    one-process checkpoint. Every result lands as a file in the returned directory."""
    out = str(tmp_path_factory.mktemp("two_ranks"))
    model = make_model()
    optimizer = make_optimizer(model)
    train(model, optimizer, STEPS_BEFORE_SAVE)
    torch.save(model.state_dict(), os.path.join(out, "world1_params.pt"))
    with warnings.catch_warnings():  # saving from one process without a process group is intended
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.save(optimizer.sharded_state_dict(), checkpoint_id=os.path.join(out, "world1_optimizer"))
    train(model, optimizer, 1)
    torch.save(model.state_dict(), os.path.join(out, "world1_next.pt"))
    mp.spawn(distributed_worker, args=(2, free_port(), out), nprocs=2, join=True)
    return out


def assert_same_params(actual: dict, expected: dict) -> None:
    """Equal up to rounding. Two ranks sum gradients in another order than one process, and Adam
    divides by the root of the second moment, which turns rounding in small gradients into visible
    differences (as much as 8e-5 after four steps, depending on the CPU's vector kernels). One
    step moves a matrix element by about 2e-3 (median), so a wrong shard or reduction still fails."""
    for name, value in expected.items():
        torch.testing.assert_close(actual[name], value, atol=3e-4, rtol=1e-3, msg=name)


@pytest.mark.slow  # starts two processes (one shared run for these tests)
def test_two_processes_take_the_same_step_as_one(two_rank_run):
    one_rank = torch.load(os.path.join(two_rank_run, "world1_params.pt"))
    two_ranks = torch.load(os.path.join(two_rank_run, "params_saved.pt"))
    assert_same_params(two_ranks, one_rank)
    assert not torch.equal(two_ranks["wte.weight"], make_model().wte.weight)  # it did train
    assert_same_params(
        torch.load(os.path.join(two_rank_run, "params_next.pt")),
        torch.load(os.path.join(two_rank_run, "world1_next.pt")),
    )


@pytest.mark.slow  # starts two processes (one shared run for these tests)
def test_distributed_state_is_sharded_across_ranks(two_rank_run):
    layouts = []
    for rank in (0, 1):
        with open(os.path.join(two_rank_run, f"layout_rank{rank}.json")) as f:
            layouts.append(json.load(f))
    assert [layout["wte_rows"] for layout in layouts] == [64, 64]  # 128 padded rows, half each
    owned = [set(layout["muon_keys"]) for layout in layouts]
    assert not owned[0] & owned[1]
    all_matrices = {n for n, p in make_model().named_parameters() if n.startswith("blocks.")}
    assert owned[0] | owned[1] == all_matrices


@pytest.mark.slow  # starts two processes (one shared run for these tests)
@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")
def test_state_saved_at_two_ranks_resumes_at_one(two_rank_run):
    model = make_model()
    model.load_state_dict(torch.load(os.path.join(two_rank_run, "params_saved.pt")))
    optimizer = make_optimizer(model)
    # Load into a template that shares no storage with `optimizer`, so only the load call restores it.
    state = make_optimizer(make_model()).sharded_state_dict()
    dcp.load(state, checkpoint_id=os.path.join(two_rank_run, "optimizer"))
    optimizer.load_sharded_state_dict(state)
    assert optimizer.steps_taken == STEPS_BEFORE_SAVE
    train(model, optimizer, 1)
    assert_same_params(model.state_dict(), torch.load(os.path.join(two_rank_run, "params_next.pt")))

    # Control: without the restored momentum and moments the next step is measurably different.
    fresh = make_model()
    fresh.load_state_dict(torch.load(os.path.join(two_rank_run, "params_saved.pt")))
    train(fresh, make_optimizer(fresh), 1)
    assert not torch.allclose(fresh.blocks[0].mlp.c_fc.weight, model.blocks[0].mlp.c_fc.weight, atol=1e-4)


@pytest.mark.slow  # starts two processes (one shared run for these tests)
def test_state_saved_at_one_rank_resumes_at_two(two_rank_run):
    resumed = torch.load(os.path.join(two_rank_run, "world1_resumed_on_two.pt"))
    assert_same_params(resumed, torch.load(os.path.join(two_rank_run, "world1_next.pt")))


def test_loading_state_for_a_different_model_is_a_clear_error():
    optimizer = make_optimizer(make_model())
    with pytest.raises(KeyError, match="missing entries"):
        optimizer.load_sharded_state_dict({"steps_taken": 1, "state": {}})
    with pytest.raises(NotImplementedError, match="sharded_state_dict"):
        optimizer.state_dict()


@pytest.mark.parametrize("shape", [(64, 256), (256, 64), (12, 3)])
def test_polar_express_output_is_nearly_orthogonal(shape):
    torch.manual_seed(0)
    G = torch.randn(*shape)
    X = orthogonalize(G)
    singular = torch.linalg.svdvals(X)
    assert singular.min() > 0.8 and singular.max() < 1.2
    U, _, Vh = torch.linalg.svd(G, full_matrices=False)
    polar = U @ Vh
    assert (X * polar).sum() / (X.norm() * polar.norm()) > 0.99
    with pytest.raises(ValueError, match="steps"):
        orthogonalize(G, steps=0)


def test_muon_step_size_scales_with_matrix_shape():
    torch.manual_seed(0)
    for m, n in [(256, 64), (64, 256)]:
        params = torch.zeros(1, m, n)
        grads = torch.randn(1, m, n)
        second = torch.zeros(1, m, 1) if m >= n else torch.zeros(1, 1, n)
        muon_update(
            params,
            grads,
            torch.zeros(1, m, n),
            second,
            lr=0.01,
            momentum=0.95,
            beta2=0.95,
            weight_decay=0.0,
            ns_steps=5,
        )
        # an orthogonal update has Frobenius norm sqrt(min(m, n)); tall matrices step sqrt(m/n) further
        expected = 0.01 * math.sqrt(max(1.0, m / n)) * math.sqrt(min(m, n))
        assert params.norm().item() == pytest.approx(expected, rel=0.1)


def test_cautious_weight_decay_only_shrinks_weights_the_update_agrees_with():
    params = torch.ones(1, 4, 4)
    grads = torch.zeros(1, 4, 4)
    grads[0, :2] = -1.0  # descent direction +: disagrees with the positive weights, so no decay
    grads[0, 2:] = 1.0
    muon_update(
        params,
        grads,
        torch.zeros(1, 4, 4),
        torch.zeros(1, 4, 1),
        lr=0.1,
        momentum=0.0,
        beta2=0.95,
        weight_decay=0.5,
        ns_steps=5,
    )
    grew, shrank = params[0, :2], params[0, 2:]
    assert (grew > 1).all() and (shrank < 1).all()
    # decayed rows moved further than the pure update by lr * wd * weight
    assert (1 - shrank).mean() - (grew - 1).mean() == pytest.approx(0.1 * 0.5, rel=0.05)


def test_optimizer_rejects_malformed_groups():
    a, b = torch.nn.Parameter(torch.zeros(4, 4)), torch.nn.Parameter(torch.zeros(4, 8))
    with pytest.raises(ValueError, match="one shape"):
        MuonAdamW(
            [dict(kind="muon", params=[a, b], lr=0.1, momentum=0.9, beta2=0.9, ns_steps=5, weight_decay=0.0)]
        )
    with pytest.raises(ValueError, match="kind"):
        MuonAdamW([dict(kind="sgd", params=[a], lr=0.1)])


def test_lr_schedule_warms_up_holds_then_decays_linearly():
    lrm = [lr_multiplier(s, 100, warmup_steps=10, warmdown_ratio=0.5, final_lr_frac=0.1) for s in range(101)]
    assert lrm[0] == pytest.approx(0.1) and lrm[9] == 1.0
    assert all(v == 1.0 for v in lrm[10:51])
    assert lrm[75] == pytest.approx(0.55)
    assert lrm[100] == pytest.approx(0.1)
    assert all(a >= b for a, b in zip(lrm[10:-1], lrm[11:], strict=True))
    assert lr_multiplier(500, 100, 0, 0.0, 0.0) == 1.0  # no warmdown: constant
    with pytest.raises(ValueError, match="schedule"):
        lr_multiplier(0, 0, 0, 0.5, 0.0)


def test_muon_momentum_warms_up_then_holds():
    assert muon_momentum(0) == pytest.approx(0.85)
    assert muon_momentum(150) == pytest.approx(0.90)
    assert muon_momentum(300) == pytest.approx(0.95)
    assert muon_momentum(10_000) == pytest.approx(0.95)


@pytest.mark.slow  # shares the two-process run
def test_each_rank_resuming_fetches_only_the_optimizer_files_its_state_is_in(two_rank_run):
    # What load_optimizer downloads from S3 for one rank: DCP's load plan for that rank's template.
    written = sorted(p.name for p in Path(two_rank_run, "optimizer").glob("*.distcp"))
    assert written == ["__0_0.distcp", "__1_0.distcp"]
    files = [set(json.loads(Path(two_rank_run, f"files_rank{r}.json").read_text())) for r in (0, 1)]
    assert files[0] == {"__0_0.distcp"}  # rank 0's own shard and the replicated entries
    assert "__1_0.distcp" in files[1]  # rank 1's shard (and rank 0's file for what is replicated)
