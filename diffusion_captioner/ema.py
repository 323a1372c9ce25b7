"""An exponential moving average of a decoder's trainable weights (DDPM, Diffusion-LM, DiffuSeq).

After optimizer step t the average theta_bar moves towards the weights theta::

    d_t = min(decay, (1 + t) / (10 + t))            (the usual warm-up: early steps count)
    theta_bar <- d_t theta_bar + (1 - d_t) theta

``swapped_in`` puts theta_bar into the model for a block (validation, saving ``checkpoint/best``)
and gives the trained weights back after it, so training always continues from theta. The state
(theta_bar and t) goes into ``checkpoint/last`` through accelerate's ``register_for_checkpointing``,
so a resumed run averages exactly as an uninterrupted one.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch


class WeightAverage:
    """theta_bar over ``parameters`` (those the optimizer trains) with decay ``decay`` in (0, 1)."""

    def __init__(self, parameters: Sequence[torch.nn.Parameter], decay: float) -> None:
        if not 0.0 < decay < 1.0:
            raise ValueError(f"training option ema_decay must be in (0, 1) (0 turns it off), "
                             f"got {decay}")
        self.parameters = list(parameters)
        self.decay = float(decay)
        self.updates = 0
        self.average = [p.detach().clone() for p in self.parameters]

    def current_decay(self) -> float:
        """d_t for the next update (t = updates made so far)."""
        return min(self.decay, (1 + self.updates) / (10 + self.updates))

    @torch.no_grad()
    def update(self) -> None:
        """One step of theta_bar <- d theta_bar + (1 - d) theta (after an optimizer step)."""
        weight = 1.0 - self.current_decay()
        torch._foreach_lerp_(self.average, [p.detach() for p in self.parameters], weight)
        self.updates += 1

    @contextmanager
    def swapped_in(self) -> Iterator[None]:
        """theta_bar in the model inside the block, theta again after it (even on an error)."""
        with torch.no_grad():
            trained = [p.detach().clone() for p in self.parameters]
            torch._foreach_copy_([p.data for p in self.parameters], self.average)
        try:
            yield
        finally:
            with torch.no_grad():
                torch._foreach_copy_([p.data for p in self.parameters], trained)

    def state_dict(self) -> dict[str, Any]:
        return {"decay": self.decay, "updates": self.updates,
                "average": [a.clone() for a in self.average]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if len(state["average"]) != len(self.average):
            raise ValueError(f"checkpoint's weight average holds {len(state['average'])} "
                             f"tensors, this model trains {len(self.average)}: it belongs to "
                             "another model; start a fresh run folder")
        if float(state["decay"]) != self.decay:
            raise ValueError(f"checkpoint's weight average was kept with ema_decay "
                             f"{state['decay']}, this run asks for {self.decay}: resume with "
                             "the same ema_decay or start a fresh run folder")
        self.updates = int(state["updates"])
        for mine, saved in zip(self.average, state["average"], strict=True):
            mine.copy_(saved)
