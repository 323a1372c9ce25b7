"""Backward time of the diffusion loss at DistilBERT-base size with and without flushing
subnormal floats (the trainer flushes them on CPU), side by side in one process.

The `paper` preset's decoder untrained at its real size (random weights, a stand-in tokenizer of
the real vocabulary size when bert/distilbert's is not at hand), 8 captions x 4 noise levels::

    python benchmarks/denormals.py
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path


def main() -> None:
    import torch

    from diffusion_captioner.bench_preset import random_init_config
    from diffusion_captioner.presets import decoder_plan, load_preset
    from registry import build

    config = random_init_config("diffusion", decoder_plan(load_preset("paper"), "diffusion")[
        "decoder"], Path(tempfile.mkdtemp()))
    config["timesteps_per_caption"] = 4
    torch.manual_seed(0)
    decoder = build("decoder", config, feature_dim=512).train()
    batch = {"features": torch.randn(8, 512),
             "captions": ["a man riding a wave on top of a surfboard"] * 8}

    def backward_seconds() -> float:
        decoder.zero_grad(set_to_none=True)
        loss = decoder.loss(batch)["loss"]
        started = time.perf_counter()
        loss.backward()
        return time.perf_counter() - started

    for flush in (False, True, False, True):
        torch.set_flush_denormal(flush)
        backward_seconds()  # warm-up
        median = sorted(backward_seconds() for _ in range(3))[1]
        print(f"flush_denormal={flush}: backward {median:.2f} s (median of 3)")


if __name__ == "__main__":
    main()
