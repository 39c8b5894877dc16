"""DistributedShampoo on one process: semantics, special cases, errors and checkpoints."""

from __future__ import annotations

import copy
import io
import math

import pytest
import torch
from torch import nn

from tierstore.optim.shampoo import DistributedShampoo, NonFiniteFactorError
from tierstore.optim.shampoo_blocks import assign_owners, layout_param, merge_dims
from tierstore.optim.shampoo_math import accumulate_factors, inverse_root, precondition


pytestmark = pytest.mark.usefixtures("deterministic_single_thread")


def _problem(dtype=torch.float64, seed=0):
    """A small MLP regression problem: (model, x, y)."""
    gen = torch.Generator().manual_seed(seed)
    model = nn.Sequential(nn.Linear(6, 10), nn.Tanh(), nn.Linear(10, 3)).to(dtype)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=dtype) * 0.5)
    x = torch.randn(32, 6, generator=gen, dtype=dtype)
    y = torch.randn(32, 3, generator=gen, dtype=dtype)
    return model, x, y


def _train(model, optimizer, x, y, steps):
    for _ in range(steps):
        optimizer.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        optimizer.step()


# ---------------------------------------------------------------------- blocking and owners


@pytest.mark.parametrize(
    "shape, max_dim, merged",
    [
        ((8, 3, 3, 3), 16, (8, 3, 9)),
        ((64, 20), 1024, (64, 20)),
        ((64, 20), 2048, (1280,)),
        ((1, 256), 1024, (256,)),
        ((5, 1, 288), 16, (5, 288)),
        ((), 4, (1,)),
        ((1, 1), 4, (1,)),
        ((2, 3, 4), 12, (2, 12)),
    ],
)
def test_merge_dims(shape, max_dim, merged):
    assert merge_dims(shape, max_dim) == merged


def test_blocks_are_row_major_and_cover_the_merged_tensor():
    layout = layout_param(3, (5, 40), max_dim=16, first_uid=7)
    assert [b.shape for b in layout.blocks] == [(5, 16), (5, 16), (5, 8)]
    assert [b.offsets for b in layout.blocks] == [(0, 0), (0, 16), (0, 32)]
    assert [b.uid for b in layout.blocks] == [7, 8, 9]
    assert {b.param_index for b in layout.blocks} == {3}

    layout = layout_param(0, (20, 18), max_dim=16, first_uid=0)
    assert [b.shape for b in layout.blocks] == [(16, 16), (16, 2), (4, 16), (4, 2)]
    marker = torch.zeros(20, 18)
    for block in layout.blocks:
        block.view(marker).add_(1.0)
    assert torch.equal(marker, torch.ones(20, 18))


def test_assign_owners_greedy_largest_first_to_least_loaded():
    # 9 -> r0; 7 -> r1; 5 -> r1 (7 < 9); 4 -> r0 (9 < 12); 3 -> r1 (12 < 13)
    owners = assign_owners([5.0, 9.0, 3.0, 7.0, 4.0], world_size=2)
    assert owners == [1, 0, 1, 1, 0]
    loads = [sum(c for c, o in zip([5.0, 9.0, 3.0, 7.0, 4.0], owners) if o == r) for r in (0, 1)]
    assert loads == [13.0, 15.0]
    assert assign_owners([1.0, 1.0, 1.0], world_size=4) == [0, 1, 2]


# ---------------------------------------------------------------------- kernels


def test_factor_accumulation_and_preconditioning_of_an_order_3_block():
    gen = torch.Generator().manual_seed(1)
    g = torch.randn(3, 4, 5, generator=gen, dtype=torch.float64)
    factors = [torch.eye(d, dtype=torch.float64) for d in g.shape]
    accumulate_factors(factors, g, beta2=0.75)
    expected = [
        torch.einsum("ajk,bjk->ab", g, g),
        torch.einsum("iak,ibk->ab", g, g),
        torch.einsum("ija,ijb->ab", g, g),
    ]
    for factor, contraction, d in zip(factors, expected, g.shape):
        expected = 0.75 * torch.eye(d, dtype=torch.float64) + 0.25 * contraction
        torch.testing.assert_close(factor, expected)

    mats = [torch.randn(d, d, generator=gen, dtype=torch.float64) for d in g.shape]
    mats = [m + m.T for m in mats]
    torch.testing.assert_close(
        precondition(g, mats), torch.einsum("ijk,ia,jb,kc->abc", g, *mats)
    )


