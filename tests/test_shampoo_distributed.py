"""DistributedShampoo in data-parallel mode: 2 and 4 gloo processes on the CPU.

One spawn per world size runs every check (process start-up dominates the cost). Every rank
sees the same full batch, so gradients are identical on all ranks, as after DDP's all-reduce.
"""

from __future__ import annotations

import multiprocessing
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import torch.multiprocessing as mp
from torch import nn

from tierstore.optim.shampoo import DistributedShampoo, NonFiniteFactorError

COMMUNICATION_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
STEPS = 10
SPAWN_TIMEOUT_S = 120


# ---------------------------------------------------------------------- shared by all processes


def _problem():
    gen = torch.Generator().manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(2, 4, 3, padding=1),  # weight (4, 2, 3, 3) merges to a 3-D block (4, 6, 3)
        nn.Tanh(),
        nn.Flatten(),
        nn.Linear(100, 6),  # 13 blocks of at most (6, 8)
        nn.Tanh(),
        nn.Linear(6, 3),
    )
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
    x = torch.randn(16, 2, 5, 5, generator=gen)
    y = torch.randn(16, 3, generator=gen)
    return model, x, y


def _optimizer(model: nn.Module, communication_dtype=torch.float32) -> DistributedShampoo:
    return DistributedShampoo(
        model.parameters(),
        lr=0.02,
        betas=(0.9, 0.99),
        # With the default epsilon (1e-12) the rank-deficient factors amplify any perturbation,
        # the rounding of low-precision communication included, by orders of magnitude.
        epsilon=1e-6,
        momentum=0.5,
        weight_decay=1e-3,
        max_preconditioner_dim=8,
        precondition_frequency=2,
        grafting="adam",
        grafting_beta2=0.999,
        communication_dtype=communication_dtype,
    )


def _train(model, optimizer, x, y, steps):
    for _ in range(steps):
        optimizer.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        optimizer.step()


def _params(model: nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.parameters()]


# ---------------------------------------------------------------------- worker


def _worker(rank: int, world_size: int, tmp: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"file://{tmp}/rendezvous", rank=rank, world_size=world_size
    )
    try:
        results = {"trajectories": {}, "local_blocks": None, "layout": None}
        for dtype in COMMUNICATION_DTYPES:
            model, x, y = _problem()
            optimizer = _optimizer(model, dtype)
            _train(model, optimizer, x, y, STEPS)
            results["trajectories"][str(dtype)] = _params(model)
            if dtype == torch.float32:
                results["layout"] = optimizer.block_layout()
                results["local_blocks"] = {
                    (index, key)
                    for index, state in enumerate(optimizer.state.values())
                    for key in state
                    if key.startswith("block_")
                }
        if world_size == 2:
            results["checkpoint"] = _checkpoint_checks(rank, Path(tmp))
            results["non_finite"] = _non_finite_check()
        torch.save(results, f"{tmp}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def _checkpoint_checks(rank: int, tmp: Path) -> dict[str, bool]:
    model, x, y = _problem()
    optimizer = _optimizer(model)
    _train(model, optimizer, x, y, 20)
    torch.save(optimizer.state_dict(), tmp / f"optim{rank}.pt")
    dcp.save({"optim": optimizer.state_dict()}, checkpoint_id=str(tmp / "dcp"))
    at_step_20 = model.state_dict()
    at_step_20 = {k: v.clone() for k, v in at_step_20.items()}
    _train(model, optimizer, x, y, 10)
    expected = _params(model)

    def continued(load) -> bool:
        fresh, _, _ = _problem()
        fresh.load_state_dict(at_step_20)
        fresh_optimizer = _optimizer(fresh)
        load(fresh_optimizer)
        _train(fresh, fresh_optimizer, x, y, 10)
        return all(torch.equal(a, b) for a, b in zip(_params(fresh), expected))

    def from_file(opt: DistributedShampoo) -> None:
        opt.load_state_dict(torch.load(tmp / f"optim{rank}.pt", weights_only=False))

    def from_dcp(opt: DistributedShampoo) -> None:
        opt.init_state()
        state_dict = {"optim": opt.state_dict()}
        dcp.load(state_dict, checkpoint_id=str(tmp / "dcp"))
        opt.load_state_dict(state_dict["optim"])

    dist.barrier()
    wrong_rank_rejected = False
    try:
        _optimizer(_problem()[0]).load_state_dict(
            torch.load(tmp / f"optim{1 - rank}.pt", weights_only=False)
        )
    except ValueError as error:
        wrong_rank_rejected = "different world size" in str(error)
    return {
        "file": continued(from_file),
        "dcp": continued(from_dcp),
        "wrong_rank_rejected": wrong_rank_rejected,
    }


def _non_finite_check() -> str:
    """Poison a parameter whose blocks rank 1 owns; every rank must raise (none may hang)."""
    model, x, y = _problem()
    optimizer = _optimizer(model)
    _train(model, optimizer, x, y, 1)
    layout = optimizer.block_layout()
    params = list(model.parameters())
    index = next(
        i
        for i in range(len(params))
        if all(b["owner"] == 1 for b in layout if b["param_index"] == i)
    )
    optimizer.zero_grad()
    nn.functional.mse_loss(model(x), y).backward()
    params[index].grad.fill_(float("inf"))
    try:
        optimizer.step()  # step 2: the inverse roots are recomputed
    except NonFiniteFactorError as error:
        return str(error)
    return ""


# ---------------------------------------------------------------------- tests


def _spawn(world_size: int, tmp: Path) -> list[dict]:
    """Run ``_worker`` on ``world_size`` fresh processes; returns each rank's results.

    The processes come from a fork server that imports torch and this module once, which
    saves seconds of start-up per process on a small CI machine (unlike "fork", the server
    is a clean single-threaded process).
    """
    multiprocessing.set_forkserver_preload(["torch", __name__])
    context = mp.start_processes(
        _worker,
        args=(world_size, str(tmp)),
        nprocs=world_size,
        join=False,
        start_method="forkserver",
    )
    try:
        for _ in range(SPAWN_TIMEOUT_S):
            if context.join(timeout=1):
                break
        else:
            pytest.fail(f"{world_size} ranks did not finish in {SPAWN_TIMEOUT_S} s")
    finally:
        for process in context.processes:
            if process.is_alive():
                process.kill()
    return [torch.load(tmp / f"rank{r}.pt", weights_only=False) for r in range(world_size)]


@pytest.fixture(scope="module")
def single_process() -> dict[str, list[torch.Tensor]]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    model, x, y = _problem()
    initial = _params(model)
    optimizer = _optimizer(model)
    _train(model, optimizer, x, y, STEPS)
    torch.set_num_threads(threads)
    return {"initial": initial, "final": _params(model), "layout": optimizer.block_layout()}


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory) -> list[dict]:
    return _spawn(2, tmp_path_factory.mktemp("world2"))


