"""DistributedShampoo against the reference implementation's trajectories.

The data (initial parameters, inputs, targets) and the reference's loss trajectories and final
parameters are in ../shared/reference/shampoo (see its README for the loop and the settings).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

import tierstore.optim.shampoo as shampoo_module
from tierstore.optim.shampoo import DistributedShampoo

REFERENCE = Path(__file__).resolve().parents[1] / ".." / "shared" / "reference" / "shampoo"
SCENARIOS = ("PRIMARY_mlp_fp32", "mlp_fp64", "tinyconv_fp64_dim16")
LAYOUT_KEYS = ("param_index", "block_id", "param_shape", "block_shape")


class Mlp(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(20, 64)
        self.fc2 = nn.Linear(64, 32)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.tanh(self.fc1(x)))


class TinyConv(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.fc = nn.Linear(288, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.tanh(self.conv(x)).flatten(1))


@pytest.fixture(scope="module")
def reference() -> tuple[dict, dict]:
    problems = torch.load(REFERENCE / "problems.pt", weights_only=False)
    scenarios = json.loads((REFERENCE / "trajectories.json").read_text())["scenarios"]
    return problems, scenarios


pytestmark = pytest.mark.usefixtures("deterministic_single_thread")


def _dtype(name: str) -> torch.dtype:
    return getattr(torch, name.removeprefix("torch."))


def _run(problem: dict, scenario: dict, lr: float = 1e-2):
    """The README's loop; returns (losses before each step, final loss, model, optimizer)."""
    dtype = _dtype(scenario["dtype"])
    model = (Mlp() if scenario["problem"] == "mlp20_64_32" else TinyConv()).to(dtype)
    with torch.no_grad():
        for name, param in model.named_parameters():
            param.copy_(problem["init"][name])
    group = scenario["resolved_param_group"]
    optimizer = DistributedShampoo(
        model.parameters(),
        lr=lr,
        betas=(0.9, 1.0),
        epsilon=float(group["epsilon"]),
        precondition_frequency=int(group["precondition_frequency"]),
        start_preconditioning_step=int(group["start_preconditioning_step"]),
        max_preconditioner_dim=int(group["max_preconditioner_dim"]),
        use_bias_correction=group["use_bias_correction"] == "True",
        grafting="adagrad",
        grafting_epsilon=1e-10,
        factor_dtype=dtype,
    )
    loss_fn = nn.MSELoss()
    losses = []
    for _ in range(scenario["num_steps"]):
        optimizer.zero_grad()
        loss = loss_fn(model(problem["x"]), problem["y"])
        loss.backward()
        losses.append(loss.item())
        optimizer.step()
    with torch.no_grad():
        final = loss_fn(model(problem["x"]), problem["y"]).item()
    return torch.tensor(losses, dtype=torch.float64), final, model, optimizer


def _relative_loss_errors(losses: torch.Tensor, final: float, scenario: dict) -> torch.Tensor:
    expected = torch.tensor(scenario["losses_before_each_step"] + [scenario["final_loss"]])
    actual = torch.cat([losses, torch.tensor([final], dtype=torch.float64)])
    return (actual - expected).abs() / expected.abs()


def _relative_param_errors(model: nn.Module, scenario: dict) -> dict[str, float]:
    errors = {}
    for name, param in model.named_parameters():
        expected = torch.tensor(scenario["final_params"][name], dtype=torch.float64)
        expected = expected.reshape(param.shape)
        errors[name] = ((param.double() - expected).norm() / expected.norm()).item()
    return errors


def _scenario_hyper_parameters_are_the_ones_mapped(scenario: dict) -> None:
    group = scenario["resolved_param_group"]
    assert group["lr"] == "0.01" and group["betas"] == "(0.9, 1.0)"
    assert group["beta3"] == "0.9" and group["weight_decay"] == "0.0"
    assert group["grafting_config"] == "AdaGradPreconditionerConfig(epsilon=1e-10)"
    assert "DECOUPLED" in group["weight_decay_type"]


@pytest.mark.parametrize("name", SCENARIOS)
def test_block_layout_matches_reference(reference, name):
    problems, scenarios = reference
    scenario = scenarios[name]
    model = Mlp() if scenario["problem"] == "mlp20_64_32" else TinyConv()
    optimizer = DistributedShampoo(
        model.parameters(),
        max_preconditioner_dim=int(scenario["resolved_param_group"]["max_preconditioner_dim"]),
    )
    layout = [{k: block[k] for k in LAYOUT_KEYS} for block in optimizer.block_layout()]
    assert layout == scenario["block_layout"]


@pytest.mark.parametrize("name", SCENARIOS)
def test_trajectory_matches_reference(reference, name):
    problems, scenarios = reference
    scenario = scenarios[name]
    _scenario_hyper_parameters_are_the_ones_mapped(scenario)
    losses, final, model, _ = _run(problems[name], scenario)

    errors = _relative_loss_errors(losses, final, scenario)
    if scenario["dtype"] == "torch.float64":
        assert errors.max() <= 1e-6, errors
        for param_name, error in _relative_param_errors(model, scenario).items():
            if param_name.endswith("weight"):
                assert error <= 1e-5, (param_name, error)
    else:
        assert errors.max() <= 1e-3, errors
    # A different algorithm would not stay this close: the loss falls by more than 10x.
    assert final < 0.1 * losses[0]


@pytest.mark.parametrize("name", ["mlp_fp64", "tinyconv_fp64_dim16"])
def test_float64_trajectory_tight_when_emulating_float32_scalars(reference, name, monkeypatch):
    """The reference keeps lr and the bias corrections as float32 scalars; emulating that
    leaves only rounding-level differences, which shows the algorithm is the same one."""
    problems, scenarios = reference
    scenario = scenarios[name]

    def float32_bias_correction(beta: float, step: int) -> float:
        if beta >= 1.0:
            return 1.0
        beta32 = torch.tensor(beta, dtype=torch.float32)
        return float(1.0 - beta32 ** torch.tensor(float(step)))

    monkeypatch.setattr(shampoo_module, "_bias_correction", float32_bias_correction)
    lr32 = float(torch.tensor(1e-2, dtype=torch.float32))
    losses, final, model, _ = _run(problems[name], scenario, lr=lr32)

    assert _relative_loss_errors(losses, final, scenario).max() <= 1e-7
    for param_name, error in _relative_param_errors(model, scenario).items():
        if param_name.endswith("weight"):
            assert error <= 1e-8, (param_name, error)
