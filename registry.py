"""Role base classes and the one registry every component goes through.

Three roles, each a :class:`registrable.Registrable` base: :class:`ImageEncoder`,
:class:`CaptionDecoder` and :class:`CaptionDataset`. Components register on the role base
(``@CaptionDecoder.register("clipcap")``) and are built from a plain config dict whose ``type``
names the class and whose other keys are its constructor's arguments::

    decoder = build("decoder", {"type": "clipcap", "feature_dim": 512, "prefix_length": 10})

A name is resolved, in order, from: the registry (the built-ins register on first use through
this package's own entry points, as a plugin's would); a dotted path ``pkg.module.Class``; the
entry-point group ``diffusion_captioner.<role>s`` (loaded lazily, on a miss, a broken plugin
reported and skipped). Users add their own modules with :func:`include_package` (the CLI's
``--include-package``). The decoder contract (typed generation options, declared capabilities,
the recorded config) is :class:`CaptionDecoder`'s docstring.
"""

from __future__ import annotations

import copy
import functools
import importlib
import importlib.metadata
import inspect
import itertools
import logging
import types
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Literal

import torch
from registrable import Registrable, RegistrationError
from torch import nn

from diffusion_captioner.checkpoint import load_decoder, save_decoder
from diffusion_captioner.errors import ComponentError
from diffusion_captioner.generation import (
    Capabilities,
    DecoderKind,
    GenerationOptions,
    ScoredSamples,
)

__all__ = ["SPLITS", "Capabilities", "CaptionDataset", "CaptionDecoder", "CaptionRecord",
           "ComponentError", "DecoderKind", "GenerationOptions", "ImageEncoder", "Role",
           "ScoredSamples", "Split",
           "available", "build", "describe", "include_package", "registered_name", "resolve"]

if TYPE_CHECKING:
    from PIL import Image

logger = logging.getLogger(__name__)

Role = Literal["decoder", "encoder", "dataset"]
Split = Literal["train", "val", "test"]
SPLITS: tuple[Split, ...] = ("train", "val", "test")

