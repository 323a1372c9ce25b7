"""Experiment trackers (``dcap compare --log-with tensorboard,wandb,...``) through accelerate.

The trainer hands every entry it writes to ``train_log.jsonl`` (loss parts, lr, validation
losses) to ``Accelerator.log`` as well, at the entry's step; ``compare`` adds the test metrics
(``test/CIDEr``...) at the last step. The jsonl log is written exactly as without trackers.
Tracker files go under ``runs/NAME/tracker/`` (TensorBoard: ``runs/NAME/tracker/<decoder>/``,
so ``tensorboard --logdir runs/NAME/tracker`` shows the decoders side by side); each decoder is
one tracker run named after it.
"""

from __future__ import annotations

import numbers
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

#: accelerate's tracker names -> the package ``pip install`` needs for it.
TRACKER_PACKAGES: dict[str, str] = {
    "tensorboard": "tensorboard",
    "wandb": "wandb",
    "mlflow": "mlflow",
    "aim": "aim",
    "comet_ml": "comet-ml",
    "clearml": "clearml",
    "dvclive": "dvclive",
    "swanlab": "swanlab",
    "trackio": "trackio",
}

#: Folder of the run folder that trackers write under.
TRACKER_DIR = "tracker"


def check_trackers(names: Iterable[str]) -> list[str]:
    """The requested tracker names, checked before any training.

    An unknown name or a tracker whose package is not installed raises one ``ValueError`` line
    naming it and the ``pip install`` that adds it.
    """
    from accelerate.tracking import get_available_trackers
    from accelerate.utils import LoggerType

    wanted = list(dict.fromkeys(str(n).strip() for n in names if str(n).strip()))
    unknown = [n for n in wanted if n not in TRACKER_PACKAGES]
    if unknown:
        raise ValueError(f"--log-with: unknown tracker {', '.join(unknown)}; accelerate supports: "
                         f"{', '.join(TRACKER_PACKAGES)}")
    available = {str(t) for t in get_available_trackers()}
    missing = [n for n in wanted if str(LoggerType(n)) not in available]
    if missing:
        packages = [TRACKER_PACKAGES[n] for n in missing]
        raise ValueError(f"--log-with {','.join(missing)}: {' and '.join(packages)} not "
                         f"installed; pip install {' '.join(packages)} (or drop it from --log-with)")
    return wanted


def tracker_dir(run: str | Path) -> Path:
    """Where the trackers of a ``compare`` run write: ``run/tracker``."""
    return Path(run) / TRACKER_DIR


def scalars(entry: Mapping[str, Any], prefix: str = "") -> dict[str, float]:
    """The numeric values of a log entry (``step`` left out: it is the tracker's step)."""
    return {f"{prefix}{k}": float(v) for k, v in entry.items()
            if k != "step" and isinstance(v, numbers.Real) and not isinstance(v, bool)}


def hyperparameters(config: Mapping[str, Any]) -> dict[str, Any]:
    """A flat config that every tracker accepts as hyperparameters (int, float, str, bool)."""
    return {k: v for k, v in config.items() if isinstance(v, int | float | str | bool)}
