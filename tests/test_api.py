"""The Python API (`import diffusion_captioner as dc`): cheap to import, the same results as the
CLI it backs, and the README's "Use it from Python" snippet runs as written."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import write_colour_images, write_untrained_run
from PIL import Image

import diffusion_captioner as dc
from diffusion_captioner.cli import main

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def untrained_run(tiny_clip_dir, tmp_path_factory) -> Path:
    return write_untrained_run(tmp_path_factory.mktemp("api") / "run", f"local-dir:{tiny_clip_dir}")


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> list[Path]:
    return write_colour_images(tmp_path_factory.mktemp("api-images"),
                               [(200, 30, 30), (30, 200, 30), (30, 30, 200)])


def test_import_is_cheap_and_every_name_resolves():
    completed = subprocess.run(
        [sys.executable, "-c", "import sys, diffusion_captioner as dc; "
         "print(sorted(m for m in ('torch', 'transformers', 'open_clip', 'registry') "
         "if m in sys.modules)); print(dc.__all__)"],
        capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert completed.returncode == 0, completed.stderr
    loaded, names = completed.stdout.strip().splitlines()
    assert loaded == "[]"
    for name in dc.__all__:
        assert getattr(dc, name).__doc__, name
    with pytest.raises(AttributeError, match="no_such_thing"):
        dc.no_such_thing  # noqa: B018


def test_compare_is_the_api_function_even_after_the_comparison_module_is_imported():
    import inspect

    from diffusion_captioner import (
        api,
        comparison,  # noqa: F401 - importing it must not shadow
    )

    assert dc.compare is api.compare
    assert list(inspect.signature(dc.compare).parameters)[:3] == ["decoders", "out", "preset"]


def test_available_and_list_components(clean_registry):
    import registry
    from diffusion_captioner.presets import available_presets

    assert dc.available("decoder") == registry.available("decoder")
    assert dc.available("datasets") == registry.available("dataset")
    assert dc.available("preset") == available_presets()
    components = dc.list_components()
    assert set(components.decoders) == set(registry.available("decoder"))
    assert components.encoders["open_clip"].startswith("Frozen open_clip")
    assert "embedded" in components.presets
    with pytest.raises(ValueError, match="unknown role 'decodr'; roles: decoder, encoder"):
        dc.available("decodr")


def test_caption_matches_the_cli_path(untrained_run, images, capsys):
    run = dc.load_run(untrained_run)
    assert isinstance(run, dc.Run) and set(run.names) == {"clipcap", "diffusion", "mnic", "nearest"}
    by_decoder = run.caption(images)
    assert set(by_decoder) == set(run.names)
    assert all(len(captions) == len(images) and all(isinstance(c, str) for c in captions)
               for captions in by_decoder.values())
    # the CLI's own path on the same files gives the same captions (same batching)
    by_path, failures = run.caption_files(images)
    assert not failures
    for name, captions in by_decoder.items():
        assert [by_path[str(p)][name] for p in images] == captions
    assert main(["caption", "--run", str(untrained_run), "--images",
                 ",".join(map(str, images))]) == 0
    out = capsys.readouterr().out
    for name, captions in by_decoder.items():
        for caption in captions:
            assert re.search(rf"^  {name}\s+{re.escape(caption)}$", out, re.MULTILINE)
    # PIL images, one image, a subset of the decoders
    pil = [Image.open(p) for p in images]
    assert run.caption(pil, decoders="clipcap,nearest") == {
        n: by_decoder[n] for n in ("clipcap", "nearest")}
    assert run.caption(images[0], decoders=["clipcap"]) == {"clipcap": by_decoder["clipcap"][:1]}
    # a loaded Run serves as it is
    from diffusion_captioner.web import create_app

    reply = create_app(loaded=run).test_client().get("/api/decoders")
    assert [d["name"] for d in reply.get_json()["decoders"]] == run.names


def test_caption_options_and_errors(untrained_run, images, tmp_path):
    from diffusion_captioner.images import BadImageError

    run = dc.load_run(untrained_run, decoders="diffusion,clipcap")
    assert run.names == ["diffusion", "clipcap"]
    # steps goes to the decoder that takes it; clipcap has no such option and is left alone
    assert set(run.caption(images, steps=2)) == {"diffusion", "clipcap"}
    with pytest.raises(ValueError, match="no decoder of diffusion, clipcap takes option"):
        run.caption(images, stpes=2)
    with pytest.raises(ValueError, match="mnic not loaded; loaded: diffusion, clipcap"):
        run.caption(images, decoders="mnic")
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"not an image")
    with pytest.raises(BadImageError, match="bad.jpg"):
        run.caption([images[0], bad])
    with pytest.raises(FileNotFoundError, match="no config.json"):
        dc.load_run(tmp_path)


def test_evaluate_files_and_dicts(tmp_path):
    from eval.coco_format import write_annotations, write_results

    references = {1: ["a red circle", "a red disk"], 2: ["a blue square"]}
    results = {1: "a red circle", 2: "a blue square"}
    write_annotations(tmp_path / "a.json", references)
    write_results(tmp_path / "r.json", results)
    from_files = dc.evaluate(tmp_path / "r.json", tmp_path / "a.json", out=tmp_path / "m.json")
    assert from_files.scores["Bleu_1"] > 0.9 and from_files.paper_bleu is None
    assert json.loads((tmp_path / "m.json").read_text())["CIDEr"] == pytest.approx(
        from_files.scores["CIDEr"])
    from_dicts = dc.evaluate(results, references, paper_bleu="embedded:shapes_words")
    assert from_dicts.scores == pytest.approx(from_files.scores)
    assert 0 < from_dicts.paper_bleu <= 1
    assert from_dicts.report.per_image["CIDEr"].keys() == {1, 2}


def test_equivalent_command():
    from diffusion_captioner.api import equivalent_command

    assert equivalent_command({}) == "dcap compare"
    assert equivalent_command({"decoders": ["clipcap", "mnic"], "train": {"max_steps": 3},
                               "quiet": True}) == (
        "dcap compare --decoders clipcap,mnic --train '{\"max_steps\": 3}' --quiet")


def readme_snippet() -> str:
    text = (ROOT / "README.md").read_text()
    match = re.search(r"<!-- python-api -->\n```python\n(.*?)\n```", text, re.DOTALL)
    assert match, "README.md has no <!-- python-api --> python block"
    return match.group(1)


def test_readme_snippet_runs(tmp_path, monkeypatch, capsys):
    """The README's "Use it from Python" block, executed as written in an empty folder."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("DCAP_CACHE", str(tmp_path / "cache"))
    Image.new("RGB", (64, 64), (30, 30, 200)).save(tmp_path / "photo.png")
    namespace: dict = {}
    exec(compile(readme_snippet(), "README.md:python-api", "exec"), namespace)  # noqa: S102
    out = capsys.readouterr().out
    assert "'clipcap'" in out and "runs/python-api" in out
    result, captions = namespace["result"], namespace["captions"]
    assert result.folder == Path("runs/python-api") and (tmp_path / "runs/python-api/report.md").is_file()
    assert set(result.scores) == {"clipcap", "nearest"} and "CIDEr" in result.scores["nearest"]
    assert set(captions) == {"clipcap", "nearest"} and all(len(c) == 2 for c in captions.values())
    assert namespace["evaluation"].scores["CIDEr"] == pytest.approx(
        result.scores["clipcap"]["CIDEr"])
    config = json.loads((tmp_path / "runs/python-api/config.json").read_text())
    assert config["command"].startswith("dcap compare --decoders clipcap,nearest --out runs/python-api")
    assert (tmp_path / "shared/python-api/README.md").is_file()
