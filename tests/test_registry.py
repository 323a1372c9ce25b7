"""Registry: built-ins, the three plugin routes, broken plugins, the unknown-name message."""

from __future__ import annotations

import sys
import textwrap
from typing import Literal

import pytest

import registry

USER_MODULE = '''
from typing import Any

import torch

from registry import CaptionDecoder


@CaptionDecoder.register("{name}")
class EchoDecoder(CaptionDecoder):
    """A user's decoder: says the caption it was last trained on."""

    def __init__(self, feature_dim: int, word: str = "shape") -> None:
        super().__init__()
        self.word = word
        self.scale = torch.nn.Parameter(torch.ones(1))

    def loss(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        value = (self.scale * batch["features"].mean() - 1.0) ** 2
        return {{"loss": value, "scale": self.scale.detach()[0]}}

    def generate_batch(self, features: torch.Tensor, options: Any) -> list[str]:
        return [f"a {{self.word}}"] * len(features)
'''


def write_user_module(folder, module: str, name: str) -> None:
    (folder / f"{module}.py").write_text(textwrap.dedent(USER_MODULE.format(name=name)))


def test_builtins_are_registered(clean_registry):
    assert "clipcap" in clean_registry.available("decoder")
    assert "open_clip" in clean_registry.available("encoder")
    assert "shapes" in clean_registry.available("dataset")


def test_unknown_name_lists_choices_and_how_to_add(clean_registry):
    with pytest.raises(clean_registry.ComponentError) as error:
        clean_registry.resolve("decoder", "no_such_decoder")
    message = str(error.value)
    assert "\n" not in message
    assert "clipcap" in message and "--include-package" in message
    assert "diffusion_captioner.decoders" in message


def test_build_rejects_unknown_keys_listing_accepted(clean_registry):
    with pytest.raises(clean_registry.ComponentError, match="does not take bogus.*it takes:.*seed"):
        clean_registry.build("dataset", {"type": "shapes", "bogus": 1})


def test_include_package_registers_user_decoder(clean_registry, tmp_path, monkeypatch):
    write_user_module(tmp_path, "user_decoders_a", "echo_a")
    monkeypatch.syspath_prepend(str(tmp_path))
    clean_registry.include_package("user_decoders_a")
    decoder = clean_registry.build("decoder", {"type": "echo_a", "word": "star"}, feature_dim=4)
    assert decoder.generate(__import__("torch").zeros(2, 4)) == ["a star", "a star"]
    sys.modules.pop("user_decoders_a", None)


def test_include_package_failure_is_one_line(clean_registry):
    with pytest.raises(clean_registry.ComponentError, match="cannot import") as error:
        clean_registry.include_package("definitely_not_a_module_xyz")
    assert "\n" not in str(error.value)


def test_dotted_path_resolves_unregistered_class(clean_registry, tmp_path, monkeypatch):
    write_user_module(tmp_path, "user_decoders_b", "echo_b")
    monkeypatch.syspath_prepend(str(tmp_path))
    cls = clean_registry.resolve("decoder", "user_decoders_b.EchoDecoder")
    assert cls.__name__ == "EchoDecoder"
    with pytest.raises(clean_registry.ComponentError, match="user_decoders_b.Missing"):
        clean_registry.resolve("decoder", "user_decoders_b.Missing")
    sys.modules.pop("user_decoders_b", None)


def _install_entry_points(site, lines: str) -> None:
    dist = site / "user_plugins-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: user-plugins\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text(lines)


