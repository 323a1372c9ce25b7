"""The decoder contract: recorded config, declared capabilities read by their users, no cycles."""

from __future__ import annotations

import ast
import inspect
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from helpers import TINY_DECODER_CONFIGS, tiny_decoder_config

import registry
from registry import Capabilities, CaptionDecoder, GenerationOptions

FEATURE_DIM = 8
ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("name", sorted(TINY_DECODER_CONFIGS))
def test_the_recorded_config_round_trips_through_save_and_load(name, tmp_path):
    assert set(TINY_DECODER_CONFIGS) >= set(registry.available("decoder"))
    torch.manual_seed(0)
    config = tiny_decoder_config(name, FEATURE_DIM, tmp_path)
    decoder = registry.build("decoder", config)
    cls = type(decoder)
    defaults = {n: p.default for n, p in inspect.signature(cls.__init__).parameters.items()
                if p.default is not inspect.Parameter.empty}
    recorded = decoder.config
    assert recorded == {**defaults, **{k: v for k, v in config.items() if k != "type"}}
    recorded["feature_dim"] = -1  # a copy: the decoder's own record is untouched
    assert decoder.config["feature_dim"] == FEATURE_DIM
    rebuilt = cls(**decoder.config)
    assert rebuilt.state_dict().keys() == decoder.state_dict().keys()

    decoder.save_pretrained(tmp_path / "checkpoint")
    loaded = CaptionDecoder.from_pretrained(tmp_path / "checkpoint")
    replaced = cls.checkpoint_overrides(tmp_path / "checkpoint")
    assert {k: v for k, v in loaded.config.items() if k not in replaced} == {
        k: v for k, v in decoder.config.items() if k not in replaced}


def test_the_config_is_the_outermost_constructors_arguments_with_defaults():
    class Base(CaptionDecoder):
        def __init__(self, feature_dim: int, width: int = 4) -> None:
            super().__init__()
            self.width = width

    class Wider(Base):
        def __init__(self, feature_dim: int, extra: str = "x", **more: Any) -> None:
            super().__init__(feature_dim, width=16)

    assert Base(3).config == {"feature_dim": 3, "width": 4}
    assert Wider(3, colour="red").config == {"feature_dim": 3, "extra": "x", "colour": "red"}


@dataclass(frozen=True)
class PassOptions(GenerationOptions):
    passes: int = 2
    mood: str = "plain"


class Refiner(CaptionDecoder):
    """A fake iterative decoder that declares its capabilities."""

    Options = PassOptions
    capabilities = Capabilities(kind="iterative", trajectory=True, step_option="passes",
                                step_sweep=(1, 3))

    def generate_batch(self, features: torch.Tensor, options: PassOptions) -> list[str]:
        return [f"{options.mood} {options.passes}"] * len(features)

    def generate_trajectory_batch(self, features: torch.Tensor,
                                  options: PassOptions) -> list[list[str]]:
        return [[f"pass {k + 1}" for k in range(options.passes)] for _ in range(len(features))]


class Lookup(CaptionDecoder):
    """A fake retrieval decoder: no options, no steps."""

    capabilities = Capabilities(kind="retrieval")

    def generate_batch(self, features: torch.Tensor, options: GenerationOptions) -> list[str]:
        return ["found"] * len(features)


def test_declared_capabilities_drive_the_web_kind_and_the_report_sweep():
    from diffusion_captioner.analysis import sweep_options
    from diffusion_captioner.web.app import describe_decoder

    refiner, lookup = Refiner(), Lookup()
    info = describe_decoder("refiner", refiner, {"mood": "calm"})
    assert (info.kind, info.trajectory, info.default_steps, info.step_options) == (
        "iterative", True, 2, [1, 2, 3])
    assert sweep_options(refiner, {"mood": "calm"}) == [
        {"mood": "calm"}, {"mood": "calm", "passes": 1}, {"mood": "calm", "passes": 3}]
    assert sweep_options(refiner, {"passes": 3}) == [{"passes": 3}, {"passes": 1}]
    info = describe_decoder("lookup", lookup, {})
    assert (info.kind, info.trajectory, info.default_steps, info.step_options) == (
        "retrieval", False, None, [])
    assert sweep_options(lookup, {}) == [{}]
    features = torch.zeros(2, FEATURE_DIM)
    assert refiner.generate(features, passes=3) == ["plain 3", "plain 3"]
    assert refiner.generate_trajectory(features[:1]) == [["pass 1", "pass 2"]]
    with pytest.raises(ValueError, match="returns no trajectory"):
        lookup.generate_trajectory(features)


