"""The embedded ``shapes`` dataset: procedurally rendered coloured shapes with human-like captions.

Every image is drawn from a *scene*: one or two objects, each a shape (circle, square, triangle,
diamond, cross) in one of six well-separated colours and one of two sizes, on a plain light
background. Two objects stand side by side (``horizontal``) or one over the other
(``vertical``), far apart along that axis and close across it, so "left of" / "above" is never
ambiguous. ``objects[0]`` is always the left (or top) one.

Each image has five distinct reference captions sampled from weighted sentence templates and
synonyms ("a small red circle to the left of a large blue square", "a big blue square to the
right of a small red circle", "there is a red circle and a blue square", ...), so the references
vary the way human references do while :func:`canonical_caption` -- the single most typical
phrasing -- is the mode a perfect model converges to.

Everything is a pure function of ``(seed, split, index)``: scene and caption random streams are
seeded from a SHA-256 of that key (never Python's salted ``hash``), so the same arguments give
the same captions and byte-identical pixels in any process, and the test split does not change
when ``num_train`` does.
"""

from __future__ import annotations

import bisect
import hashlib
import itertools
import json
import random
import re
import string
from collections.abc import Mapping, Sequence
from typing import Any, Literal

from PIL import Image, ImageDraw

from registry import SPLITS, CaptionDataset, CaptionRecord, Split

#: Bump whenever scenes, pixels or captions change for the same arguments (keys feature caches).
GENERATOR_VERSION = 1
#: Reference captions per image.
NUM_CAPTIONS = 5

ShapeName = Literal["circle", "square", "triangle", "diamond", "cross"]
ColorName = Literal["red", "orange", "yellow", "green", "blue", "purple"]
SizeName = Literal["small", "large"]
Axis = Literal["horizontal", "vertical"]
Relation = Literal["left", "right", "above", "below"]

SHAPES: tuple[ShapeName, ...] = ("circle", "square", "triangle", "diamond", "cross")
#: Base RGB of each colour; each object jitters every channel by up to ``_COLOR_JITTER``.
COLORS: dict[ColorName, tuple[int, int, int]] = {
    "red": (215, 35, 35),
    "orange": (245, 125, 15),
    "yellow": (230, 200, 0),
    "green": (35, 155, 55),
    "blue": (35, 75, 215),
    "purple": (135, 45, 170),
}
#: Half-extent of an object as a fraction of the image side (jittered by +-6 %).
SIZES: dict[SizeName, float] = {"small": 0.11, "large": 0.2}

_COLOR_NAMES: tuple[ColorName, ...] = tuple(COLORS)
_SIZE_NAMES: tuple[SizeName, ...] = tuple(SIZES)
_COLOR_JITTER = 12
_MARGIN = 0.04  # free border, fraction of the image side
_GAP = 0.06  # minimum free space between two objects along their axis
_CROSS_SPREAD = 0.05  # how far two objects may sit off their shared line (across the axis)
_SINGLE_SPREAD = 0.1  # how far a lone object may sit off the centre
_SUPERSAMPLE = 4  # anti-aliasing: draw at this many times the size, then box-filter down

# --------------------------------------------------------------------------------------------
# Wording. Every option list is ((phrase, weight), ...); the first phrase is the canonical one.
# --------------------------------------------------------------------------------------------
Options = tuple[tuple[str, float], ...]

