"""Distributed Shampoo (Shi et al., 2023): block-diagonal Kronecker-factored AdaGrad.

What one step does, for every block of every parameter that has a gradient (``t`` is the
parameter's step count, starting at 1; see ``shampoo_blocks`` for how blocks are cut):

1. ``g`` is the block of the gradient, plus ``weight_decay * w`` when weight decay is coupled (L2).
2. Every Kronecker factor accumulates ``g`` (``shampoo_math.accumulate_factors``, with
   ``beta2 = betas[1]``), and so does the grafting method's second moment, if it has one.
3. Every ``precondition_frequency`` steps each factor ``F`` is replaced in the preconditioner by
   ``(F / (1 - beta2^t) + epsilon I)^(-1/r)`` (bias correction only with
   ``use_bias_correction`` and ``beta2 < 1``; ``r = 2 * order`` of the block, or
   ``exponent_override``). The inverse roots are the identity until the first recomputation.
4. The gradient is filtered: ``m = beta1 m + (1 - beta1) g`` and, with ``use_bias_correction``,
   divided by ``1 - beta1^t`` (no filtering when ``beta1 == 0``).
5. Before ``start_preconditioning_step`` the direction is the grafting method's direction of the
   filtered gradient (plain filtered gradient for ``grafting=None`` or ``"sgd"``). From then on it
   is the filtered gradient multiplied along each dimension by that dimension's inverse root,
   rescaled per block to the norm of the grafting direction (when ``grafting`` is set).
6. Decoupled weight decay adds ``weight_decay * w``; momentum ``mu`` keeps
   ``M = mu M + P`` and uses ``P = M`` (or ``P + mu M`` with Nesterov); then ``w -= lr * P``.

Data parallelism: when a process group is given (or torch.distributed is initialised with more
than one rank), every block has one owner rank (greedy balance of the blocks' costs). Only the
owner keeps the block's state and computes its direction; the directions are all-gathered in
``communication_dtype`` and every rank applies all of them, so parameters stay identical on all
ranks. Gradients must already be identical on all ranks (e.g. averaged by DDP) and the same
parameters must have gradients on all ranks.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Optional

import torch
import torch.distributed as dist

from tierstore.optim.shampoo_blocks import Block, ParamLayout, assign_owners, layout_param
from tierstore.optim.shampoo_comm import DirectionExchange
from tierstore.optim.shampoo_math import (
    GRAFTING_METHODS,
    NonFiniteFactorError,
    accumulate_factors,
    accumulate_squares,
    diagonal_direction,
    graft,
    inverse_root,
    precondition,
)

__all__ = ["DistributedShampoo", "NonFiniteFactorError"]

_COMMUNICATION_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


@dataclass(frozen=True)
class _Plan:
    """Everything derived from the parameter shapes and the process group."""

    layouts: dict[torch.Tensor, ParamLayout]  # keyed by parameter (tensors hash by identity)
    owners: list[int]  # owner rank of each block, by block uid
    rank: int
    exchange: Optional[DirectionExchange]

    def owns(self, block: Block) -> bool:
        return self.owners[block.uid] == self.rank


class DistributedShampoo(torch.optim.Optimizer):
    """Shampoo with per-block Kronecker factors, grafting and optional data parallelism.

    Args:
        params: parameters or param groups; every hyper-parameter below except
            ``process_group`` and ``communication_dtype`` may be set per group.
        lr: learning rate (>= 0).
        betas: ``(beta1, beta2)``; beta1 in [0, 1) filters the gradient, beta2 in (0, 1] weighs
            the factors (1: plain sums, as AdaGrad).
        epsilon: added to each factor's diagonal before its inverse root (> 0).
        momentum: heavy-ball momentum in [0, 1); ``use_nesterov`` selects Nesterov's variant.
        weight_decay: >= 0; decoupled (added to the direction, as AdamW) when
            ``use_decoupled_weight_decay``, else L2 (added to the gradient).
        max_preconditioner_dim: largest factor dimension; parameters are merged and blocked to it.
        precondition_frequency: steps between inverse-root recomputations (>= 1).
        start_preconditioning_step: first step that uses the Shampoo direction; -1 means
            ``precondition_frequency``; must be >= ``precondition_frequency``.
        use_bias_correction: divide the filtered gradient by ``1 - beta1^t`` and the factors by
            ``1 - beta2^t`` (the latter only when beta2 < 1).
        grafting: None, "sgd", "adagrad", "rmsprop" or "adam"; the per-block step-size source and
            the method used before preconditioning starts.
        grafting_epsilon: the grafting method's epsilon (> 0).
        grafting_beta2: second-moment EMA of "rmsprop"/"adam" in (0, 1] (1: sums); "adam" also
            bias-corrects it. Must be 1 for "adagrad".
        exponent_override: inverse root ``r`` used for every factor instead of ``2 * order``.
        factor_dtype: dtype of the factors, their inverse roots and the preconditioning products.
        process_group: data-parallel group; default: the default group if torch.distributed is
            initialised when the optimizer is built, else none (single-process mode).
        communication_dtype: dtype of the all-gathered directions (float32, float16, bfloat16 or
            float64).

    Raises:
        ValueError: a bad hyper-parameter, at construction (or ``add_param_group``).
        NonFiniteFactorError: at the step whose inverse-root recomputation meets a factor with a
            NaN or an infinity (on every rank in data-parallel mode); parameters are not updated.
    """

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict[str, Any]],
        lr: float = 1e-2,
        betas: tuple[float, float] = (0.9, 1.0),
        epsilon: float = 1e-12,
        momentum: float = 0.0,
        use_nesterov: bool = False,
        weight_decay: float = 0.0,
        use_decoupled_weight_decay: bool = True,
        max_preconditioner_dim: int = 1024,
        precondition_frequency: int = 1,
        start_preconditioning_step: int = -1,
        use_bias_correction: bool = True,
        grafting: Optional[str] = None,
        grafting_epsilon: float = 1e-10,
        grafting_beta2: float = 1.0,
        exponent_override: Optional[float] = None,
        factor_dtype: torch.dtype = torch.float32,
        process_group: Optional[dist.ProcessGroup] = None,
        communication_dtype: torch.dtype = torch.float32,
    ) -> None:
        if communication_dtype not in _COMMUNICATION_DTYPES:
            raise ValueError(
                f"communication_dtype must be one of {_COMMUNICATION_DTYPES}, "
                f"got {communication_dtype}"
            )
        self._process_group = _resolve_process_group(process_group)
        self._communication_dtype = communication_dtype
        self._plan: Optional[_Plan] = None
        defaults = dict(
            lr=lr,
            betas=tuple(betas),
            epsilon=epsilon,
            momentum=momentum,
            use_nesterov=use_nesterov,
            weight_decay=weight_decay,
            use_decoupled_weight_decay=use_decoupled_weight_decay,
            max_preconditioner_dim=max_preconditioner_dim,
            precondition_frequency=precondition_frequency,
            start_preconditioning_step=start_preconditioning_step,
            use_bias_correction=use_bias_correction,
            grafting=grafting,
            grafting_epsilon=grafting_epsilon,
            grafting_beta2=grafting_beta2,
            exponent_override=exponent_override,
            factor_dtype=factor_dtype,
        )
        super().__init__(params, defaults)

    # ------------------------------------------------------------------ param groups and layout

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a group (see ``torch.optim.Optimizer``); validates it, raising ValueError.

        In data-parallel mode add all groups before the first step: adding one re-balances
        the block owners.
        """
        super().add_param_group(param_group)
        try:
            _validate_group(self.param_groups[-1])
        except ValueError:
            self.param_groups.pop()
            raise
        self._plan = None

    def block_layout(self) -> list[dict[str, Any]]:
        """How each parameter is blocked: one dict per block, in parameter then block order.

        Keys: ``param_index`` (over all groups), ``block_id`` (``"block_<i>"``),
        ``param_shape``, ``block_shape`` (lists) and ``owner`` (rank computing the block).
        """
        plan = self._get_plan()
        return [
            {
                "param_index": block.param_index,
                "block_id": block.key,
                "param_shape": list(layout.param_shape),
                "block_shape": list(block.shape),
                "owner": plan.owners[block.uid],
            }
            for layout in plan.layouts.values()
            for block in layout.blocks
        ]

    def _get_plan(self) -> _Plan:
        if self._plan is None:
            self._plan = self._build_plan()
        return self._plan

    def _build_plan(self) -> _Plan:
        layouts: dict[torch.Tensor, ParamLayout] = {}
        costs: list[float] = []
        for group in self.param_groups:
            for param in group["params"]:
                layout = layout_param(
                    len(layouts), param.shape, group["max_preconditioner_dim"], len(costs)
                )
                layouts[param] = layout
                costs.extend(b.cost(group["precondition_frequency"]) for b in layout.blocks)
        pg = self._process_group
        if pg is None or dist.get_world_size(pg) == 1:
            return _Plan(layouts, [0] * len(costs), 0, None)
        if len({p.device for p in layouts}) > 1:
            raise ValueError("data-parallel DistributedShampoo needs all parameters on one device")
        exchange = DirectionExchange(pg, self._communication_dtype)
        return _Plan(layouts, assign_owners(costs, exchange.world_size), exchange.rank, exchange)

    # ------------------------------------------------------------------ state

    def init_state(self) -> None:
        """Create the state of every parameter (this rank's blocks only) if it is missing.

        The state is what the first step would create lazily, so calling this changes nothing
        in the optimisation. Use it to get a complete ``state_dict()`` before the first step,
        e.g. as the template that ``torch.distributed.checkpoint.load`` fills in.
        """
        plan = self._get_plan()
        for group in self.param_groups:
            for param in group["params"]:
                self._param_state(param)
                for block in plan.layouts[param].blocks:
                    if plan.owns(block):
                        self._block_state(param, block, group)

    def _param_state(self, param: torch.Tensor) -> dict[str, Any]:
        state = self.state[param]
        if "step" not in state:
            state["step"] = torch.tensor(0, dtype=torch.int64)
        return state

    def _block_state(
        self, param: torch.Tensor, block: Block, group: dict[str, Any]
    ) -> dict[str, torch.Tensor]:
        state = self.state[param]
        if block.key not in state:
            state[block.key] = _new_block_state(param, block, group)
        return state[block.key]

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a ``state_dict()`` of an optimizer over the same parameters (and ranks).

        Unlike the base class, tensors keep their saved dtype (the factors may be in a dtype
        other than the parameter's), so training continues bit for bit. Raises ValueError when
        the state holds blocks this rank does not own (a different world size or layout).
        """
        saved_state = state_dict["state"]
        super().load_state_dict(state_dict)
        saved_ids = [i for g in state_dict["param_groups"] for i in g["params"]]
        params = [p for g in self.param_groups for p in g["params"]]
        self.state.clear()
        for saved_id, param in zip(saved_ids, params):
            if saved_id in saved_state:
                self.state[param] = _copy_state(saved_state[saved_id], param.device)
        self._plan = None  # the loaded groups may block their parameters differently
        self._check_ownership()

    def _check_ownership(self) -> None:
        plan = self._get_plan()
        for param, state in self.state.items():
            layout = plan.layouts[param]
            local = {b.key for b in layout.blocks if plan.owns(b)}
            held = {key for key in state if key.startswith("block_")}
            started = int(state.get("step", 0)) > 0
            if not held <= local or (started and held != local):
                raise ValueError(
                    f"state of parameter {layout.param_index} holds blocks {sorted(held)} but this "
                    f"rank owns {sorted(local)}: the state_dict comes from a different world size "
                    "or parameter layout"
                )

    # ------------------------------------------------------------------ step

    @torch.no_grad()
    def step(self, closure: Optional[Callable[[], float]] = None) -> Optional[float]:
        """One optimisation step over the parameters that have a gradient."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        plan = self._get_plan()
        active = [
            (group, param)
            for group in self.param_groups
            for param in group["params"]
            if param.grad is not None
        ]
        if not active:
            return loss

        steps = {param: self._advance_step(param) for _, param in active}
        recomputes = any(steps[p] % g["precondition_frequency"] == 0 for g, p in active)
        local: dict[int, torch.Tensor] = {}
        failure: Optional[NonFiniteFactorError] = None
        try:
            for group, param in active:
                self._local_directions(group, param, steps[param], plan, local)
        except NonFiniteFactorError as error:
            if plan.exchange is None:
                raise
            failure = error

        directions = self._exchange(plan, active, local, failure, recomputes)
        for group, param in active:
            _apply_directions(param, plan.layouts[param], directions, group["lr"])
        return loss

    def _advance_step(self, param: torch.Tensor) -> int:
        state = self._param_state(param)
        state["step"] += 1
        return int(state["step"])

    def _exchange(
        self,
        plan: _Plan,
        active: list[tuple[dict[str, Any], torch.Tensor]],
        local: dict[int, torch.Tensor],
        failure: Optional[NonFiniteFactorError],
        recomputes: bool,
    ) -> dict[int, torch.Tensor]:
        """Directions of every active block: local ones, or all-gathered in data-parallel mode."""
        if plan.exchange is None:
            return local
        blocks = [b for _, p in active for b in plan.layouts[p].blocks]
        device = active[0][1].device
        gathered, flags = plan.exchange.exchange(
            blocks, plan.owners, local, failure is not None, device
        )
        if recomputes or failure is not None:
            failed_ranks = [rank for rank, flag in enumerate(flags.tolist()) if flag != 0]
            if failure is not None:
                raise failure
            if failed_ranks:
                raise NonFiniteFactorError(
                    f"rank(s) {failed_ranks} met a non-finite Shampoo factor at this step"
                )
        return gathered

    def _local_directions(
        self,
        group: dict[str, Any],
        param: torch.Tensor,
        step: int,
        plan: _Plan,
        out: dict[int, torch.Tensor],
    ) -> None:
        """Compute the directions of this rank's blocks of ``param`` into ``out`` (by uid)."""
        layout = plan.layouts[param]
        grad = _effective_grad(param, group).reshape(layout.merged_shape)
        weights = param.detach().reshape(layout.merged_shape)
        for block in layout.blocks:
            if plan.owns(block):
                state = self._block_state(param, block, group)
                try:
                    out[block.uid] = _block_direction(
                        state, group, step, block.view(grad), block.view(weights)
                    )
                except NonFiniteFactorError as error:
                    raise NonFiniteFactorError(
                        f"parameter {layout.param_index} (shape {list(layout.param_shape)}), "
                        f"{block.key} (shape {list(block.shape)}), step {step}: {error}"
                    ) from error


# ---------------------------------------------------------------------- per-block computation


def _block_direction(
    state: dict[str, torch.Tensor],
    group: dict[str, Any],
    step: int,
    grad: torch.Tensor,
    weights: torch.Tensor,
) -> torch.Tensor:
    """Update one block's state with its gradient and return its search direction ``P``.

    The result may alias state tensors; callers must only read it.
    """
    beta2 = group["betas"][1]
    accumulate_factors(_factors(state, grad.dim()), grad, beta2)
    if "grafting_sum" in state:
        accumulate_squares(state["grafting_sum"], grad, group["grafting_beta2"])
    if step % group["precondition_frequency"] == 0:
        _recompute_inverse_roots(state, group, step, grad.dim())

    filtered = _filtered_grad(state, group, step, grad)
    if step < group["start_preconditioning_step"]:
        direction = _grafting_direction(state, group, step, filtered)
    else:
        direction = _shampoo_direction(state, filtered)
        if group["grafting"] is not None:
            direction = graft(direction, _grafting_direction(state, group, step, filtered))

    if group["weight_decay"] != 0.0 and group["use_decoupled_weight_decay"]:
        direction = direction.add(weights, alpha=group["weight_decay"])
    if group["momentum"] != 0.0:
        buffer = state["momentum"]
        buffer.mul_(group["momentum"]).add_(direction)
        if group["use_nesterov"]:
            direction = direction.add(buffer, alpha=group["momentum"])
        else:
            direction = buffer
    return direction


def _factors(state: dict[str, torch.Tensor], order: int) -> list[torch.Tensor]:
    return [state[f"factor_{i}"] for i in range(order)]


def _inverse_roots(state: dict[str, torch.Tensor], order: int) -> list[torch.Tensor]:
    return [state[f"inverse_root_{i}"] for i in range(order)]


def _recompute_inverse_roots(
    state: dict[str, torch.Tensor], group: dict[str, Any], step: int, order: int
) -> None:
    beta2 = group["betas"][1]
    correction = _bias_correction(beta2, step) if group["use_bias_correction"] else 1.0
    factors = _factors(state, order)
    root = group["exponent_override"] or 2 * order
    for i, factor in enumerate(factors):
        corrected = factor / correction if correction != 1.0 else factor
        try:
            state[f"inverse_root_{i}"].copy_(inverse_root(corrected, root, group["epsilon"]))
        except NonFiniteFactorError as error:
            raise NonFiniteFactorError(f"factor {i}: {error}") from error


def _filtered_grad(
    state: dict[str, torch.Tensor], group: dict[str, Any], step: int, grad: torch.Tensor
) -> torch.Tensor:
    beta1 = group["betas"][0]
    if beta1 == 0.0:
        return grad
    average = state["filtered_grad"]
    average.lerp_(grad, 1.0 - beta1)
    if not group["use_bias_correction"]:
        return average
    return average / _bias_correction(beta1, step)


def _grafting_direction(
    state: dict[str, torch.Tensor], group: dict[str, Any], step: int, grad: torch.Tensor
) -> torch.Tensor:
    """The grafting method's direction for ``grad`` (``grad`` itself for None/"sgd")."""
    if "grafting_sum" not in state:
        return grad
    beta2 = group["grafting_beta2"]
    correction = _bias_correction(beta2, step) if group["grafting"] == "adam" else 1.0
    return diagonal_direction(grad, state["grafting_sum"], group["grafting_epsilon"], correction)


def _bias_correction(beta: float, step: int) -> float:
    """``1 - beta**step``: the bias correction of an EMA with factor ``beta`` (1 for sums)."""
    return 1.0 - beta**step if beta < 1.0 else 1.0


def _shampoo_direction(state: dict[str, torch.Tensor], grad: torch.Tensor) -> torch.Tensor:
    roots = _inverse_roots(state, grad.dim())
    return precondition(grad.to(roots[0].dtype), roots).to(grad.dtype)


def _new_block_state(
    param: torch.Tensor, block: Block, group: dict[str, Any]
) -> dict[str, torch.Tensor]:
    """Zero factors, identity inverse roots and zero first/second moments for one block."""
    dtype, device = group["factor_dtype"], param.device
    state: dict[str, torch.Tensor] = {}
    for i, d in enumerate(block.shape):
        state[f"factor_{i}"] = torch.zeros(d, d, dtype=dtype, device=device)
        state[f"inverse_root_{i}"] = torch.eye(d, dtype=dtype, device=device)

    def zeros() -> torch.Tensor:
        return torch.zeros(block.shape, dtype=param.dtype, device=device)

    if group["grafting"] in ("adagrad", "rmsprop", "adam"):
        state["grafting_sum"] = zeros()
    if group["betas"][0] != 0.0:
        state["filtered_grad"] = zeros()
    if group["momentum"] != 0.0:
        state["momentum"] = zeros()
    return state


# ---------------------------------------------------------------------- helpers


def _effective_grad(param: torch.Tensor, group: dict[str, Any]) -> torch.Tensor:
    """The gradient, plus the L2 term when weight decay is coupled."""
    grad = param.grad
    if grad.is_sparse:
        raise RuntimeError("DistributedShampoo does not support sparse gradients")
    if group["weight_decay"] != 0.0 and not group["use_decoupled_weight_decay"]:
        grad = grad.add(param, alpha=group["weight_decay"])
    return grad


def _apply_directions(
    param: torch.Tensor, layout: ParamLayout, directions: dict[int, torch.Tensor], lr: float
) -> None:
    """``param -= lr * P`` with ``P`` assembled from the blocks' directions."""
    if len(layout.blocks) == 1:
        full = directions[layout.blocks[0].uid].to(param.dtype)
    else:
        full = torch.empty(layout.merged_shape, dtype=param.dtype, device=param.device)
        for block in layout.blocks:
            block.view(full).copy_(directions[block.uid].view(block.shape))
    param.add_(full.reshape(param.shape), alpha=-lr)


def _copy_state(value: Any, device: torch.device) -> Any:
    """Deep copy of saved state with tensors on ``device`` (step counters stay on the CPU)."""
    if isinstance(value, dict):
        return {
            key: (item.clone() if key == "step" else _copy_state(item, device))
            for key, item in value.items()
        }
    if isinstance(value, torch.Tensor):
        return value.detach().to(device, copy=True)
    return copy.deepcopy(value)


def _resolve_process_group(
    process_group: Optional[dist.ProcessGroup],
) -> Optional[dist.ProcessGroup]:
    if process_group is not None:
        return process_group
    if dist.is_available() and dist.is_initialized():
        return dist.group.WORLD
    return None


def _validate_group(group: dict[str, Any]) -> None:
    """Check a param group's hyper-parameters (raising ValueError) and resolve defaults."""
    _check(group["lr"] >= 0.0, f"lr must be >= 0, got {group['lr']}")
    beta1, beta2 = group["betas"]
    _check(0.0 <= beta1 < 1.0, f"betas[0] must be in [0, 1), got {beta1}")
    _check(0.0 < beta2 <= 1.0, f"betas[1] must be in (0, 1], got {beta2}")
    _check(group["epsilon"] > 0.0, f"epsilon must be > 0, got {group['epsilon']}")
    _check(0.0 <= group["momentum"] < 1.0, f"momentum must be in [0, 1), got {group['momentum']}")
    _check(
        not group["use_nesterov"] or group["momentum"] > 0.0,
        "use_nesterov needs momentum > 0",
    )
    _check(group["weight_decay"] >= 0.0, f"weight_decay must be >= 0, got {group['weight_decay']}")
    _check_positive_int(group, "max_preconditioner_dim")
    _check_positive_int(group, "precondition_frequency")
    frequency = group["precondition_frequency"]
    if group["start_preconditioning_step"] == -1:
        group["start_preconditioning_step"] = frequency
    start = group["start_preconditioning_step"]
    _check(
        isinstance(start, int) and start >= frequency,
        f"start_preconditioning_step must be -1 or >= precondition_frequency ({frequency}), "
        f"got {start}",
    )
    _check_grafting(group)
    override = group["exponent_override"]
    _check(
        override is None or (isinstance(override, (int, float)) and override > 0),
        f"exponent_override must be None or > 0, got {override}",
    )
    _check(
        isinstance(group["factor_dtype"], torch.dtype) and group["factor_dtype"].is_floating_point,
        f"factor_dtype must be a floating-point dtype, got {group['factor_dtype']}",
    )


def _check_grafting(group: dict[str, Any]) -> None:
    grafting = group["grafting"]
    _check(
        grafting is None or grafting in GRAFTING_METHODS,
        f"grafting must be None or one of {GRAFTING_METHODS}, got {grafting!r}",
    )
    _check(
        group["grafting_epsilon"] > 0.0,
        f"grafting_epsilon must be > 0, got {group['grafting_epsilon']}",
    )
    beta2 = group["grafting_beta2"]
    _check(0.0 < beta2 <= 1.0, f"grafting_beta2 must be in (0, 1], got {beta2}")
    _check(
        grafting != "adagrad" or beta2 == 1.0,
        f"grafting='adagrad' sums squared gradients: grafting_beta2 must be 1.0, got {beta2}",
    )


def _check_positive_int(group: dict[str, Any], name: str) -> None:
    value = group[name]
    _check(
        isinstance(value, int) and not isinstance(value, bool) and value >= 1,
        f"{name} must be an integer >= 1, got {value!r}",
    )


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise ValueError(message)