def test_entry_point_plugins_load_lazily_and_broken_ones_are_reported(
    clean_registry, tmp_path, monkeypatch
):
    (tmp_path / "plugin_good.py").write_text(
        textwrap.dedent(USER_MODULE.format(name="unused_name")).replace(
            '@CaptionDecoder.register("unused_name")\n', ""))
    (tmp_path / "plugin_broken.py").write_text("raise RuntimeError('plugin exploded')\n")
    _install_entry_points(tmp_path, textwrap.dedent("""\
        [diffusion_captioner.decoders]
        echo_ep = plugin_good:EchoDecoder
        broken_ep = plugin_broken:Decoder
        """))
    monkeypatch.syspath_prepend(str(tmp_path))
    clean_registry._loaded_entry_points.discard("decoder")
    cls = clean_registry.resolve("decoder", "echo_ep")
    assert cls.__name__ == "EchoDecoder"
    errors = clean_registry.plugin_errors
    assert any("broken_ep" in key and "plugin exploded" in msg for key, msg in errors.items())
    assert "echo_ep" in clean_registry.available("decoder")
    for module in ("plugin_good", "plugin_broken"):
        sys.modules.pop(module, None)


def test_clean_registry_restores(clean_registry):
    from registrable import Registrable

    from registry import CaptionDecoder

    before = set(Registrable._registry[CaptionDecoder])

    @CaptionDecoder.register("temporary_fake")
    class Fake(CaptionDecoder):
        """fake"""

    assert "temporary_fake" in Registrable._registry[CaptionDecoder]
    assert before <= set(Registrable._registry[CaptionDecoder])


def test_evaluating_switches_to_eval_and_restores_only_what_it_changed():
    import torch

    from registry import CaptionDecoder

    decoder = CaptionDecoder()
    decoder.head = torch.nn.Dropout(0.5)
    with decoder.evaluating():
        assert not decoder.training and not decoder.head.training
    assert decoder.training and decoder.head.training  # training mode restored

    decoder.eval()
    decoder.head.train()  # a caller's deliberate mix: evaluating() leaves an eval decoder alone
    with decoder.evaluating():
        assert not decoder.training and decoder.head.training
    assert not decoder.training and decoder.head.training

    decoder.train()
    with pytest.raises(RuntimeError), decoder.evaluating():
        raise RuntimeError("generation failed")
    assert decoder.training  # restored even when the block raises


BUILTIN_DECODERS = ["clipcap", "diffusion", "mnic", "nearest"]


def test_the_builtin_decoder_list_of_these_tests_is_complete():
    assert set(registry.available("decoder")) >= set(BUILTIN_DECODERS)


@pytest.mark.parametrize("name", BUILTIN_DECODERS)
def test_an_unknown_generation_option_fails_at_plan_time_naming_the_accepted(name, tmp_path):
    import json
    import time

    from diffusion_captioner.comparison import compare

    preset = tmp_path / "typo.json"
    preset.write_text(json.dumps({"include": ["embedded"],
                                  "decoders": {name: {"generate": {"stpes": 4}}}}))
    started = time.perf_counter()
    with pytest.raises(ValueError, match=r"has no generation option stpes; it takes: \w+"):
        compare([name], tmp_path / "run", preset=str(preset), progress=False)
    assert time.perf_counter() - started < 10
    assert not (tmp_path / "run" / name).exists()  # nothing trained


def test_a_plugins_typed_options_are_checked_and_a_plugin_without_options_takes_none():
    from dataclasses import dataclass

    @dataclass(frozen=True)
    class TopOptions(registry.GenerationOptions):
        top: int = 1
        style: Literal["plain", "fancy"] = "plain"

    class Typed(registry.CaptionDecoder):
        Options = TopOptions

    class Bare(registry.CaptionDecoder):
        pass

    assert Typed.check_generate_options({"top": 3}) == TopOptions(top=3)
    with pytest.raises(ValueError, match="top must be int, got 'three'"):
        Typed.check_generate_options({"top": "three"})
    with pytest.raises(ValueError, match="style must be one of 'plain', 'fancy', got 'bold'"):
        Typed.check_generate_options({"style": "bold"})
    with pytest.raises(ValueError, match=r"Bare has no generation option top; it takes: \(none\)"):
        Bare.check_generate_options({"top": 3})
    with pytest.raises(TypeError, match="step_option 'steps' is not a generation option"):
        class Wrong(registry.CaptionDecoder):  # noqa: F841 - the class statement is the test
            Options = TopOptions
            capabilities = registry.Capabilities(kind="iterative", step_option="steps")