SHAPE_WORDS: dict[ShapeName, Options] = {
    "circle": (("circle", 0.92), ("disk", 0.08)),
    "square": (("square", 0.88), ("box", 0.12)),
    "triangle": (("triangle", 1.0),),
    "diamond": (("diamond", 0.9), ("rhombus", 0.1)),
    "cross": (("cross", 0.85), ("plus sign", 0.15)),
}
SIZE_WORDS: dict[SizeName, Options] = {
    "small": (("small", 0.65), ("little", 0.2), ("tiny", 0.15)),
    "large": (("large", 0.6), ("big", 0.4)),
}
#: "{rel}": how the first-named object relates to the second.
RELATION_WORDS: dict[Relation, Options] = {
    "left": (("to the left of", 0.7), ("left of", 0.15), ("on the left of", 0.15)),
    "right": (("to the right of", 0.7), ("right of", 0.15), ("on the right of", 0.15)),
    "above": (("above", 0.8), ("over", 0.2)),
    "below": (("below", 0.6), ("under", 0.25), ("beneath", 0.15)),
}
#: "{end}": where one object is in the picture ("... on the left and ... on the right").
END_WORDS: dict[Relation, Options] = {
    "left": (("on the left", 1.0),),
    "right": (("on the right", 1.0),),
    "above": (("at the top", 1.0),),
    "below": (("at the bottom", 1.0),),
}
NEAR_WORDS: Options = (("next to", 0.7), ("beside", 0.3))
#: Probability that a caption names the sizes (all objects or none).
SIZE_MENTION = 0.8

# Placeholders: {A}/{B} "a small red circle" (A = left/top object, B = the other),
# {the_A}/{the_B} "the small red circle", {bare_A} "small red circle", {rel_AB} A's relation to B,
# {rel_BA} B's relation to A, {end_A}/{end_B} where each one is, {near} "next to"/"beside".
SINGLE_TEMPLATES: tuple[tuple[str, float], ...] = (
    ("{A}", 0.42),
    ("there is {A}", 0.12),
    ("{A} in the middle", 0.07),
    ("{A} in the center", 0.05),
    ("{A} on a plain background", 0.06),
    ("{A} on a light background", 0.05),
    ("a picture of {A}", 0.06),
    ("an image of {A}", 0.04),
    ("a single {bare_A}", 0.06),
    ("one {bare_A}", 0.04),
    ("just {A}", 0.03),
)
#: (template, weight, horizontal pairs only).
PAIR_TEMPLATES: tuple[tuple[str, float, bool], ...] = (
    ("{A} {rel_AB} {B}", 0.32, False),
    ("{B} {rel_BA} {A}", 0.14, False),
    ("{A} is {rel_AB} {B}", 0.08, False),
    ("{B} is {rel_BA} {A}", 0.04, False),
    ("{the_A} is {rel_AB} {the_B}", 0.06, False),
    ("{the_B} is {rel_BA} {the_A}", 0.03, False),
    ("there is {A} and {B}", 0.05, False),
    ("there is {B} and {A}", 0.02, False),
    ("{A} and {B}", 0.04, False),
    ("{A} {end_A} and {B} {end_B}", 0.05, False),
    ("{B} {end_B} and {A} {end_A}", 0.02, False),
    ("a picture of {A} {rel_AB} {B}", 0.03, False),
    ("an image of {A} {rel_AB} {B}", 0.02, False),
    ("{A} {near} {B}", 0.07, True),
    ("{B} {near} {A}", 0.03, True),
)
_A_BEFORE_VOWEL = re.compile(r"\ba (?=[aeiou])")


# --------------------------------------------------------------------------------------------
# Scenes
# --------------------------------------------------------------------------------------------
def _stream_seeds(seed: int, split: str, index: int) -> tuple[int, int]:
    """Two independent 64-bit seeds (scene, captions) for one image, stable across processes."""
    digest = hashlib.sha256(f"shapes/v{GENERATOR_VERSION}/{seed}/{split}/{index}".encode()).digest()
    return int.from_bytes(digest[:8], "little"), int.from_bytes(digest[8:16], "little")


def _jitter_rgb(rgb: Sequence[int], rng: random.Random, amount: int) -> list[int]:
    """Each channel moved by a uniform integer in [-amount, amount], clipped to [0, 255]."""
    span = 2 * amount + 1
    return [min(255, max(0, c - amount + int(rng.random() * span))) for c in rgb]


