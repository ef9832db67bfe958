"""The eager reference the multi-process tests compare against.

``train_eager(model, batches, make_optimizer)`` trains ``model`` in this process, plain
PyTorch, one optimizer step per batch, and returns the loss of every step and the
gradients of step 0 (by parameter name). ``grad_errors(got, want)`` is the relative
error of each gradient (``inf`` where ``got`` has none).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch


def train_eager(model: torch.nn.Module, batches: list[dict], make_optimizer: Callable
                ) -> tuple[list[float], dict[str, torch.Tensor]]:
    opt = make_optimizer(model.parameters())
    losses, grads0 = [], {}
    for step, batch in enumerate(batches):
        loss = model(**batch, use_cache=False).loss
        loss.backward()
        if step == 0:
            grads0 = {n: p.grad.clone() for n, p in model.named_parameters()}
        losses.append(float(loss))
        opt.step()
        opt.zero_grad()
    return losses, grads0


def grad_errors(got: Mapping[str, torch.Tensor | None], want: Mapping[str, torch.Tensor]) -> dict[str, float]:
    return {n: float((got[n] - g).norm() / g.norm().clamp_min(1e-30)) if got[n] is not None else float("inf")
            for n, g in want.items()}