def test_a_decoders_options_and_capabilities_agree():
    for name in registry.available("decoder"):
        cls = registry.resolve("decoder", name)
        capabilities = cls.capabilities
        assert issubclass(cls.Options, GenerationOptions), name
        cls.Options.parse({})  # every option has a default
        if capabilities.step_option is not None:
            assert capabilities.step_option in cls.Options.names(), name
        assert all(isinstance(k, int) and k >= 1 for k in capabilities.step_sweep), name
        overrides = cls.generate_trajectory_batch is not CaptionDecoder.generate_trajectory_batch
        assert capabilities.trajectory == overrides, name
        samples = cls.sample_batch is not CaptionDecoder.sample_batch
        assert capabilities.sampling == samples, name


def _imports(path: Path, modules: set[str]) -> set[str]:
    """The project modules ``path`` imports anywhere in it (function-level imports too)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module, *(f"{node.module}.{alias.name}" for alias in node.names)]
        else:
            continue
        found |= {name for name in names if name in modules}
    return found


def test_the_project_has_no_import_cycles():
    files = [*ROOT.glob("diffusion_captioner/**/*.py"), *ROOT.glob("baselines/*.py"),
             *ROOT.glob("eval/*.py"), ROOT / "registry.py"]
    names = {}
    for path in files:
        parts = path.relative_to(ROOT).with_suffix("").parts
        names[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    graph = {name: _imports(path, set(names)) - {name} for name, path in names.items()}

    def cycle_from(start: str) -> list[str] | None:
        stack = [(start, [start])]
        seen = set()
        while stack:
            node, path = stack.pop()
            for nxt in graph[node]:
                if nxt == start:
                    return [*path, start]
                if nxt not in seen:
                    seen.add(nxt)
                    stack.append((nxt, [*path, nxt]))
        return None

    cycles = [cycle for name in sorted(graph) if (cycle := cycle_from(name))]
    assert not cycles, " | ".join(" -> ".join(c) for c in cycles)


def test_the_readme_plugin_example_runs_as_written(clean_registry, tmp_path, monkeypatch):
    text = (ROOT / "README.md").read_text()
    section = text[text.index("## Add your own decoder"):]
    code = section[section.index("```python\n") + len("```python\n"):section.index("\n```\n")]
    package = tmp_path / "my_pkg"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "my_decoders.py").write_text(code)
    monkeypatch.syspath_prepend(str(tmp_path))
    clean_registry.include_package("my_pkg.my_decoders")
    decoder = clean_registry.build("decoder", {"type": "echo", "word": "circle"},
                                   feature_dim=FEATURE_DIM)
    assert decoder.config == {"feature_dim": FEATURE_DIM, "word": "circle"}
    features = torch.zeros(2, FEATURE_DIM)
    assert decoder.generate(features) == ["a circle", "a circle"]
    assert decoder.generate(features, shout=True) == ["A CIRCLE", "A CIRCLE"]
    with pytest.raises(ValueError, match="has no generation option shuot; it takes: shout"):
        type(decoder).check_generate_options({"shuot": True})
    assert decoder.loss({"features": features, "captions": ["a", "b"]})["loss"].dim() == 0
    decoder.save_pretrained(tmp_path / "checkpoint")
    loaded = CaptionDecoder.from_pretrained(tmp_path / "checkpoint")
    assert loaded.config == decoder.config and loaded.generate(features) == ["a circle"] * 2


def test_other_generation_options_rescore_the_trained_checkpoint_without_retraining(
        tiny_clip_dir, tmp_path):
    import json

    from conftest import TINY_SHAPES

    from diffusion_captioner.comparison import compare

    def run(k: int, decoder: dict | None = None) -> Path:
        preset = tmp_path / f"k{k}.json"
        preset.write_text(json.dumps({
            "include": ["embedded"], "speed": False,
            "decoders": {"nearest": {"decoder": decoder or {}, "generate": {"k": k}}}}))
        compare(["nearest"], tmp_path / "run", preset=str(preset), dataset=TINY_SHAPES,
                encoder=f"local-dir:{tiny_clip_dir}", cache_dir=tmp_path / "cache",
                progress=False)
        return tmp_path / "run" / "nearest"

    folder = run(1)
    log, weights = (folder / "train_log.jsonl").read_text(), folder / "checkpoint" / "best"
    trained_at = (weights / "model.safetensors").stat().st_mtime_ns
    folder = run(3)
    assert (folder / "train_log.jsonl").read_text() == log  # not trained again
    assert (weights / "model.safetensors").stat().st_mtime_ns == trained_at
    assert json.loads((folder / "summary.json").read_text())["generate"] == {"k": 3}
    with pytest.raises(ValueError, match=r"decoder\.k differ"):  # a model setting still binds
        run(3, decoder={"k": 2})