def _place_pair(
    r0: float, r1: float, rng: random.Random
) -> tuple[tuple[float, float], tuple[float, float]]:
    """Centres (along, across) of two objects with half-extents ``r0`` and ``r1``: the first
    before the second along the axis with at least ``_GAP`` free between them, both within
    ``_CROSS_SPREAD`` of a shared line across it, all inside the ``_MARGIN`` border."""
    need = r0 + r1 + _GAP
    lo0, hi1 = _MARGIN + r0, 1.0 - _MARGIN - r1
    a0 = rng.uniform(lo0, hi1 - need)
    a1 = rng.uniform(a0 + need, hi1)
    line = 0.5 + rng.uniform(-0.12, 0.12)
    acrosses = []
    for r in (r0, r1):
        lo, hi = _MARGIN + r, 1.0 - _MARGIN - r
        acrosses.append(min(hi, max(lo, line + rng.uniform(-_CROSS_SPREAD, _CROSS_SPREAD))))
    return (a0, acrosses[0]), (a1, acrosses[1])


def sample_scene(rng: random.Random, single_fraction: float = 0.4) -> dict[str, Any]:
    """Draw one scene: a JSON-able dict ``{"background", "axis", "relation", "objects"}``.

    Coordinates are fractions of the image side, so a scene renders at any resolution. Each
    object is ``{"shape", "color", "size", "x", "y", "r", "rgb"}`` with centre ``(x, y)`` and
    half-extent ``r``. With two objects, ``objects[0]`` is left of (``relation == "left"``) or
    above (``"above"``) ``objects[1]``; their (colour, shape) pairs differ.
    """
    level = 228 + int(rng.random() * 25)  # grey 228..252
    background = _jitter_rgb((level, level, level), rng, 4)
    count = 1 if rng.random() < single_fraction else 2
    kinds: list[tuple[ShapeName, ColorName, SizeName]] = []
    while len(kinds) < count:
        kind = (rng.choice(SHAPES), rng.choice(_COLOR_NAMES), rng.choice(_SIZE_NAMES))
        if all(kind[:2] != other[:2] for other in kinds):
            kinds.append(kind)
    radii = [SIZES[size] * rng.uniform(0.94, 1.06) for _, _, size in kinds]
    axis: Axis | None = None
    relation: Relation | None = None
    if count == 1:
        centres = [
            (
                0.5 + rng.uniform(-_SINGLE_SPREAD, _SINGLE_SPREAD),
                0.5 + rng.uniform(-_SINGLE_SPREAD, _SINGLE_SPREAD),
            )
        ]
    else:
        axis = rng.choice(("horizontal", "vertical"))
        first, second = _place_pair(radii[0], radii[1], rng)
        if axis == "horizontal":
            relation = "left"
            centres = [first, second]  # (x, y) = (along, across)
        else:
            relation = "above"
            centres = [(first[1], first[0]), (second[1], second[0])]
    objects = [
        {
            "shape": shape,
            "color": color,
            "size": size,
            "x": round(x, 5),
            "y": round(y, 5),
            "r": round(r, 5),
            "rgb": _jitter_rgb(COLORS[color], rng, _COLOR_JITTER),
        }
        for (shape, color, size), (x, y), r in zip(kinds, centres, radii, strict=True)
    ]
    return {"background": background, "axis": axis, "relation": relation, "objects": objects}


def _shape_polygon(shape: str, x: float, y: float, r: float) -> list[tuple[float, float]]:
    """Outline of a non-circle shape centred at (x, y) with half-extent r (pixels)."""
    if shape == "square":
        s = 0.85 * r
        return [(x - s, y - s), (x + s, y - s), (x + s, y + s), (x - s, y + s)]
    if shape == "triangle":
        return [(x, y - r), (x + r, y + 0.8 * r), (x - r, y + 0.8 * r)]
    if shape == "diamond":
        w, h = 0.85 * r, 1.1 * r
        return [(x, y - h), (x + w, y), (x, y + h), (x - w, y)]
    if shape == "cross":
        a, t = r, 0.36 * r
        return [
            (x - t, y - a), (x + t, y - a), (x + t, y - t), (x + a, y - t),
            (x + a, y + t), (x + t, y + t), (x + t, y + a), (x - t, y + a),
            (x - t, y + t), (x - a, y + t), (x - a, y - t), (x - t, y - t),
        ]  # fmt: skip
    raise ValueError(f"unknown shape {shape!r}; known: {', '.join(SHAPES)}")


