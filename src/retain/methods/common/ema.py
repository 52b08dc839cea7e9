"""LCIA's dynamic EMA (DEMA), after the reference `LoraModel.ema_update` / `ema_replace`
(JingyangQiao/CoIN, peft/tuners/lora.py). Per trainable tensor, after every optimizer step t, with g_t
the gradient the optimizer used:
    alpha_t = c (1 + |g_t|_1) / (|theta_t - theta*_{t-1}|_1 |g_t - g_{t-1}|_1),  fallback unless in (0, 1)
    theta*_t = (1 - alpha_t) theta*_{t-1} + alpha_t theta_t      (theta* = theta after the first step)
and theta <- theta* when the task ends.

Gradients and parameters are read whole (methods/common/sharding.py): under FSDP2 each rank gathers the
full tensors, so the L1 norms, and hence alpha, are those of the whole tensor, and the EMA copy is whole
on every rank (one adapter's size); theta* goes back into each rank's shard at the end of the task.
"""

from __future__ import annotations

import torch

from retain.errors import RetainError
from retain.methods.common.sharding import full_gradient, full_parameter, set_full_parameter


class DynamicEMA:
    """The EMA copy theta* and the previous gradient of each trainable tensor (both fp32), for one task.

    `capture` runs before the optimizer step (the gradient is accumulated and all-reduced there, not yet
    clipped), `update` after it; both work on all tensors at once (torch._foreach_*) and
    never wait on the device. `stats` summarises the alphas used from running sums (no per-step list).
    """

    def __init__(self, c: float, fallback: float) -> None:
        self.c, self.fallback = c, fallback
        self.ema: dict[str, torch.Tensor] = {}
        self.prev_grad: dict[str, torch.Tensor] = {}
        # name -> (|g_t|_1, |g_t - g_{t-1}|_1 or None), or (None, None) for a tensor without gradient
        self.pending: dict[str, tuple[torch.Tensor | None, torch.Tensor | None]] = {}
        self.last: torch.Tensor | None = None  # the alphas used at the last update, one per tensor
        self.count = 0  # (step, tensor) alphas used so far
        self.missing_grad = 0
        self._sum: torch.Tensor | None = None  # running sum / min / max of the alphas, accepted count
        self._min: torch.Tensor | None = None
        self._max: torch.Tensor | None = None
        self._accepted: torch.Tensor | None = None

    @property
    def accepted(self) -> int:
        """How many (step, tensor) alphas the rule produced in (0, 1) (reading it waits on the device)."""
        return 0 if self._accepted is None else int(self._accepted)

    @torch.no_grad()
    def capture(self, params: dict[str, torch.Tensor]) -> None:
        """Record |g_t|_1 and |g_t - g_{t-1}|_1 of every tensor, then keep g_t as the previous gradient."""
        whole = {name: full_gradient(param) for name, param in params.items()}  # gathers when sharded
        if params and all(g is None for g in whole.values()):
            raise RetainError(
                "lcia: DEMA needs the gradients of the trainable parameters before the optimizer step, but "
                "none has one (DeepSpeed ZeRO keeps them in its own buffers); use DDP, or dema: false"
            )
        self.pending = {}
        names = [n for n, g in whole.items() if g is not None]
        for name, grad in whole.items():
            if grad is None:
                self.pending[name] = (None, None)
                self.prev_grad.pop(name, None)
        grads = [whole[n].detach().float() for n in names]
        grad_l1 = torch._foreach_norm(grads, 1) if grads else []
        seen = [i for i, n in enumerate(names) if n in self.prev_grad]
        changes: dict[int, torch.Tensor] = {}
        if seen:
            diffs = torch._foreach_sub([grads[i] for i in seen], [self.prev_grad[names[i]] for i in seen])
            changes = dict(zip(seen, torch._foreach_norm(diffs, 1), strict=True))
            torch._foreach_copy_([self.prev_grad[names[i]] for i in seen], [grads[i] for i in seen])
        for i, name in enumerate(names):
            self.pending[name] = (grad_l1[i], changes.get(i))
            if name not in self.prev_grad:
                self.prev_grad[name] = grads[i].clone()

    @torch.no_grad()
    def update(self, params: dict[str, torch.Tensor]) -> None:
        """theta* <- (1 - alpha) theta* + alpha theta for every tensor, alpha by the DEMA rule or fallback."""
        if set(self.pending) != set(params):
            raise RetainError("lcia: DEMA update without the gradients of this step (capture was not called)")
        if not params:
            return
        names = list(params)
        values = [full_parameter(params[n]).float() for n in names]  # gathers when sharded
        self.missing_grad += sum(self.pending[n][0] is None for n in names)
        fresh = [i for i, n in enumerate(names) if n not in self.ema]
        for i in fresh:
            # theta* starts as the weights after the first step (the reference's fallback there averages
            # theta with itself), so the first step counts as not accepted.
            self.ema[names[i]] = values[i].clone()
        emas = [self.ema[n] for n in names]
        diffs = torch._foreach_sub(values, emas)  # theta_t - theta*_{t-1}
        distance = torch.stack(torch._foreach_norm(diffs, 1)).double()
        device = distance.device
        nan = torch.tensor(float("nan"), dtype=torch.float64, device=device)

        def stacked(position: int) -> torch.Tensor:
            items = [self.pending[n][position] for n in names]
            return torch.stack([nan if t is None else t.to(device, torch.float64) for t in items])

        raw = self.c * (1 + stacked(0)) / (distance * stacked(1))
        if fresh:
            raw[fresh] = nan
        ok = torch.isfinite(raw) & (raw > 0) & (raw < 1)
        used = torch.where(ok, raw, torch.full_like(raw, self.fallback))
        # theta* += alpha (theta - theta*), one alpha per tensor
        torch._foreach_mul_(diffs, [a.float() for a in used.unbind()])
        torch._foreach_add_(emas, diffs)
        self.last = used
        self.count += len(names)
        if self._sum is None:
            self._sum, self._min, self._max = used.sum(), used.min(), used.max()
            self._accepted = ok.sum()
        else:
            self._sum += used.sum()
            self._min = torch.minimum(self._min, used.min())
            self._max = torch.maximum(self._max, used.max())
            self._accepted += ok.sum()
        self.pending = {}

    def write_back(self, params: dict[str, torch.Tensor], keep_raw: bool = False) -> dict[str, torch.Tensor]:
        """Put theta* into the model; returns the raw (pre-EMA) weights, fp32 on the CPU, if `keep_raw`."""
        raw = {}
        with torch.no_grad():
            for name, param in params.items():
                if keep_raw:
                    raw[name] = full_parameter(param).float().cpu().clone()
                if name in self.ema:
                    set_full_parameter(param, self.ema[name])
        return raw

    def stats(self) -> dict[str, float]:
        """Share of (step, tensor) alphas accepted by the rule; mean/min/max of the alphas used."""
        if not self.count:
            return {"updates": 0}
        return {
            "accepted_frac": self.accepted / self.count,
            "alpha_mean": float(self._sum) / self.count,
            "alpha_min": float(self._min),
            "alpha_max": float(self._max),
            "updates": self.count,
            "missing_grad": self.missing_grad,
        }