@pytest.mark.parametrize("shape", [(5, 7), (131, 6), (6, 131)])
def test_factor_accumulation_of_a_matrix_block(shape):
    # (131, 6) and (6, 131) take the split Gram-matrix path for their 131 x 131 factor.
    gen = torch.Generator().manual_seed(5)
    g = torch.randn(shape, generator=gen, dtype=torch.float64)
    start = [torch.randn(d, d, generator=gen, dtype=torch.float64) for d in shape]
    start = [s + s.T for s in start]  # exactly symmetric
    factors = [s.clone() for s in start]
    accumulate_factors(factors, g, beta2=0.9)
    torch.testing.assert_close(factors[0], 0.9 * start[0] + 0.1 * g @ g.T)
    torch.testing.assert_close(factors[1], 0.9 * start[1] + 0.1 * g.T @ g)
    accumulate_factors(factors, g, beta2=1.0)
    torch.testing.assert_close(factors[0], 0.9 * start[0] + 1.1 * g @ g.T)


def test_inverse_root_of_a_positive_definite_matrix():
    gen = torch.Generator().manual_seed(2)
    a = torch.randn(6, 6, generator=gen, dtype=torch.float64)
    factor = a @ a.T + 0.1 * torch.eye(6, dtype=torch.float64)
    x = inverse_root(factor, root=4, epsilon=1e-3)
    torch.testing.assert_close(
        torch.linalg.matrix_power(x, -4), factor + 1e-3 * torch.eye(6, dtype=torch.float64)
    )


def test_inverse_root_shifts_a_spectrum_below_epsilon_up_to_epsilon():
    factor = torch.diag(torch.tensor([4.0, 1.0, -2.0], dtype=torch.float64))
    x = inverse_root(factor, root=2, epsilon=0.5)
    # eigenvalues of factor + eps I: 4.5, 1.5, -1.5; shifted by 2: 6.5, 3.5, 0.5
    torch.testing.assert_close(
        torch.diag(x), torch.tensor([6.5, 3.5, 0.5], dtype=torch.float64) ** -0.5
    )


def test_inverse_root_of_a_rank_deficient_float32_factor_is_finite():
    # Rounding leaves eigenvalues around -1e-4 here, far below epsilon = 1e-12: the shift
    # must not lose epsilon (-1e-4 + (1e-12 + 1e-4) is exactly 0 in float32).
    g = torch.randn(4, 64, generator=torch.Generator().manual_seed(0)) * 10
    x = inverse_root(g.T @ g, root=4, epsilon=1e-12)
    assert torch.isfinite(x).all()
    assert torch.linalg.eigvalsh(x.double()).max() == pytest.approx(1e3, rel=1e-2)


# ---------------------------------------------------------------------- whole-step semantics


