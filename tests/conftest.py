"""Shared fixtures: the optional ../shared folder, a registry that is restored after each test,
and a tiny real open_clip CLIP (trained for a couple of steps by the project's own code)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
TINY_SHAPES = {"type": "shapes", "num_train": 24, "num_val": 8, "num_test": 8, "seed": 3}
TINY_CLIP = {"width": 32, "vision_layers": 1, "text_layers": 1, "embed_dim": 32,
             "image_size": 32, "patch_size": 8}


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    """``../shared`` of the checkout; tests that need it skip with a reason when it is missing."""
    if not SHARED.is_dir():
        pytest.skip(f"../shared not present at {SHARED} (a user's fresh checkout has none)")
    return SHARED


@pytest.fixture
def clean_registry():
    """Snapshot every role's registry and restore it after the test (fake classes vanish)."""
    from registrable import Registrable

    import registry

    registry.load_builtins()
    saved = {base: dict(Registrable._registry[base]) for base in registry.ROLES.values()}
    loaded = set(registry._loaded_entry_points)
    errors = dict(registry.plugin_errors)
    yield registry
    for base, names in saved.items():
        Registrable._registry[base].clear()
        Registrable._registry[base].update(names)
    registry._loaded_entry_points.clear()
    registry._loaded_entry_points.update(loaded)
    registry.plugin_errors.clear()
    registry.plugin_errors.update(errors)


@pytest.fixture(scope="session")
def tiny_clip_dir(tmp_path_factory) -> Path:
    """A tiny open_clip CLIP as a ``local-dir`` folder, made by ``pretrain_clip`` in seconds."""
    from diffusion_captioner.pretrain_clip import pretrain_clip

    out = tmp_path_factory.mktemp("tiny_clip")
    pretrain_clip(out, dataset=TINY_SHAPES, steps=2, batch_size=8, warmup=1, model=TINY_CLIP)
    return out


@pytest.fixture(scope="session")
def tiny_encoder(tiny_clip_dir):
    from diffusion_captioner.encoders import OpenClipEncoder

    return OpenClipEncoder(f"local-dir:{tiny_clip_dir}")


@pytest.fixture(autouse=True, scope="session")
def one_torch_thread():
    """Tiny models run fastest (and steadiest on a busy 2-core machine) on one thread."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