#: The distribution whose own entry points register the shipped components (pyproject.toml).
DISTRIBUTION = "diffusion_captioner"
_ENTRY_POINT_GROUPS: dict[Role, str] = {
    "decoder": "diffusion_captioner.decoders",
    "encoder": "diffusion_captioner.encoders",
    "dataset": "diffusion_captioner.datasets",
}


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
    """A captioning decoder conditioned on one (D,) image feature per image: the contract.

    Required of a subclass (register it with ``@CaptionDecoder.register("name")``):

    * ``__init__(self, feature_dim, ...)``: JSON-able keyword arguments, recorded as
      :attr:`config` when the constructor returns (never copied by hand), so that
      ``type(d)(**d.config)`` rebuilds it and checkpoints reload it;
    * ``loss(batch) -> {"loss": scalar, ...named parts to log}``; ``batch`` is
      ``{"features": (B, D), "captions": list[str]}`` plus ``text_features`` (B, D) when
      :meth:`uses_text_features` says so;
    * ``generate_batch(features, options) -> list[str]``: B captions for (B, D) features, with
      ``options`` an instance of the class's ``Options``; called by :meth:`generate` under
      ``torch.no_grad`` in eval mode, never with an empty batch.

    Optional, each with a default:

    * ``Options``: a frozen :class:`GenerationOptions` dataclass (default: no options);
    * ``capabilities``: a :class:`Capabilities` record (kind, trajectory, step option and
      sweep, fixed-token option, sampling; default: a single-pass decoder with none of them);
    * ``generate_trajectory_batch(features, options) -> list[list[str]]`` when
      ``capabilities.trajectory``: per image, the caption after every step;
    * ``sample_batch(features, options, num_samples, generator) -> list[list[str]]`` when
      ``capabilities.sampling``: per image, ``num_samples`` captions drawn from the decoder's
      distribution with every random number taken from ``generator`` (:meth:`generate_samples`);
    * ``scored_sample_batch(features, options, num_samples, generator) -> ScoredSamples`` when
      ``capabilities.log_probs``: the samples with their differentiable log-probabilities
      (:meth:`sample_with_log_probs`, what self-critical training needs);
    * ``save_extra(directory)`` / ``checkpoint_overrides(directory)``: extra checkpoint files
      and the constructor arguments that rebuild from them (no-ops);
    * ``check_config`` / ``check_generate_options``: plan-time refusals (default: the options
      are parsed, nothing else);
    * ``uses_text_features``, ``hub_models``, ``step_modules``: see each.
    """

    #: The generation options ``generate`` takes: a frozen GenerationOptions dataclass.
    Options: ClassVar[type[GenerationOptions]] = GenerationOptions
    #: What this decoder can do (read by compare, the report, the bench and the web page).
    capabilities: ClassVar[Capabilities] = Capabilities()
    #: True when ``loss`` wants ``batch["text_features"]`` (CLIP text features of each caption);
    #: :meth:`uses_text_features` may say so per configuration.
    needs_text_features: ClassVar[bool] = False

    def __init_subclass__(cls, **kwargs: Any) -> None:
        """Record the constructor's arguments as :attr:`config` (as diffusers'
        ``register_to_config`` does) and check the declared capabilities against ``Options``."""
        super().__init_subclass__(**kwargs)
        cls.capabilities.check_against(cls.Options, cls.__name__)
        if "__init__" not in cls.__dict__:
            return
        constructor = cls.__dict__["__init__"]
        signature = inspect.signature(constructor)

        @functools.wraps(constructor)
        def __init__(self: CaptionDecoder, *args: Any, **kwargs: Any) -> None:
            constructor(self, *args, **kwargs)
            bound = signature.bind(self, *args, **kwargs)
            bound.apply_defaults()
            recorded: dict[str, Any] = {}
            for name, value in list(bound.arguments.items())[1:]:  # self
                kind = signature.parameters[name].kind
                if kind is inspect.Parameter.VAR_POSITIONAL:
                    raise TypeError(f"{cls.__name__}: a decoder's constructor takes keyword "
                                    f"arguments only, not *{name}")
                recorded.update(value if kind is inspect.Parameter.VAR_KEYWORD else {name: value})
            # the outermost constructor returns last: a subclass's arguments win
            object.__setattr__(self, "_recorded_config", copy.deepcopy(recorded))
            object.__setattr__(self, "_hparams", types.MappingProxyType(self._recorded_config))

        cls.__init__ = __init__  # type: ignore[method-assign]

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
    def check_generate_options(cls, options: dict[str, Any],
                               config: dict[str, Any] | None = None) -> GenerationOptions:
        """The parsed options of a preset's ``generate`` block, when the plan is made: an
        unknown or mistyped option fails in one line naming the accepted ones. ``config``: the
        decoder config they will run with, for a subclass that checks the two together."""
        return cls.Options.parse(options, owner=cls.__name__)

    @classmethod
    def hub_models(cls, config: dict[str, Any]) -> list[tuple[str, str]]:
        """(name, what) of every hub model or tokenizer building from ``config`` would load,
        checked together before a run starts (default: none)."""
        return []

    @classmethod
    def registered_name(cls) -> str:
        """The name this class is registered under (its dotted path when it is not)."""
        return registered_name(cls)

    @classmethod
    def class_for(cls, name: str) -> type[CaptionDecoder]:
        """The decoder class ``name`` (registered, dotted path or entry point) if it is a
        subclass of ``cls``; :class:`ComponentError` otherwise."""
        found = (CaptionDecoder.by_name(name) if CaptionDecoder.is_registered(name)
                 else resolve("decoder", name))
        if not issubclass(found, cls):
            raise ComponentError(f"decoder {name!r} ({found.__name__}) is not a {cls.__name__}")
        return found

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> CaptionDecoder:
        """``cls(**config)``; a key the constructor does not take fails naming those it does."""
        return construct(cls, "decoder", cls.registered_name(), config)

    @classmethod
    def upgrade_config(cls, saved: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
        """A checkpoint's saved config -> (today's constructor arguments, generation defaults
        it carried): how a decoder whose arguments changed keeps loading old checkpoints
        (default: unchanged, no defaults)."""
        return saved, {}

    def __init__(self) -> None:
        nn.Module.__init__(self)
        #: Generation defaults a loaded checkpoint carried (:meth:`upgrade_config`): under the
        #: caller's options, over the class's.
        self.generation_defaults: dict[str, Any] = {}

    @property
    def config(self) -> dict[str, Any]:
        """Constructor arguments, key for key, as recorded when the constructor returned."""
        try:
            return copy.deepcopy(self.__dict__["_recorded_config"])
        except KeyError:
            raise AttributeError(f"{type(self).__name__}.config is recorded when the constructor "
                                 "returns; it is not available inside it") from None

    @property
    def hparams(self) -> Mapping[str, Any]:
        """:attr:`config` read-only and uncopied, for the decoder's own hot paths."""
        return self.__dict__["_hparams"]

    def loss(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def forward(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        """The training forward pass is the loss (so DDP wrappers see a forward call)."""
        return self.loss(batch)

    def options(self, options: Mapping[str, Any] | GenerationOptions | None = None
                ) -> GenerationOptions:
        """``Options`` from the class defaults, the loaded checkpoint's
        :attr:`generation_defaults` and then ``options``."""
        given = (options.as_dict() if isinstance(options, GenerationOptions)
                 else dict(options or {}))
        return self.Options.parse({**self.generation_defaults, **given},
                                  owner=type(self).__name__)

    @torch.no_grad()
    def generate(self, features: torch.Tensor, **options: Any) -> list[str]:
        """(B, D) features -> B captions; ``options`` are fields of the class's ``Options``
        (an unknown one fails naming those it has). Eval mode inside, the mode restored."""
        return self._on_batch(self.generate_batch, features, options)

    @torch.no_grad()
    def generate_trajectory(self, features: torch.Tensor, **options: Any) -> list[list[str]]:
        """Per image, the caption after every step (the last is :meth:`generate`'s); only for
        a decoder whose ``capabilities.trajectory`` is set."""
        if not self.capabilities.trajectory:
            raise ValueError(f"{type(self).__name__} returns no trajectory "
                             "(capabilities.trajectory is False)")
        return self._on_batch(self.generate_trajectory_batch, features, options)

    def _on_batch(self, method: Any, features: torch.Tensor, options: dict[str, Any]) -> list:
        """``method(features, parsed options)`` in eval mode; ``[]`` for an empty batch."""
        parsed = self.options(options)
        if features.shape[0] == 0:
            return []
        with self.evaluating():
            return method(features, parsed)

    @torch.no_grad()
    def generate_samples(self, features: torch.Tensor, num_samples: int = 5, seed: int = 0, *,
                         generator: torch.Generator | None = None,
                         **options: Any) -> list[list[str]]:
        """(B, D) features -> per image ``num_samples`` captions drawn from the decoder's
        distribution; only for a decoder whose ``capabilities.sampling`` is set.

        A method beside :meth:`generate` rather than a ``num_samples`` option of it: it returns
        B lists of n captions, not B captions, and :meth:`generate` (greedy, beam search, the
        deterministic samplers) stays exactly what it was. ``options`` are the class's
        ``Options`` (its sampling fields, e.g. ``sample_temperature``, apply here only).
        Every random number comes from a private CPU ``torch.Generator`` seeded with ``seed``
        (or the caller's ``generator``, to continue one stream over several batches): the same
        seed and batches give the same captions, another seed others, and the global RNG is
        never touched."""
        if not self.capabilities.sampling:
            raise ValueError(f"{type(self).__name__} cannot sample (capabilities.sampling is "
                             "False): use generate, or a decoder that declares sampling")
        if int(num_samples) < 1:
            raise ValueError(f"{type(self).__name__}: num_samples must be >= 1, got {num_samples}")
        parsed = self.options(options)
        if features.shape[0] == 0:
            return []
        generator = generator if generator is not None else torch.Generator().manual_seed(int(seed))
        with self.evaluating():
            samples = self.sample_batch(features, parsed, int(num_samples), generator)
        if len(samples) != features.shape[0] or any(len(s) != num_samples for s in samples):
            raise RuntimeError(f"{type(self).__name__}.sample_batch returned {len(samples)} lists "
                               f"for {features.shape[0]} images; each needs {num_samples} captions")
        return samples

    def sample_with_log_probs(self, features: torch.Tensor, num_samples: int,
                              generator: torch.Generator, **options: Any) -> ScoredSamples:
        """(B, D) features -> :class:`ScoredSamples`: per image ``num_samples`` captions drawn
        as :meth:`generate_samples` draws them, with the (B, n) log-probability of each, which
        carries the gradient (self-critical training; ``capabilities.log_probs``).

        Unlike :meth:`generate_samples` it runs with gradients and in the current mode (the
        trainer's): a decoder draws its samples without gradients and then scores them once
        with them (its ``scored_sample_batch``)."""
        if not self.capabilities.log_probs:
            raise ValueError(f"{type(self).__name__} gives no log-probabilities of its samples "
                             "(capabilities.log_probs is False): it cannot be trained by SCST")
        if int(num_samples) < 1 or features.shape[0] == 0:
            raise ValueError(f"{type(self).__name__}: sample_with_log_probs needs >= 1 image "
                             f"and num_samples >= 1, got {features.shape[0]} and {num_samples}")
        parsed = self.options(options)
        scored = self.scored_sample_batch(features, parsed, int(num_samples), generator)
        shape = (features.shape[0], int(num_samples))
        if (len(scored.captions) != shape[0] or any(len(c) != shape[1] for c in scored.captions)
                or tuple(scored.log_probs.shape) != shape):
            raise RuntimeError(f"{type(self).__name__}.scored_sample_batch must return {shape[0]} "
                               f"lists of {shape[1]} captions and ({shape[0]}, {shape[1]}) "
                               "log-probabilities")
        return scored

    def scored_sample_batch(self, features: torch.Tensor, options: Any, num_samples: int,
                            generator: torch.Generator) -> ScoredSamples:
        """(B, D) features, B >= 1 -> :class:`ScoredSamples` (``capabilities.log_probs``;
        gradients on, the caller's mode)."""
        raise NotImplementedError

    def generate_batch(self, features: torch.Tensor, options: Any) -> list[str]:
        """(B, D) features, B >= 1 -> B captions (no_grad and eval mode already set)."""
        raise NotImplementedError

    def sample_batch(self, features: torch.Tensor, options: Any, num_samples: int,
                     generator: torch.Generator) -> list[list[str]]:
        """(B, D) features, B >= 1 -> per image ``num_samples`` sampled captions, every random
        number drawn from ``generator`` (``capabilities.sampling``; no_grad and eval mode set)."""
        raise NotImplementedError

    def generate_trajectory_batch(self, features: torch.Tensor, options: Any) -> list[list[str]]:
        """(B, D) features -> per image the caption after every step (``capabilities.trajectory``)."""
        raise NotImplementedError

    def step_modules(self) -> list[nn.Module]:
        """The networks ``generate`` calls once per step or token: what ``dcap bench --compile``
        hands to ``torch.compile``. None by default (such a decoder is timed eager)."""
        return []

    def save_extra(self, directory: str | Path) -> None:
        """Write files the checkpoint needs beside its config and weights (default: none)."""

    @classmethod
    def checkpoint_overrides(cls, directory: str | Path) -> dict[str, Any]:
        """Constructor arguments that replace the saved config's when loading from
        ``directory`` (e.g. the tokenizer files :meth:`save_extra` wrote; default: none)."""
        return {}

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
        save_decoder(self, directory)

    @classmethod
    def from_pretrained(cls, directory: str | Path, **overrides: Any) -> CaptionDecoder:
        return load_decoder(directory, cls, **overrides)

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
    """Register the shipped components the way a plugin is registered: through the entry points
    of this package's own distribution (``[project.entry-points."diffusion_captioner.*"]`` in
    pyproject.toml), once. A built-in that fails to load is a bug, not a broken plugin: it
    raises."""
    global _loaded_builtins
    if _loaded_builtins:
        return
    try:
        distribution = importlib.metadata.distribution(DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError as error:
        raise ComponentError(f"the {DISTRIBUTION} package is not installed, so its built-in "
                             "components (registered through its entry points) are missing: "
                             "run `pip install -e .` in the checkout (make install)") from error
    roles = {group: role for role, group in _ENTRY_POINT_GROUPS.items()}
    for entry_point in distribution.entry_points:
        if entry_point.group in roles:
            _register_entry_point(roles[entry_point.group], entry_point)
    _loaded_builtins = True


def _register_entry_point(role: Role, entry_point: importlib.metadata.EntryPoint) -> None:
    """Load ``entry_point`` and register the class it names under its name (once)."""
    base = ROLES[role]
    if base.is_registered(entry_point.name):
        return
    loaded = entry_point.load()
    if not (inspect.isclass(loaded) and issubclass(loaded, base)):
        raise ComponentError(f"entry point {entry_point.name} = {entry_point.value} is not a "
                             f"{base.__name__} subclass")
    if not base.is_registered(entry_point.name):
        base.register(entry_point.name)(loaded)


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
        try:
            _register_entry_point(role, entry_point)
        except Exception as error:  # noqa: BLE001 - a broken plugin must not stop the program
            message = f"{type(error).__name__}: {error}"
            plugin_errors[f"{group}:{entry_point.name}"] = message
            logger.warning("plugin %s from %s failed to load: %s", entry_point.name, group, message)


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
    return construct(resolve(role, name), role, name, {**cfg, **extra})


def construct(cls: type, role: Role, name: str, arguments: dict[str, Any]) -> Any:
    """``cls(**arguments)``; an argument its constructor does not take fails in one line
    naming the ones it does (unless it takes ``**kwargs``)."""
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