def _naive_shampoo(params, grads_at, steps, hp):
    """Straightforward restatement of the semantics for 1-D and 2-D parameters (one block)."""
    params = [p.clone() for p in params]
    b1, b2 = hp["betas"]
    state = []
    for p in params:
        dims = list(p.shape)
        state.append(
            {
                "factors": [torch.zeros(d, d, dtype=p.dtype) for d in dims],
                "roots": [torch.eye(d, dtype=p.dtype) for d in dims],
                "sq": torch.zeros_like(p),
                "m": torch.zeros_like(p),
                "mom": torch.zeros_like(p),
            }
        )
    for t in range(1, steps + 1):
        grads = grads_at(params)
        for p, g, s in zip(params, grads, state):
            if not hp["use_decoupled_weight_decay"]:
                g = g + hp["weight_decay"] * p
            contractions = [g.outer(g)] if g.dim() == 1 else [g @ g.T, g.T @ g]
            s["factors"] = [b2 * f + (1 - b2) * c for f, c in zip(s["factors"], contractions)]
            gb2 = hp["grafting_beta2"]
            s["sq"] = gb2 * s["sq"] + (1 - gb2) * g * g
            if t % hp["precondition_frequency"] == 0:
                root = hp["exponent_override"] or 2 * g.dim()
                bc2 = 1 - b2**t if hp["use_bias_correction"] else 1.0
                for i, f in enumerate(s["factors"]):
                    vals, vecs = torch.linalg.eigh(f / bc2 + hp["epsilon"] * torch.eye(len(f)))
                    s["roots"][i] = vecs @ torch.diag(vals ** (-1 / root)) @ vecs.T
            s["m"] = b1 * s["m"] + (1 - b1) * g
            fg = s["m"] / (1 - b1**t) if hp["use_bias_correction"] else s["m"]
            gbc = 1 - gb2**t if hp["grafting"] == "adam" else 1.0
            graft_dir = fg / ((s["sq"] / gbc).sqrt() + hp["grafting_epsilon"])
            if t < hp["start_preconditioning_step"]:
                direction = graft_dir
            else:
                if g.dim() == 1:
                    direction = s["roots"][0] @ fg
                else:
                    direction = s["roots"][0] @ fg @ s["roots"][1]
                direction = direction * graft_dir.norm() / direction.norm()
            if hp["use_decoupled_weight_decay"]:
                direction = direction + hp["weight_decay"] * p
            s["mom"] = hp["momentum"] * s["mom"] + direction
            if hp["use_nesterov"]:
                direction = direction + hp["momentum"] * s["mom"]
            else:
                direction = s["mom"]
            p -= hp["lr"] * direction
    return params


NAIVE_CASES = [
    dict(
        lr=0.05, betas=(0.8, 0.95), epsilon=1e-6, momentum=0.5, use_nesterov=True,
        weight_decay=0.01, use_decoupled_weight_decay=True, precondition_frequency=2,
        start_preconditioning_step=4, use_bias_correction=True, grafting="adam",
        grafting_epsilon=1e-8, grafting_beta2=0.9, exponent_override=None,
    ),
    dict(
        lr=0.02, betas=(0.5, 0.9), epsilon=1e-4, momentum=0.3, use_nesterov=False,
        weight_decay=0.05, use_decoupled_weight_decay=False, precondition_frequency=3,
        start_preconditioning_step=3, use_bias_correction=False, grafting="rmsprop",
        grafting_epsilon=1e-6, grafting_beta2=0.7, exponent_override=3,
    ),
]


@pytest.mark.parametrize("hp", NAIVE_CASES)
def test_steps_follow_the_written_semantics(hp):
    gen = torch.Generator().manual_seed(3)
    w = torch.randn(5, 4, generator=gen, dtype=torch.float64)
    b = torch.randn(5, generator=gen, dtype=torch.float64)
    x = torch.randn(16, 4, generator=gen, dtype=torch.float64)
    y = torch.randn(16, 5, generator=gen, dtype=torch.float64)

    def grads_at(params):
        params = [p.detach().requires_grad_() for p in params]
        loss = ((x @ params[0].T + params[1] - y) ** 2).mean()
        return torch.autograd.grad(loss, params)

    expected = _naive_shampoo([w, b], grads_at, 8, hp)

    params = [w.clone().requires_grad_(), b.clone().requires_grad_()]
    # max_preconditioner_dim=5 keeps w a (5, 4) matrix (20 elements would otherwise merge).
    optimizer = DistributedShampoo(
        params, factor_dtype=torch.float64, max_preconditioner_dim=5, **hp
    )
    for _ in range(8):
        for p, g in zip(params, grads_at(params)):
            p.grad = g
        optimizer.step()
    for actual, want in zip(params, expected):
        # rank-deficient factors amplify rounding to ~1e-9; a semantic slip shows up at ~1e-2
        torch.testing.assert_close(actual.detach(), want, rtol=1e-8, atol=1e-10)
    assert not torch.allclose(params[0].detach(), w, atol=1e-3)


