"""AdamW as ``torch.optim.AdamW(fused=True)`` updates, without building a ``torch.optim`` optimizer.

Building a process's first ``torch.optim`` optimizer imports ``torch._dynamo`` (~1.7 s on this
project's CPU machines, about what a fit of a pooled head takes to train), for a compiler the
heads' training never uses. The update itself is one ATen kernel, ``torch._fused_adamw_``, which
``torch.optim.AdamW(fused=True)`` calls after counting the step: called the same way on the same
state, it moves the weights bit for bit as that optimizer does (``tests/test_optim.py``).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch

BETAS, EPS = (0.9, 0.999), 1e-8  # torch.optim.AdamW's defaults, which every head trains with


def adamw_step(
    params: list[torch.Tensor],
    grads: list[torch.Tensor],
    exp_avgs: list[torch.Tensor],
    exp_avg_sqs: list[torch.Tensor],
    steps: list[torch.Tensor],
    *,
    lr: float,
    weight_decay: float,
) -> None:
    """One AdamW step of each of ``params`` in place, with its moments; ``steps`` are the float32 counts of each
    parameter's steps so far, counted up first, as torch counts them."""
    if not params:
        return
    torch._foreach_add_(steps, 1)
    torch._fused_adamw_(
        params, grads, exp_avgs, exp_avg_sqs, [], steps, lr=lr, beta1=BETAS[0], beta2=BETAS[1],
        weight_decay=weight_decay, eps=EPS, amsgrad=False, maximize=False,
    )


class AdamW:
    """``torch.optim.AdamW(groups, lr=lr, fused=True)`` for a training loop: ``zero_grad`` and ``step``.

    ``groups`` are torch's parameter groups: dicts of ``params`` and their ``weight_decay``. As in torch, a
    parameter without a gradient is left alone by a step (no moment decay, no weight decay, no step counted).
    Made for the heads' CPU training: one kernel call per group, without torch's grouping by device and dtype.
    """

    def __init__(self, groups: Iterable[dict[str, Any]], lr: float) -> None:
        self.lr = lr
        self.groups = [(list(group["params"]), group["weight_decay"]) for group in groups]
        # per parameter, as torch's fused AdamW keeps it: first and second moments, and a float32 step count
        self.state = {
            p: (torch.zeros_like(p, memory_format=torch.preserve_format),
                torch.zeros_like(p, memory_format=torch.preserve_format),
                torch.zeros((), dtype=torch.float32, device=p.device))
            for params, _ in self.groups for p in params
        }

    def zero_grad(self) -> None:
        """Drop every parameter's gradient (torch's ``set_to_none``), so the next backward writes fresh ones."""
        for params, _ in self.groups:
            for p in params:
                p.grad = None

    @torch.no_grad()
    def step(self) -> None:
        """One AdamW step of every parameter that has a gradient, each group with its own weight decay."""
        for params, weight_decay in self.groups:
            stepped = [p for p in params if p.grad is not None]
            if not stepped:
                continue
            exp_avgs, exp_avg_sqs, steps = map(list, zip(*(self.state[p] for p in stepped)))
            adamw_step(
                stepped, [p.grad for p in stepped], exp_avgs, exp_avg_sqs, steps, lr=self.lr,
                weight_decay=weight_decay,
            )
