"""What a decoder declares about generation: its typed options and its capabilities.

Every :class:`~registry.CaptionDecoder` names a frozen dataclass of generation options
(``Options``) and a :class:`Capabilities` record (``capabilities``). compare, the report, the
bench and the web page read both from the class; nothing is guessed from signatures or
attributes::

    @dataclass(frozen=True)
    class BeamOptions(GenerationOptions):
        num_beams: int = 1
        length_penalty: float = 1.0

    BeamOptions.parse({"num_beams": 3})     # BeamOptions(num_beams=3, length_penalty=1.0)
    BeamOptions.parse({"num_beam": 3})      # ValueError naming num_beams and length_penalty
    BeamOptions.parse({"num_beams": "3"})   # ValueError: num_beams must be int, got '3'

The options are validated when a run's plan is made, before any training, and they are not part
of the model: changing them never retrains anything.
"""

from __future__ import annotations

import dataclasses
import functools
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal, TypeVar

#: How a decoder produces a caption, as the web page and the report show it: token by token
#: (``autoregressive``), K parallel refinement passes (``iterative``), one parallel pass
#: (``single``), or by looking a caption up (``retrieval``).
DecoderKind = Literal["autoregressive", "iterative", "single", "retrieval"]

OptionsT = TypeVar("OptionsT", bound="GenerationOptions")


@dataclass(frozen=True)
class Capabilities:
    """What a decoder can do, declared once on its class.

    Attributes:
        kind: see :data:`DecoderKind`.
        trajectory: ``generate_trajectory`` returns the caption after every step.
        step_option: the generation option that counts the steps or passes (``"steps"``), for
            the report's sweep, the bench's ``--steps`` and the web page's step picker.
        step_sweep: the step counts the compare report and the bench sweep.
        fixed_tokens_option: the option that makes an autoregressive decoder write exactly N
            tokens, its end token ignored (how ``dcap bench --tokens`` times untrained models).
        sampling: ``generate_samples`` draws captions from the decoder's distribution (its
            ``sample_batch``); compare's diversity phase skips, with a line in the report, a
            decoder that does not declare it.
        log_probs: ``sample_with_log_probs`` returns each sample's differentiable
            log-probability (its ``scored_sample_batch``), which self-critical sequence training
            (:mod:`diffusion_captioner.scst`) needs; implies ``sampling``.
    """

    kind: DecoderKind = "single"
    trajectory: bool = False
    step_option: str | None = None
    step_sweep: tuple[int, ...] = ()
    fixed_tokens_option: str | None = None
    sampling: bool = False
    log_probs: bool = False

    def __post_init__(self) -> None:
        if self.kind not in typing.get_args(DecoderKind):
            raise ValueError(f"Capabilities.kind {self.kind!r}: choose one of "
                             f"{', '.join(typing.get_args(DecoderKind))}")
        if self.step_sweep and self.step_option is None:
            raise ValueError("Capabilities: a step_sweep needs the step_option it sweeps")
        if self.log_probs and not self.sampling:
            raise ValueError("Capabilities: log_probs scores samples; it needs sampling=True")

    def check_against(self, options: type[GenerationOptions], owner: str) -> None:
        """The options this record names must be fields of ``options``."""
        for what in ("step_option", "fixed_tokens_option"):
            name = getattr(self, what)
            if name is not None and name not in options.names():
                raise TypeError(f"{owner}: capabilities.{what} {name!r} is not a generation "
                                f"option (it has: {', '.join(options.names()) or 'none'})")


@dataclass(frozen=True)
class ScoredSamples:
    """n sampled captions per image with the log-probability of each under the decoder's
    sampling distribution, for policy-gradient training (SCST).

    Attributes:
        captions: B lists of n captions, image-major.
        log_probs: (B, n) ``log p(c_bj | z_b)`` summed over the decisions that drew sample
            j of image b (its tokens, and its length where the decoder draws one); it carries
            the gradient of the decoder's parameters.
        decisions: (B, n) how many decisions each sum holds (to normalise a loss per token).
    """

    captions: list[list[str]]
    log_probs: Any  # torch.Tensor (B, n), differentiable
    decisions: Any  # torch.Tensor (B, n)


@dataclass(frozen=True)
class GenerationOptions:
    """Base of a decoder's generation options: a frozen dataclass whose fields are the options
    and whose defaults are the defaults. The base has none."""

    @classmethod
    def names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(cls))

    @classmethod
    def parse(cls: type[OptionsT], options: Mapping[str, Any] | GenerationOptions | None = None,
              owner: str = "decoder") -> OptionsT:
        """Options from a mapping (a preset's ``generate`` block, keyword arguments): an unknown
        key, or a value of the wrong type, fails in one line naming the accepted ones."""
        if isinstance(options, cls):
            return options
        given = dict(options.as_dict() if isinstance(options, GenerationOptions) else options or {})
        unknown = sorted(set(given) - set(cls.names()))
        if unknown:
            raise ValueError(f"{owner} has no generation option {', '.join(unknown)}; it takes: "
                             f"{', '.join(cls.names()) or '(none)'}")
        hints = _type_hints(cls)
        values = {name: _checked(value, hints[name], f"{owner}: generation option {name}")
                  for name, value in given.items()}
        return cls(**values)

    def replace(self: OptionsT, **changes: Any) -> OptionsT:
        """A copy with ``changes`` applied, checked like :meth:`parse`."""
        return self.parse({**self.as_dict(), **changes}, owner=type(self).__name__)

    def as_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}


@functools.cache
def _type_hints(cls: type) -> dict[str, Any]:
    """The resolved field types of an options class (resolved once: ``generate`` parses its
    options on every call)."""
    return typing.get_type_hints(cls)


def _checked(value: Any, hint: Any, what: str) -> Any:
    """``value`` if it is of type ``hint`` (int, float, bool, str, a Literal, an optional or a
    union of these; ints pass as floats), else ValueError naming ``what``."""
    ok, converted = _matches(value, hint)
    if not ok:
        raise ValueError(f"{what} must be {_describe(hint)}, got {value!r}")
    return converted


def _matches(value: Any, hint: Any) -> tuple[bool, Any]:
    origin = typing.get_origin(hint)
    if origin is Literal:
        return value in typing.get_args(hint), value
    if origin in (typing.Union, types.UnionType):
        for option in typing.get_args(hint):
            ok, converted = _matches(value, option)
            if ok:
                return True, converted
        return False, value
    if hint is type(None):
        return value is None, value
    if hint is bool:
        return isinstance(value, bool), value
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool), value
    if hint is float:
        number = isinstance(value, int | float) and not isinstance(value, bool)
        return number, float(value) if number else value
    if hint is str:
        return isinstance(value, str), value
    return True, value  # another type: the decoder checks it


def _describe(hint: Any) -> str:
    origin = typing.get_origin(hint)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(hint))
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe(a) for a in typing.get_args(hint))
    if hint is type(None):
        return "null"
    return getattr(hint, "__name__", str(hint))
