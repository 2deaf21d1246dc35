"""Hutchinson estimates of the Hessian trace of a loss, one per parameter block (layer).

For a loss L and a random vector v with independent Rademacher entries (+-1),
``E[v^T H v] = tr(H)``. With one probe v over all blocks and the Hessian-vector product
``Hv`` (the gradient of ``g . v``, g = dL/dw, taken with ``create_graph=True``), the block
``l`` part ``v_l . (Hv)_l`` has expectation ``tr(H_ll)``: the cross terms ``v_l H_lm v_m``
average to zero because v_l and v_m are independent. So one double-backward per probe gives
an unbiased estimate for every layer at once (as HAWQ-v2 does). Its variance per probe is
``2 (||H_ll||_F^2 - sum_i H_ii^2) + ||H_l,rest||_F^2``, so the standard error falls as
``1 / sqrt(probes)``; each estimate comes with its sample standard error.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class TraceEstimate:
    """Hutchinson estimate of one block's Hessian trace: mean over probes and its standard
    error (sample standard deviation / sqrt(probes); 0 with a single probe)."""

    trace: float
    stderr: float
    probes: int


def rademacher(shape: torch.Size, generator: torch.Generator, device: torch.device) -> Tensor:
    """A tensor of independent +-1 entries (drawn on the CPU generator, then moved)."""
    v = torch.randint(0, 2, shape, generator=generator, dtype=torch.int8)
    return (v.float() * 2 - 1).to(device)


def hutchinson_traces(
    loss_fn: Callable[[], Tensor],
    params: Sequence[Tensor],
    probes: int = 32,
    seed: int = 0,
) -> list[TraceEstimate]:
    """Estimates of ``tr(d^2 L / d w_l^2)`` for each tensor ``w_l`` of ``params``.

    Args:
        loss_fn: computes the scalar loss L from the current parameters (called once per
            call of this function; it must be twice differentiable in ``params``).
        params: the blocks (e.g. each layer's weight), all requiring grad.
        probes: number of Rademacher probes.
        seed: seed of the probes' generator (the global RNG is not touched).
    """
    if probes < 1:
        raise ValueError(f"probes must be >= 1, got {probes}")
    params = list(params)
    loss = loss_fn()
    grads = torch.autograd.grad(loss, params, create_graph=True, allow_unused=True)
    # blocks whose gradient does not depend on any parameter have a zero Hessian block row
    live = [i for i, g in enumerate(grads) if g is not None and g.requires_grad]
    gen = torch.Generator().manual_seed(int(seed))
    samples = torch.zeros(probes, len(params), dtype=torch.float64)
    for k in range(probes):
        vs = [rademacher(p.shape, gen, p.device) for p in params]  # drawn for every block
        if not live:
            continue
        hvs = torch.autograd.grad(
            [grads[i] for i in live],
            params,
            grad_outputs=[vs[i] for i in live],
            retain_graph=k < probes - 1,
            allow_unused=True,
        )
        for i, (v, hv) in enumerate(zip(vs, hvs, strict=True)):
            if hv is not None:
                samples[k, i] = float((v.double() * hv.double()).sum())
    mean = samples.mean(dim=0)
    se = samples.std(dim=0) / probes**0.5 if probes > 1 else torch.zeros(len(params))
    return [TraceEstimate(float(m), float(s), probes) for m, s in zip(mean, se, strict=True)]
