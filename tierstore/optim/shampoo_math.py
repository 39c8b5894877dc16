"""The numerical kernels of DistributedShampoo, one block at a time.

All functions here are pure tensor code with no optimizer bookkeeping, so they can be tested and
read on their own. Notation: ``G`` is a block of the gradient of order ``k`` (its number of
dimensions); factor ``i`` of the block is the ``d_i x d_i`` matrix that accumulates ``G``
contracted with itself over every dimension but ``i`` (for a matrix: ``G G^T`` and ``G^T G``).
"""

from __future__ import annotations

import torch


class NonFiniteFactorError(FloatingPointError):
    """A Kronecker factor (or its inverse root) holds a NaN or an infinity."""


GRAFTING_METHODS = ("sgd", "adagrad", "rmsprop", "adam")


def accumulate_factors(factors: list[torch.Tensor], grad: torch.Tensor, beta2: float) -> None:
    """Update the factors of a block in place with the block's gradient ``grad``.

    ``F_i <- F_i + C_i(G)`` when ``beta2 == 1`` (AdaGrad sums), otherwise
    ``F_i <- beta2 F_i + (1 - beta2) C_i(G)``, where ``C_i`` contracts over all dims but ``i``.
    ``grad`` is cast to the factors' dtype first.
    """
    g = grad.to(factors[0].dtype)
    alpha = 1.0 if beta2 == 1.0 else 1.0 - beta2
    if g.dim() == 1:
        factors[0].addr_(g, g, beta=beta2, alpha=alpha)
    elif g.dim() == 2:
        _accumulate_gram(factors[0], g, beta2, alpha)
        _accumulate_gram(factors[1], g.T, beta2, alpha)
    else:
        for i, factor in enumerate(factors):
            others = [d for d in range(g.dim()) if d != i]
            if beta2 != 1.0:
                factor.mul_(beta2)
            factor.add_(torch.tensordot(g, g, dims=(others, others)), alpha=alpha)


# Below this many rows a Gram matrix is one matrix product; above, splitting it in halves and
# skipping the upper-right block saves a quarter of the work (measured on CPU: ~15% faster).
_GRAM_SPLIT_MIN_ROWS = 128


def _accumulate_gram(factor: torch.Tensor, rows: torch.Tensor, beta: float, alpha: float) -> None:
    """``factor <- beta * factor + alpha * rows @ rows.T``, exploiting symmetry.

    With ``rows`` split in halves ``T`` (top) and ``B``, the blocks ``T T^T``, ``B T^T`` and
    ``B B^T`` are computed and the upper-right block is the transpose of the lower-left one.
    """
    m = rows.shape[0]
    if m < _GRAM_SPLIT_MIN_ROWS:
        factor.addmm_(rows, rows.T, beta=beta, alpha=alpha)
        return
    h = m // 2
    top, bottom = rows[:h], rows[h:]
    factor[:h, :h].addmm_(top, top.T, beta=beta, alpha=alpha)
    factor[h:, :h].addmm_(bottom, top.T, beta=beta, alpha=alpha)
    factor[h:, h:].addmm_(bottom, bottom.T, beta=beta, alpha=alpha)
    factor[:h, h:].copy_(factor[h:, :h].T)


def inverse_root(factor: torch.Tensor, root: float, epsilon: float) -> torch.Tensor:
    """``(factor + epsilon I)^(-1/root)`` by symmetric eigendecomposition.

    If the smallest eigenvalue of ``factor + epsilon I`` is still below ``epsilon`` (rounding, or
    a factor that is not positive semi-definite), the whole spectrum is shifted up so that it is
    ``epsilon``. Raises :class:`NonFiniteFactorError` for a non-finite factor or result.
    Computed in the factor's dtype; an eigendecomposition that fails to converge in a lower
    precision is retried in float64.
    """
    if not bool(torch.isfinite(factor).all()):
        raise NonFiniteFactorError("factor matrix has non-finite entries")
    perturbed = factor.clone()
    perturbed.diagonal().add_(epsilon)
    eigenvalues, eigenvectors = _eigh(perturbed)
    smallest = eigenvalues.min()
    # Shifting as (L - min) + epsilon, not L + (epsilon - min), keeps the smallest eigenvalue at
    # exactly epsilon even when epsilon is below the rounding of min (float32, tiny epsilon).
    eigenvalues = torch.where(smallest < epsilon, (eigenvalues - smallest) + epsilon, eigenvalues)
    scales = eigenvalues.pow(-1.0 / root)
    result = (eigenvectors * scales) @ eigenvectors.T
    if not bool(torch.isfinite(result).all()):
        raise NonFiniteFactorError("inverse root of the factor matrix is not finite")
    return result


def _eigh(matrix: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    try:
        return torch.linalg.eigh(matrix)
    except torch.linalg.LinAlgError:
        if matrix.dtype == torch.float64:
            raise
        values, vectors = torch.linalg.eigh(matrix.double())
        return values.to(matrix.dtype), vectors.to(matrix.dtype)


def precondition(grad: torch.Tensor, inverse_roots: list[torch.Tensor]) -> torch.Tensor:
    """Multiply ``grad`` along each dimension ``i`` by the (symmetric) matrix ``inverse_roots[i]``.

    For a matrix this is ``L G R``; for a vector ``L g``. Returns a new tensor.
    """
    if grad.dim() == 1:
        return inverse_roots[0] @ grad
    if grad.dim() == 2:
        return inverse_roots[0] @ grad @ inverse_roots[1]
    out = grad
    for matrix in inverse_roots:
        # Contracting the leading dim and appending the result dim cycles through all dims, so
        # after k steps the dims are back in their original order.
        out = torch.tensordot(out, matrix, dims=([0], [0]))
    return out


def accumulate_squares(accumulator: torch.Tensor, grad: torch.Tensor, beta2: float) -> None:
    """Second-moment state of the grafting method: sum (``beta2 == 1``) or EMA of ``grad**2``."""
    if beta2 == 1.0:
        accumulator.addcmul_(grad, grad, value=1.0)
    else:
        accumulator.mul_(beta2).addcmul_(grad, grad, value=1.0 - beta2)


def diagonal_direction(
    grad: torch.Tensor, accumulator: torch.Tensor, epsilon: float, bias_correction: float
) -> torch.Tensor:
    """AdaGrad/RMSprop/Adam direction ``grad / (sqrt(accumulator / bias_correction) + epsilon)``."""
    denom = accumulator / bias_correction if bias_correction != 1.0 else accumulator
    return grad / denom.sqrt().add_(epsilon)


def graft(direction: torch.Tensor, grafting_direction: torch.Tensor) -> torch.Tensor:
    """Rescale ``direction`` in place to the norm of ``grafting_direction``; returns it."""
    scale = grafting_direction.norm() / (direction.norm() + 1e-16)
    return direction.mul_(scale)
