"""Role base classes and the one registry every component goes through.

Three roles, each a :class:`registrable.Registrable` base: :class:`ImageEncoder`,
:class:`CaptionDecoder` and :class:`CaptionDataset`. Components register on the role base
(``@CaptionDecoder.register("clipcap")``) and are built from a plain config dict whose ``type``
names the class and whose other keys are its constructor's arguments::

    decoder = build("decoder", {"type": "clipcap", "feature_dim": 512, "prefix_length": 10})

A name is resolved, in order, from: the registry (built-ins are imported on first use); a dotted
path ``pkg.module.Class``; the entry-point group ``diffusion_captioner.<role>s`` (loaded lazily,
on a miss, a broken plugin reported and skipped). Users add their own modules with
:func:`include_package` (the CLI's ``--include-package``).
"""

from __future__ import annotations

import importlib
import importlib.metadata
import inspect
import itertools
import logging
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Literal

import torch
from registrable import Registrable, RegistrationError
from torch import nn

if TYPE_CHECKING:
    from PIL import Image

logger = logging.getLogger(__name__)

Role = Literal["decoder", "encoder", "dataset"]
Split = Literal["train", "val", "test"]
SPLITS: tuple[Split, ...] = ("train", "val", "test")

_BUILTIN_MODULES = (
    "diffusion_captioner.encoders",
    "diffusion_captioner.data.shapes",
    "diffusion_captioner.data.coco",
    "diffusion_captioner.data.karpathy",
    "diffusion_captioner.data.jsonl",
    "diffusion_captioner.data.combined",
    "diffusion_captioner.data.nocaps",
    "baselines.clipcap",
)
_ENTRY_POINT_GROUPS: dict[Role, str] = {
    "decoder": "diffusion_captioner.decoders",
    "encoder": "diffusion_captioner.encoders",
    "dataset": "diffusion_captioner.datasets",
}


class ComponentError(ValueError):
    """A component could not be found or built; the message is one line meant for the user."""