def test_one_step_without_grafting_is_the_kronecker_preconditioned_gradient():
    gen = torch.Generator().manual_seed(4)
    w0 = torch.randn(4, 3, generator=gen, dtype=torch.float64)
    g = torch.randn(4, 3, generator=gen, dtype=torch.float64)
    w = w0.clone().requires_grad_()
    w.grad = g.clone()
    DistributedShampoo(
        [w], lr=0.1, betas=(0.0, 1.0), epsilon=1e-3, max_preconditioner_dim=4,
        factor_dtype=torch.float64,
    ).step()

    def power(a, exponent):
        vals, vecs = torch.linalg.eigh(a + 1e-3 * torch.eye(len(a), dtype=a.dtype))
        return vecs @ torch.diag(vals**exponent) @ vecs.T

    expected = w0 - 0.1 * power(g @ g.T, -0.25) @ g @ power(g.T @ g, -0.25)
    torch.testing.assert_close(w.detach(), expected, rtol=1e-10, atol=1e-12)


# ---------------------------------------------------------------------- grafting equivalences


def _never_preconditioned(**kwargs):
    return dict(precondition_frequency=5, start_preconditioning_step=10**9, **kwargs)


EQUIVALENT = {
    "adagrad": (
        lambda p: torch.optim.Adagrad(p, lr=0.1, eps=1e-10, weight_decay=0.01, foreach=False),
        _never_preconditioned(
            lr=0.1, betas=(0.0, 1.0), grafting="adagrad", grafting_epsilon=1e-10,
            weight_decay=0.01, use_decoupled_weight_decay=False,
        ),
    ),
    "adam": (
        lambda p: torch.optim.Adam(p, lr=0.01, betas=(0.9, 0.99), eps=1e-8, foreach=False),
        _never_preconditioned(
            lr=0.01, betas=(0.9, 1.0), grafting="adam", grafting_beta2=0.99, grafting_epsilon=1e-8
        ),
    ),
    "adam_l2": (
        lambda p: torch.optim.Adam(p, lr=0.01, eps=1e-8, weight_decay=0.1, foreach=False),
        _never_preconditioned(
            lr=0.01, betas=(0.9, 1.0), grafting="adam", grafting_beta2=0.999,
            grafting_epsilon=1e-8, weight_decay=0.1, use_decoupled_weight_decay=False,
        ),
    ),
    "adamw": (
        lambda p: torch.optim.AdamW(p, lr=0.01, eps=1e-8, weight_decay=0.1, foreach=False),
        _never_preconditioned(
            lr=0.01, betas=(0.9, 1.0), grafting="adam", grafting_beta2=0.999,
            grafting_epsilon=1e-8, weight_decay=0.1,
        ),
    ),
    "rmsprop_momentum": (
        lambda p: torch.optim.RMSprop(p, lr=0.01, alpha=0.9, eps=1e-8, momentum=0.5, foreach=False),
        _never_preconditioned(
            lr=0.01, betas=(0.0, 1.0), grafting="rmsprop", grafting_beta2=0.9,
            grafting_epsilon=1e-8, momentum=0.5,
        ),
    ),
    "sgd_nesterov_l2": (
        lambda p: torch.optim.SGD(
            p, lr=0.05, momentum=0.9, nesterov=True, weight_decay=1e-3, foreach=False
        ),
        _never_preconditioned(
            lr=0.05, betas=(0.0, 1.0), grafting="sgd", momentum=0.9, use_nesterov=True,
            weight_decay=1e-3, use_decoupled_weight_decay=False,
        ),
    ),
    "sgd_momentum_no_grafting": (
        lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.5, foreach=False),
        _never_preconditioned(lr=0.05, betas=(0.0, 1.0), grafting=None, momentum=0.5),
    ),
}


@pytest.mark.parametrize("name", sorted(EQUIVALENT))
def test_without_preconditioning_equals_the_grafting_method(name):
    make_torch, shampoo_kwargs = EQUIVALENT[name]
    model_a, x, y = _problem()
    model_b = copy.deepcopy(model_a)
    initial = [p.detach().clone() for p in model_a.parameters()]
    _train(model_a, make_torch(model_a.parameters()), x, y, steps=15)
    _train(model_b, DistributedShampoo(model_b.parameters(), **shampoo_kwargs), x, y, steps=15)
    for a, b, p0 in zip(model_a.parameters(), model_b.parameters(), initial):
        torch.testing.assert_close(b, a, rtol=1e-10, atol=1e-12)
        assert (a - p0).abs().max() > 1e-3


