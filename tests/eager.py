"""The eager reference the multi-process tests compare against, and the loop they run.

``train_eager(model, batches, make_optimizer)`` trains ``model`` in this process, plain
PyTorch, one optimizer step per batch, and returns the loss of every step and the
gradients of step 0 (by parameter name). ``train_disaggregated(dmodel, batches, opts)``
is the same loop on a disaggregated model (every rank), with step 0's consolidated
gradients. ``grad_errors(got, want)`` is the relative error of each gradient (``inf``
where ``got`` has none).
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


def train_disaggregated(dmodel, batches: list[dict], opts: list
                        ) -> tuple[list[float], dict[str, torch.Tensor | None]]:
    losses, grads0 = [], {}
    for step, batch in enumerate(batches):
        out = dmodel(**batch)
        out.loss.backward()
        if step == 0:
            grads0 = dmodel.consolidated_grads()  # collective: every rank
        losses.append(float(out.loss.detach()))
        for opt in opts:
            opt.step()
            opt.zero_grad()
    return losses, grads0


def grad_errors(got: Mapping[str, torch.Tensor | None], want: Mapping[str, torch.Tensor]) -> dict[str, float]:
    return {n: float((got[n] - g).norm() / g.norm().clamp_min(1e-30)) if got[n] is not None else float("inf")
            for n, g in want.items()}