# --------------------------------------------------------------------------------------------
# Role bases
# --------------------------------------------------------------------------------------------
class ImageEncoder(Registrable):
    """A frozen image (and text) encoder whose features condition every decoder.

    Subclasses set ``dim`` and ``fingerprint`` (model + weights + preprocessing; it keys the
    feature cache, so it must change whenever the features would).
    """

    dim: int
    fingerprint: str

    def preprocess(self, image: Image.Image) -> torch.Tensor:
        """One PIL image -> the (C, H, W) tensor :meth:`encode_images` takes."""
        raise NotImplementedError

    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) preprocessed pixels -> (B, D) features."""
        raise NotImplementedError

    def encode_texts(self, texts: Sequence[str]) -> torch.Tensor:
        """B strings -> (B, D) text features in the same space as the image features."""
        raise NotImplementedError


class CaptionDecoder(nn.Module, Registrable):
    """A captioning decoder conditioned on one (D,) image feature per image.

    Built from ``feature_dim`` plus its own config keys. ``loss(batch)`` takes
    ``{"features": (B, D) float, "captions": list[str]}`` (plus ``text_features`` (B, D) when the
    class sets ``needs_text_features``) and
    returns a dict with the scalar ``loss`` and any named parts to log. ``generate`` maps
    (B, D) features to B captions. ``save_pretrained``/``from_pretrained`` round-trip the config
    JSON, safetensors weights and tokenizer files.
    """

    #: Step counts the compare report sweeps (iterative decoders); empty for one-shot decoders.
    step_sweep: ClassVar[tuple[int, ...]] = ()
    #: True when ``loss`` wants ``batch["text_features"]`` (CLIP text features of each caption);
    #: :meth:`uses_text_features` may say so per configuration.
    needs_text_features: ClassVar[bool] = False
    #: True for an autoregressive decoder whose ``generate`` takes ``fixed_tokens=N`` (write N
    #: tokens, ignoring the end token: how ``dcap bench --tokens`` times untrained models).
    fixed_tokens_option: ClassVar[bool] = False

    @classmethod
    def uses_text_features(cls, config: dict[str, Any]) -> bool:
        """Whether a decoder built from ``config`` wants ``batch["text_features"]``, so that
        compare extracts them only then (default: the class's ``needs_text_features``)."""
        return cls.needs_text_features

    @classmethod
    def check_config(cls, config: dict[str, Any]) -> None:
        """Raise ValueError for a configuration that cannot work, when the plan is made (before
        any training); default: nothing to check."""

    @classmethod
    def check_generate_options(cls, options: dict[str, Any]) -> None:
        """Raise ValueError, when the plan is made, for a generation option ``generate`` does not
        name (a typo in a preset's ``generate`` block would otherwise run with the defaults):
        the accepted ones are its named parameters after ``features``. A ``generate`` that takes
        only ``**options`` accepts anything."""
        parameters = list(inspect.signature(cls.generate).parameters.values())[2:]  # self, features
        named = [p.name for p in parameters if p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)]
        if not named and any(p.kind is p.VAR_KEYWORD for p in parameters):
            return
        unknown = sorted(set(options) - set(named))
        if unknown:
            raise ValueError(f"{cls.__name__}.generate has no option {', '.join(unknown)}; it "
                             f"takes: {', '.join(named) or '(none)'}")

    @classmethod
    def hub_models(cls, config: dict[str, Any]) -> list[tuple[str, str]]:
        """(name, what) of every hub model or tokenizer building from ``config`` would load,
        checked together before a run starts (default: none)."""
        return []

    def __init__(self) -> None:
        nn.Module.__init__(self)

    @property
    def config(self) -> dict[str, Any]:
        """Constructor arguments, key for key, so ``type(self)(**self.config)`` rebuilds it."""
        raise NotImplementedError

    def loss(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def forward(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        """The training forward pass is the loss (so DDP wrappers see a forward call)."""
        return self.loss(batch)

    @torch.no_grad()
    def generate(self, features: torch.Tensor, **options: Any) -> list[str]:
        raise NotImplementedError

    def step_modules(self) -> list[nn.Module]:
        """The networks ``generate`` calls once per step or token: what ``dcap bench --compile``
        hands to ``torch.compile``. None by default (such a decoder is timed eager)."""
        return []

    @contextmanager
    def evaluating(self) -> Iterator[None]:
        """Eval mode inside the block, the previous mode restored after it. Already in eval mode
        (the usual case at inference) nothing is toggled: ``train()`` walks every submodule,
        which costs more than a tiny decoder's forward pass at batch 1."""
        if not self.training:
            yield
            return
        self.eval()
        try:
            yield
        finally:
            self.train()

    def save_pretrained(self, directory: str | Path) -> None:
        from diffusion_captioner.checkpoint import save_decoder

        save_decoder(self, directory)

    @classmethod
    def from_pretrained(cls, directory: str | Path, **overrides: Any) -> CaptionDecoder:
        from diffusion_captioner.checkpoint import load_decoder

        return load_decoder(directory, expected_base=cls, **overrides)

    @property
    def device(self) -> torch.device:
        """Where the parameters (else the buffers) live; CPU for a decoder with neither. Only
        the first is looked at: this is called on every generation step."""
        first = next(itertools.chain(self.parameters(), self.buffers()), None)
        return first.device if first is not None else torch.device("cpu")


@dataclass(frozen=True)
class CaptionRecord:
    """One image of a dataset: its id, where its pixels come from, its reference captions."""

    image_id: int
    image: str  # a file path, or a dataset-specific source the dataset's load_image understands
    captions: tuple[str, ...]
    split: Split
    meta: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)


class CaptionDataset(Registrable):
    """A captioning data set: records with image id, image source, captions and split.

    Subclasses implement :meth:`records` and :meth:`load_image` and set ``fingerprint`` (what
    makes two instances give the same images: it keys the feature cache).
    """

    fingerprint: str

    def records(self, split: Split | None = None) -> list[CaptionRecord]:
        raise NotImplementedError

    def load_image(self, record: CaptionRecord) -> Image.Image:
        """The record's image as an RGB PIL image; raises OSError/ValueError on a bad file."""
        from diffusion_captioner.images import load_rgb

        return load_rgb(record.image)

    def group(self, record: CaptionRecord) -> str | None:
        """The record's group for per-group metrics (nocaps: its domain), or None.

        Optional hook: by default ``record.meta["group"]`` when the dataset put one there;
        ``compare`` scores the test split per group when any test record has one.
        """
        group = record.meta.get("group")
        return None if group is None else str(group)

    def __iter__(self) -> Iterator[CaptionRecord]:
        return iter(self.records())


ROLES: dict[Role, type[Registrable]] = {
    "decoder": CaptionDecoder,
    "encoder": ImageEncoder,
    "dataset": CaptionDataset,
}


# --------------------------------------------------------------------------------------------
# Loading: built-ins, user packages, entry points
# --------------------------------------------------------------------------------------------
_loaded_builtins = False
_loaded_entry_points: set[Role] = set()
#: Plugins that failed to load: "group:name" -> one-line error. Shown by `dcap list`.
plugin_errors: dict[str, str] = {}


def load_builtins() -> None:
    """Import the modules whose decorators register the shipped components (once)."""
    global _loaded_builtins
    if _loaded_builtins:
        return
    _loaded_builtins = True
    for module in _BUILTIN_MODULES:
        importlib.import_module(module)
    for module in ("baselines.mnic", "baselines.nearest", "diffusion_captioner.diffusion.decoder"):
        try:  # later decoders: present once their issue lands
            importlib.import_module(module)
        except ModuleNotFoundError as error:
            if error.name is None or not module.startswith(error.name):
                raise


def include_package(name: str) -> None:
    """Import ``name`` (and, for a package, every submodule) so its decorators register classes."""
    try:
        module = importlib.import_module(name)
    except Exception as error:  # noqa: BLE001 - any import failure becomes one clear line
        raise ComponentError(
            f"--include-package {name}: cannot import it ({type(error).__name__}: {error}); "
            "is it on PYTHONPATH?"
        ) from error
    path = getattr(module, "__path__", None)
    if path:
        import pkgutil

        for info in pkgutil.walk_packages(path, prefix=f"{name}."):
            importlib.import_module(info.name)


def load_entry_points(role: Role) -> None:
    """Load every plugin of the role's entry-point group; report and skip broken ones."""
    if role in _loaded_entry_points:
        return
    _loaded_entry_points.add(role)
    group = _ENTRY_POINT_GROUPS[role]
    for entry_point in importlib.metadata.entry_points(group=group):
        base = ROLES[role]
        if base.is_registered(entry_point.name):
            continue
        try:
            loaded = entry_point.load()
        except Exception as error:  # noqa: BLE001 - a broken plugin must not stop the program
            message = f"{type(error).__name__}: {error}"
            plugin_errors[f"{group}:{entry_point.name}"] = message
            logger.warning("plugin %s from %s failed to load: %s", entry_point.name, group, message)
            continue
        if inspect.isclass(loaded) and issubclass(loaded, base):
            if not base.is_registered(entry_point.name):
                base.register(entry_point.name)(loaded)
        elif not base.is_registered(entry_point.name):
            plugin_errors[f"{group}:{entry_point.name}"] = (
                f"{entry_point.value} is not a {base.__name__} subclass"
            )


def available(role: Role) -> list[str]:
    """Registered names of a role (built-ins and entry-point plugins loaded)."""
    load_builtins()
    load_entry_points(role)
    return sorted(ROLES[role].list_available())


def resolve(role: Role, name: str) -> type:
    """The class registered as ``name`` for ``role``, a dotted class path, or an entry point.

    Raises :class:`ComponentError` naming the registered choices and how to add one.
    """
    load_builtins()
    base = ROLES[role]
    if base.is_registered(name):
        return base.by_name(name)
    if "." in name:
        try:
            return base.by_name(name)
        except (RegistrationError, ImportError) as error:
            raise ComponentError(f"{role} {name!r}: {error}") from error
    load_entry_points(role)
    if base.is_registered(name):
        return base.by_name(name)
    choices = ", ".join(sorted(base.list_available())) or "(none)"
    raise ComponentError(
        f"unknown {role} {name!r}; registered: {choices}. Add one with "
        f"@{base.__name__}.register('{name}') in a module passed to --include-package, a dotted "
        f"path pkg.module.Class, or an entry point in group '{_ENTRY_POINT_GROUPS[role]}'"
    )


def build(role: Role, cfg: dict[str, Any], **extra: Any) -> Any:
    """Build a component from ``cfg``: ``type`` picks the class, the other keys (and ``extra``)
    are its constructor's arguments. An unexpected key fails with the accepted ones listed."""
    cfg = dict(cfg)
    if "type" not in cfg:
        raise ComponentError(f"{role} config {cfg} has no 'type' key naming the class")
    name = cfg.pop("type")
    cls = resolve(role, name)
    arguments = {**cfg, **extra}
    signature = inspect.signature(cls.__init__)
    takes_kwargs = any(p.kind is p.VAR_KEYWORD for p in signature.parameters.values())
    if not takes_kwargs:
        accepted = [p for p in signature.parameters if p != "self"]
        unknown = sorted(set(arguments) - set(accepted))
        if unknown:
            raise ComponentError(
                f"{role} {name!r} does not take {', '.join(unknown)}; it takes: {', '.join(accepted)}"
            )
    return cls(**arguments)


def describe(cls: type) -> str:
    """First line of a class docstring."""
    doc = inspect.getdoc(cls) or ""
    return doc.strip().splitlines()[0] if doc.strip() else "(no description)"


def registered_name(cls: type) -> str:
    """The name ``cls`` is registered under for its role (its dotted path if unregistered)."""
    for base in ROLES.values():
        if issubclass(cls, base):
            for name, registered in base.iter_registered():
                if registered is cls and "." not in name:
                    return name
    return f"{cls.__module__}.{cls.__qualname__}"
