"""diffusion_captioner: train and compare image-captioning decoders head to head (CLIP-DiffusionLM,
ClipCap, MNIC, nearest-neighbour retrieval, yours) on the same frozen CLIP features, splits and
COCO metrics.

The Python API (the ``dcap`` commands as functions, :mod:`diffusion_captioner.api`)::

    import diffusion_captioner as dc

    dc.available("decoder")                         # registered decoders (encoder, dataset, preset)
    dc.list_components()                            # what `dcap list` shows
    result = dc.compare(decoders="clipcap,diffusion", out="runs/mine")   # `dcap compare`
    result.folder, result.scores                    # the run folder, {decoder: {metric: value}}
    run = dc.load_run("runs/mine")                  # a run folder, an export or hf-hub:org/name
    run.caption(["a.jpg", pil_image])               # {decoder: [caption per image]}
    dc.evaluate("results.json", "annotations.json").scores               # `dcap evaluate`
    dc.export("runs/mine", "shared/mine")           # `dcap export`: a shareable folder + model card

Nothing heavy is imported until a function is used: ``import diffusion_captioner`` loads no
torch.
"""

from __future__ import annotations

import importlib
from typing import Any

__all__ = ["Components", "CompareResult", "Evaluation", "Run", "available", "compare",
           "evaluate", "export", "list_components", "load_run"]

_API = {"Components", "CompareResult", "Evaluation", "Run", "available", "compare", "evaluate",
        "export", "list_components", "load_run"}


def __getattr__(name: str) -> Any:
    """Import the API on first use (PEP 562), so that importing the package stays cheap."""
    if name in _API:
        return getattr(importlib.import_module("diffusion_captioner.api"), name)
    raise AttributeError(f"module 'diffusion_captioner' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