def test_preconditioning_changes_the_trajectory():
    """Guard for the equivalence tests: with preconditioning on, the result must differ."""
    make_torch, kwargs = EQUIVALENT["adagrad"]
    kwargs = dict(kwargs, precondition_frequency=1, start_preconditioning_step=1)
    model_a, x, y = _problem()
    model_b = copy.deepcopy(model_a)
    _train(model_a, make_torch(model_a.parameters()), x, y, steps=5)
    _train(model_b, DistributedShampoo(model_b.parameters(), **kwargs), x, y, steps=5)
    assert not torch.allclose(model_a[0].weight, model_b[0].weight, atol=1e-4)


# ---------------------------------------------------------------------- param groups and state


def test_param_groups_keep_their_own_hyper_parameters():
    model, x, y = _problem()
    frozen = model[2].weight.detach().clone()
    optimizer = DistributedShampoo(
        [
            {"params": [model[0].weight, model[0].bias], "max_preconditioner_dim": 4},
            {"params": [model[2].weight, model[2].bias], "lr": 0.0},
        ],
        lr=0.1,
    )
    layout = optimizer.block_layout()
    assert [b["block_shape"] for b in layout if b["param_index"] == 0] == [
        [4, 4], [4, 2], [4, 4], [4, 2], [2, 4], [2, 2]
    ]
    assert optimizer.param_groups[1]["max_preconditioner_dim"] == 1024
    assert {b["owner"] for b in layout} == {0}
    _train(model, optimizer, x, y, steps=3)
    assert torch.equal(model[2].weight, frozen)
    assert int(optimizer.state[model[0].weight]["step"]) == 3


def test_parameters_without_gradient_are_left_alone():
    model, x, y = _problem()
    model[0].bias.requires_grad_(False)
    before = model[0].bias.detach().clone()
    optimizer = DistributedShampoo(model.parameters(), lr=0.1)
    _train(model, optimizer, x, y, steps=2)
    assert torch.equal(model[0].bias, before)
    assert model[0].bias not in optimizer.state


def test_closure_loss_is_returned():
    model, x, y = _problem()
    optimizer = DistributedShampoo(model.parameters())

    def closure():
        optimizer.zero_grad()
        loss = nn.functional.mse_loss(model(x), y)
        loss.backward()
        return loss

    with torch.no_grad():
        before = nn.functional.mse_loss(model(x), y)
    assert torch.equal(optimizer.step(closure), before)
    with torch.no_grad():
        assert nn.functional.mse_loss(model(x), y) < before  # and the step was taken


def _checkpoint_setup(dtype=torch.float32):
    model, x, y = _problem(dtype=dtype)
    kwargs = dict(
        lr=0.02, betas=(0.9, 0.99), momentum=0.5, weight_decay=1e-3, precondition_frequency=3,
        start_preconditioning_step=6, grafting="adam", grafting_beta2=0.999,
        max_preconditioner_dim=4, factor_dtype=torch.float64,
    )
    return model, x, y, kwargs


def test_state_dict_round_trip_continues_bit_for_bit():
    model, x, y, kwargs = _checkpoint_setup()
    optimizer = DistributedShampoo(model.parameters(), **kwargs)
    _train(model, optimizer, x, y, steps=20)

    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "optim": optimizer.state_dict()}, buffer)
    block = optimizer.state[model[0].weight]["block_0"]
    assert block["factor_0"].dtype == torch.float64  # differs from the parameter's dtype
    assert block["filtered_grad"].dtype == torch.float32

    restored_model = copy.deepcopy(model)
    with torch.no_grad():
        for p in restored_model.parameters():
            p.zero_()
    restored = DistributedShampoo(restored_model.parameters(), **kwargs)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=False)
    restored_model.load_state_dict(saved["model"])
    restored.load_state_dict(saved["optim"])
    _assert_same_state(restored.state_dict(), optimizer.state_dict())

    _train(model, optimizer, x, y, steps=10)
    _train(restored_model, restored, x, y, steps=10)
    for a, b in zip(model.parameters(), restored_model.parameters()):
        assert torch.equal(a, b)
    _assert_same_state(restored.state_dict(), optimizer.state_dict())