@pytest.fixture(scope="module")
def four_ranks(tmp_path_factory) -> list[dict]:
    return _spawn(4, tmp_path_factory.mktemp("world4"))


@pytest.fixture(params=[2, 4])
def ranks(request) -> list[dict]:
    return request.getfixturevalue("two_ranks" if request.param == 2 else "four_ranks")


def _relative_error(actual: list[torch.Tensor], expected: list[torch.Tensor]) -> float:
    num = sum(((a.double() - e.double()) ** 2).sum() for a, e in zip(actual, expected))
    den = sum((e.double() ** 2).sum() for e in expected)
    return float((num / den).sqrt())


def test_blocks_are_shared_out_and_state_is_kept_only_by_owners(ranks, single_process):
    world_size = len(ranks)
    layout = ranks[0]["layout"]
    assert all(r["layout"] == layout for r in ranks)
    strip = [{k: v for k, v in b.items() if k != "owner"} for b in layout]
    assert strip == [{k: v for k, v in b.items() if k != "owner"} for b in single_process["layout"]]
    assert {b["owner"] for b in layout} == set(range(world_size))  # every rank has work
    for rank, result in enumerate(ranks):
        owned = {(b["param_index"], b["block_id"]) for b in layout if b["owner"] == rank}
        assert result["local_blocks"] == owned


def test_data_parallel_float32_equals_one_process(ranks, single_process):
    for result in ranks:
        final = result["trajectories"][str(torch.float32)]
        assert _relative_error(final, single_process["final"]) <= 1e-6
    moved = _relative_error(single_process["final"], single_process["initial"])
    assert moved > 1e-2  # the comparison is not between two unchanged models


@pytest.mark.parametrize(
    "dtype, unit_roundoff", [(torch.float16, 2.0**-11), (torch.bfloat16, 2.0**-8)]
)
def test_data_parallel_low_precision_communication_within_rounding(
    ranks, single_process, dtype, unit_roundoff
):
    finals = [r["trajectories"][str(dtype)] for r in ranks]
    for final in finals[1:]:  # replicas stay identical whatever the rounding
        assert all(torch.equal(a, b) for a, b in zip(final, finals[0]))
    moved = [f - i for f, i in zip(single_process["final"], single_process["initial"])]
    drift = [a - e for a, e in zip(finals[0], single_process["final"])]
    # Each step's update is rounded once to the communication dtype: the drift stays within
    # a unit roundoff of the total displacement (and is not zero: the rounding does happen).
    ratio = _relative_error([d + m for d, m in zip(drift, moved)], moved)
    assert 0 < ratio <= unit_roundoff, ratio


def test_checkpoints_continue_bit_for_bit(two_ranks):
    for result in two_ranks:
        assert result["checkpoint"] == {"file": True, "dcp": True, "wrong_rank_rejected": True}


def test_non_finite_factor_raises_on_every_rank(two_ranks):
    assert "rank(s) [1]" in two_ranks[0]["non_finite"]
    assert "non-finite" in two_ranks[1]["non_finite"]
    assert "parameter" in two_ranks[1]["non_finite"]
