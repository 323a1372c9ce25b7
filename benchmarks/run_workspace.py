"""What the benchmark scripts open first: a finished run folder with its config, dataset, encoder
and cached features (extracted again only if the cache lost them), torch on the run's threads.

    from run_workspace import open_run      # the scripts run as ``python benchmarks/NAME.py``
    run = open_run("runs/embedded-clipcap-diffusion-mnic-nearest")
    test = run.work.splits["test"]
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass
class OpenRun:
    folder: Any  # RunFolder
    config: Any  # its RunConfig
    dataset: Any
    encoder: Any
    work: Any  # Workspace: .splits[name] -> SplitFeatures


def open_run(run: str | Path, threads: int | None = None) -> OpenRun:
    """The run folder ``run``, torch set to ``threads`` (default: the run's own)."""
    import torch

    from diffusion_captioner.comparison import prepare_features
    from diffusion_captioner.run_folder import RunFolder
    from registry import build

    folder = RunFolder(Path(run))
    config = folder.read_config()
    torch.set_num_threads(int(threads or config.threads or 1))
    dataset, encoder = build("dataset", config.dataset), build("encoder", config.encoder)
    work = prepare_features(dataset, encoder, config.cache_dir, progress=False)
    return OpenRun(folder, config, dataset, encoder, work)