def test_init_state_changes_nothing():
    model, x, y, kwargs = _checkpoint_setup()
    other = copy.deepcopy(model)
    eager = DistributedShampoo(other.parameters(), **kwargs)
    eager.init_state()
    assert set(eager.state[other[0].weight]) == {"step"} | {f"block_{i}" for i in range(6)}
    _train(model, DistributedShampoo(model.parameters(), **kwargs), x, y, steps=7)
    _train(other, eager, x, y, steps=7)
    for a, b in zip(model.parameters(), other.parameters()):
        assert torch.equal(a, b)


def _assert_same_state(a, b):
    assert a["param_groups"] == b["param_groups"]
    assert a["state"].keys() == b["state"].keys()
    for index in a["state"]:
        sa, sb = a["state"][index], b["state"][index]
        assert sa.keys() == sb.keys()
        assert torch.equal(sa["step"], sb["step"])
        for key in sa:
            if key.startswith("block_"):
                assert sa[key].keys() == sb[key].keys()
                for name in sa[key]:
                    assert sa[key][name].dtype == sb[key][name].dtype
                    assert torch.equal(sa[key][name], sb[key][name]), (index, key, name)


# ---------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(lr=-0.1), "lr"),
        (
            dict(precondition_frequency=10, start_preconditioning_step=5),
            "start_preconditioning_step",
        ),
        (dict(start_preconditioning_step=0), "start_preconditioning_step"),
        (dict(grafting="adamw"), "grafting"),
        (dict(grafting="adagrad", grafting_beta2=0.9), "grafting_beta2"),
        (dict(grafting_epsilon=0.0), "grafting_epsilon"),
        (dict(betas=(1.0, 1.0)), "betas"),
        (dict(betas=(0.9, 0.0)), "betas"),
        (dict(epsilon=0.0), "epsilon"),
        (dict(momentum=-0.5), "momentum"),
        (dict(use_nesterov=True), "nesterov"),
        (dict(weight_decay=-1.0), "weight_decay"),
        (dict(max_preconditioner_dim=0), "max_preconditioner_dim"),
        (dict(precondition_frequency=2.5), "precondition_frequency"),
        (dict(exponent_override=-2), "exponent_override"),
        (dict(factor_dtype=torch.int32), "factor_dtype"),
        (dict(communication_dtype=torch.int8), "communication_dtype"),
    ],
)
def test_bad_hyper_parameters_raise_at_construction(kwargs, message):
    with pytest.raises(ValueError, match=message):
        DistributedShampoo([nn.Parameter(torch.zeros(3))], **kwargs)


def test_bad_param_group_is_rejected_and_not_added():
    optimizer = DistributedShampoo([nn.Parameter(torch.zeros(3))])
    with pytest.raises(ValueError, match="lr"):
        optimizer.add_param_group({"params": [nn.Parameter(torch.zeros(2))], "lr": -1.0})
    assert len(optimizer.param_groups) == 1


def test_default_start_is_the_precondition_frequency():
    optimizer = DistributedShampoo([nn.Parameter(torch.zeros(3))], precondition_frequency=7)
    assert optimizer.param_groups[0]["start_preconditioning_step"] == 7


@pytest.mark.parametrize("bad", [math.inf, math.nan])
def test_non_finite_factor_raises_at_the_step_that_finds_it(bad):
    w = nn.Parameter(torch.ones(3, 2))
    optimizer = DistributedShampoo([w], precondition_frequency=1, grafting="adagrad")
    w.grad = torch.full((3, 2), 0.1)
    optimizer.step()
    before = w.detach().clone()
    w.grad[1, 1] = bad
    with pytest.raises(NonFiniteFactorError, match=r"parameter 0 .*block_0.*step 2.*factor 0"):
        optimizer.step()
    assert torch.equal(w.detach(), before)  # the failing step does not touch the parameters


def test_non_finite_factor_is_found_by_the_next_recomputation():
    w = nn.Parameter(torch.ones(4))
    optimizer = DistributedShampoo([w], precondition_frequency=3, grafting="adagrad")
    for step in (1, 2):
        w.grad = torch.full((4,), 0.1)
        if step == 2:
            w.grad[0] = math.inf  # poisons the factor, but nothing inverts it yet
        optimizer.step()
    w.grad = torch.full((4,), 0.1)
    with pytest.raises(NonFiniteFactorError, match="step 3"):
        optimizer.step()