def render_scene(
    scene: Mapping[str, Any], image_size: int = 64, antialias: bool = True
) -> Image.Image:
    """Draw ``scene`` as an ``image_size`` x ``image_size`` RGB image (deterministic pixels)."""
    factor = max(1, min(_SUPERSAMPLE, 256 // image_size)) if antialias else 1
    side = image_size * factor
    image = Image.new("RGB", (side, side), tuple(scene["background"]))
    draw = ImageDraw.Draw(image)
    for obj in scene["objects"]:
        x, y, r = obj["x"] * side, obj["y"] * side, obj["r"] * side
        fill = tuple(obj["rgb"])
        if obj["shape"] == "circle":
            draw.ellipse((x - r, y - r, x + r, y + r), fill=fill)
        else:
            draw.polygon(_shape_polygon(obj["shape"], x, y, r), fill=fill)
    return image.reduce(factor) if factor > 1 else image


# --------------------------------------------------------------------------------------------
# Captions
# --------------------------------------------------------------------------------------------
class _Choice:
    """A weighted option list, drawn with one ``rng.random()`` (the first option is canonical)."""

    def __init__(self, options: Options) -> None:
        self.phrases = tuple(phrase for phrase, _ in options)
        self.cumulative = tuple(itertools.accumulate(weight for _, weight in options))

    def draw(self, rng: random.Random | None) -> str:
        """A weighted draw, or the canonical option when ``rng`` is None."""
        if rng is None:
            return self.phrases[0]
        return self.phrases[bisect.bisect(self.cumulative, rng.random() * self.cumulative[-1])]


_SHAPE_CHOICE = {key: _Choice(options) for key, options in SHAPE_WORDS.items()}
_SIZE_CHOICE = {key: _Choice(options) for key, options in SIZE_WORDS.items()}
_RELATION_CHOICE = {key: _Choice(options) for key, options in RELATION_WORDS.items()}
_END_CHOICE = {key: _Choice(options) for key, options in END_WORDS.items()}
_NEAR_CHOICE = _Choice(NEAR_WORDS)
_OTHER_SIDE: dict[Relation, Relation] = {"left": "right", "above": "below"}


def _fields(template: str) -> frozenset[str]:
    """The placeholder names of a template ("{A} {rel_AB} {B}" -> {"A", "rel_AB", "B"})."""
    return frozenset(name for _, name, _, _ in string.Formatter().parse(template) if name)


_SINGLE = (_Choice(SINGLE_TEMPLATES), {t: _fields(t) for t, _ in SINGLE_TEMPLATES})
_PAIR = {
    horizontal: (
        _Choice(tuple((t, w) for t, w, h_only in PAIR_TEMPLATES if horizontal or not h_only)),
        {t: _fields(t) for t, _, _ in PAIR_TEMPLATES},
    )
    for horizontal in (True, False)
}


def _fix_articles(text: str) -> str:
    """English article agreement on the composed sentence: "a orange" -> "an orange"."""
    return _A_BEFORE_VOWEL.sub("an ", text)


def _fill(
    template: str, fields: frozenset[str], scene: Mapping[str, Any], rng: random.Random | None
) -> str:
    """Fill ``template`` (whose placeholders are ``fields``) for ``scene``; ``rng=None`` takes
    every canonical (first) option and names every size."""
    with_size = rng is None or rng.random() < SIZE_MENTION
    values: dict[str, str] = {}
    for name, obj in zip("AB", scene["objects"], strict=False):
        noun = _SHAPE_CHOICE[obj["shape"]].draw(rng)
        if with_size:
            bare = f"{_SIZE_CHOICE[obj['size']].draw(rng)} {obj['color']} {noun}"
        else:
            bare = f"{obj['color']} {noun}"
        values[f"bare_{name}"] = bare
        values[name] = "a " + bare
        values[f"the_{name}"] = "the " + bare
    relation: Relation | None = scene.get("relation")
    if relation is not None:
        other = _OTHER_SIDE[relation]
        if "rel_AB" in fields:
            values["rel_AB"] = _RELATION_CHOICE[relation].draw(rng)
        if "rel_BA" in fields:
            values["rel_BA"] = _RELATION_CHOICE[other].draw(rng)
        if "end_A" in fields:
            values["end_A"] = _END_CHOICE[relation].draw(rng)
            values["end_B"] = _END_CHOICE[other].draw(rng)
        if "near" in fields:
            values["near"] = _NEAR_CHOICE.draw(rng)
    return _fix_articles(template.format_map(values))


def canonical_caption(scene: Mapping[str, Any]) -> str:
    """The single most typical phrasing of ``scene``: every size named, canonical words, the
    left (top) object first: "a small red circle to the left of a large blue square"."""
    if len(scene["objects"]) == 1:
        template = SINGLE_TEMPLATES[0][0]
        return _fill(template, _SINGLE[1][template], scene, None)
    template = PAIR_TEMPLATES[0][0]
    return _fill(template, _PAIR[True][1][template], scene, None)


def sample_captions(
    scene: Mapping[str, Any], rng: random.Random, count: int = NUM_CAPTIONS
) -> tuple[str, ...]:
    """``count`` distinct captions of ``scene``, each a weighted draw of template and wording."""
    if len(scene["objects"]) == 1:
        templates, fields = _SINGLE
    else:
        templates, fields = _PAIR[scene["axis"] == "horizontal"]
    captions: list[str] = []
    for _ in range(1000):
        template = templates.draw(rng)
        caption = _fill(template, fields[template], scene, rng)
        if caption not in captions:
            captions.append(caption)
            if len(captions) == count:
                return tuple(captions)
    raise RuntimeError(f"could not draw {count} distinct captions for scene {scene}")


def vocabulary() -> list[str]:
    """Every word any shapes caption can contain, sorted (a word-level tokenizer's vocabulary)."""
    phrases: list[str] = ["a", "an", "the", *COLORS]
    for table in (SHAPE_WORDS, SIZE_WORDS, RELATION_WORDS, END_WORDS):
        phrases += [phrase for options in table.values() for phrase, _ in options]
    phrases += [phrase for phrase, _ in NEAR_WORDS]
    templates = [t for t, _ in SINGLE_TEMPLATES] + [t for t, _, _ in PAIR_TEMPLATES]
    phrases += [w for t in templates for w in t.split() if not w.startswith("{")]
    return sorted({word for phrase in phrases for word in phrase.split()})


# --------------------------------------------------------------------------------------------
# The dataset
# --------------------------------------------------------------------------------------------
@CaptionDataset.register("shapes")
class ShapesDataset(CaptionDataset):
    """Embedded toy data: 1-2 coloured shapes per image, 5 varied captions; no download.

    Args:
        seed: Seeds every scene and caption; same arguments -> same data in any process.
        num_train, num_val, num_test: Images per split. Ids run 0.. through train, val, test.
        image_size: Side of the square RGB images in pixels.
        single_fraction: Probability that an image holds one shape rather than two.
        antialias: Supersample and box-filter the drawing (smooth edges).
    """

    def __init__(
        self,
        seed: int = 0,
        num_train: int = 10000,
        num_val: int = 500,
        num_test: int = 1000,
        image_size: int = 64,
        single_fraction: float = 0.4,
        antialias: bool = True,
    ) -> None:
        sizes = {"num_train": num_train, "num_val": num_val, "num_test": num_test}
        for name, value in sizes.items():
            if value < 0:
                raise ValueError(f"{name} must be >= 0, got {value}")
        if image_size < 8:
            raise ValueError(f"image_size must be >= 8 pixels, got {image_size}")
        if not 0.0 <= single_fraction <= 1.0:
            raise ValueError(f"single_fraction must be in [0, 1], got {single_fraction}")
        self.seed = int(seed)
        self.num_train, self.num_val, self.num_test = int(num_train), int(num_val), int(num_test)
        self.image_size = int(image_size)
        self.single_fraction = float(single_fraction)
        self.antialias = bool(antialias)
        payload = {"class": type(self).__name__, "version": GENERATOR_VERSION, "args": self.config}
        blob = json.dumps(payload, sort_keys=True).encode()
        self.fingerprint: str = f"shapes-{hashlib.sha256(blob).hexdigest()[:16]}"
        self._records: dict[Split, list[CaptionRecord]] | None = None
        self._by_id: dict[int, CaptionRecord] = {}

    @property
    def config(self) -> dict[str, Any]:
        """Constructor arguments, key for key, so ``ShapesDataset(**self.config)`` rebuilds it."""
        return {
            "seed": self.seed,
            "num_train": self.num_train,
            "num_val": self.num_val,
            "num_test": self.num_test,
            "image_size": self.image_size,
            "single_fraction": self.single_fraction,
            "antialias": self.antialias,
        }

    def _generate(self) -> dict[Split, list[CaptionRecord]]:
        counts: dict[Split, int] = {
            "train": self.num_train, "val": self.num_val, "test": self.num_test
        }  # fmt: skip
        out: dict[Split, list[CaptionRecord]] = {}
        image_id = 0
        for split in SPLITS:
            records = []
            for index in range(counts[split]):
                scene_seed, caption_seed = _stream_seeds(self.seed, split, index)
                scene = sample_scene(random.Random(scene_seed), self.single_fraction)
                captions = sample_captions(scene, random.Random(caption_seed))
                records.append(
                    CaptionRecord(image_id, f"shapes:{image_id}", captions, split, {"scene": scene})
                )
                image_id += 1
            out[split] = records
        return out

    def records(self, split: Split | None = None) -> list[CaptionRecord]:
        """Records of one split (or all, train then val then test); generated once, cached."""
        if self._records is None:
            self._records = self._generate()
            self._by_id = {r.image_id: r for rs in self._records.values() for r in rs}
        if split is None:
            return [r for s in SPLITS for r in self._records[s]]
        if split not in self._records:
            raise ValueError(f"unknown split {split!r}; splits: {', '.join(SPLITS)}")
        return list(self._records[split])

    def scene(self, record: CaptionRecord) -> dict[str, Any]:
        """The scene behind ``record`` (from its meta, else looked up by its ``shapes:<id>``)."""
        scene = record.meta.get("scene")
        if scene is not None:
            return scene
        prefix, _, number = record.image.partition(":")
        if prefix != "shapes" or not number.isdigit():
            raise ValueError(f"{record.image!r} is not a shapes image source ('shapes:<id>')")
        self.records()
        found = self._by_id.get(int(number))
        if found is None:
            raise ValueError(
                f"no image {number} in this shapes dataset ({len(self._by_id)} images)"
            )
        return found.meta["scene"]

    def group(self, record: CaptionRecord) -> str:
        """Per-group metrics by the number of objects in the scene: ``1 object``, ``2 objects``."""
        count = len(self.scene(record)["objects"])
        return f"{count} object{'' if count == 1 else 's'}"

    def load_image(self, record: CaptionRecord) -> Image.Image:
        """Render the record's scene: an RGB ``image_size`` x ``image_size`` PIL image."""
        return render_scene(self.scene(record), self.image_size, self.antialias)
