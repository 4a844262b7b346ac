"""Dynamic loss scaling for ``train.precision = "fp16"``: the loss is multiplied by a scale before
backward so small gradients survive fp16; a step whose gradients overflowed anywhere updates nothing.

    scaler = LossScale()
    (loss * scaler.scale).backward()
    if scaler.finite(dense_grads + embeddings.grads(), group):  # one all-reduced flag: every rank agrees
        opt.step(); embeddings.step()                          # the gradients were unscaled in place
    else:
        opt.zero_grad(); embeddings.discard()                  # skipped: scale halved, counted

The rule and its defaults are ``torch.amp.GradScaler``'s (start at 2**16, halve on an overflow, double
after 2000 steps without one), and ``state_dict`` has its keys. GradScaler itself cannot decide here: it
checks each dense optimizer's gradients on its own rank, while the sparse updates of a sharded table wait
on the rank that owns its rows (``ShardedEmbeddingCollection(defer_updates=True)``) for one decision taken
over every gradient of every rank.
"""
from __future__ import annotations

import torch

from sharding.comm import all_reduce_


class LossScale:
    def __init__(self, init_scale: float = 2.0**16, growth_factor: float = 2.0, backoff_factor: float = 0.5,
                 growth_interval: int = 2000):
        self.scale, self.growth_factor, self.backoff_factor = float(init_scale), growth_factor, backoff_factor
        self.growth_interval, self.growth_tracker = growth_interval, 0
        self.skipped = 0  # steps skipped since the run (or the resumed run's checkpoint) started

    def finite(self, grads: list[torch.Tensor], group=None) -> bool:
        """Whether every rank's ``grads`` (fp32) are finite; unscales them in place by 1 / scale and sets
        the scale of the next step (collective: every rank calls it once per step)."""
        found = torch.zeros(1)
        if grads:  # the op GradScaler.unscale_ runs: one pass that checks and multiplies
            torch._amp_foreach_non_finite_check_and_unscale_(grads, found, torch.tensor(1.0 / self.scale))
        ok = float(all_reduce_(found, group)) == 0.0
        self._update(ok)
        return ok

    def _update(self, ok: bool) -> None:
        if not ok:
            self.scale *= self.backoff_factor
            self.growth_tracker, self.skipped = 0, self.skipped + 1
            return
        self.growth_tracker += 1
        if self.growth_tracker == self.growth_interval:
            self.scale *= self.growth_factor
            self.growth_tracker = 0

    def state_dict(self) -> dict:
        return {"scale": self.scale, "growth_factor": self.growth_factor, "backoff_factor": self.backoff_factor,
                "growth_interval": self.growth_interval, "_growth_tracker": self.growth_tracker}

    def load_state_dict(self, state: dict) -> None:
        self.scale, self.growth_tracker = float(state["scale"]), int(state["_growth_tracker"])
        self.growth_factor, self.backoff_factor = state["growth_factor"], state["backoff_factor"]
        self.growth_interval = int(state["growth_interval"])
