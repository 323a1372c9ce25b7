"""`dcap export`: a shareable run folder that `dcap caption`, `dcap serve` and `dc.load_run` read
like the run itself; its model card; overwrite refusal; the hub paths, offline and fast."""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import TINY_SHAPES
from helpers import (
    assert_one_line_error,
    block_network,
    run_cli,
    write_colour_images,
    write_untrained_run,
)
from PIL import Image

import diffusion_captioner as dc
from diffusion_captioner.cli import main
from diffusion_captioner.sharing import MANIFEST, read_front_matter
from registry import ComponentError

ROOT = Path(__file__).resolve().parents[1]
TINY_TRAIN = {"max_steps": 3, "batch_size": 8, "eval_every": 2, "eval_batches": 1, "log_every": 1,
              "warmup_steps": 0, "max_minutes": None}
DECODERS = ("clipcap", "diffusion", "nearest")


@pytest.fixture(scope="module")
def trained_run(tiny_clip_dir, tmp_path_factory) -> Path:
    """A real `compare` run (3 training steps per decoder, no speed phase) over the tiny CLIP."""
    folder = tmp_path_factory.mktemp("export")
    preset = folder / "no-speed.json"
    preset.write_text(json.dumps({"include": ["embedded"], "speed": False}))
    result = dc.compare(decoders=",".join(DECODERS), out=folder / "run", preset=str(preset),
                        dataset=TINY_SHAPES, encoder=f"local-dir:{tiny_clip_dir}",
                        cache_dir=folder / "cache", train=TINY_TRAIN, quiet=True)
    return result.folder


@pytest.fixture(scope="module")
def exported(trained_run, tmp_path_factory) -> Path:
    target = tmp_path_factory.mktemp("exported") / "shared"
    assert main(["export", "--run", str(trained_run), "--to", str(target)]) == 0
    return target


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> list[Path]:
    return write_colour_images(tmp_path_factory.mktemp("export-images"),
                               [(200, 30, 30), (30, 200, 30), (240, 240, 30)])


def cli(argv: list[str], capsys) -> tuple[int, str, str]:
    torch.manual_seed(0)
    return run_cli(argv, capsys)


def test_exported_folder_captions_like_the_run(trained_run, exported, images, capsys):
    files = sorted(p.relative_to(exported).as_posix() for p in exported.rglob("*") if p.is_file())
    for name in DECODERS:
        assert f"{name}/checkpoint/best/config.json" in files and f"{name}/summary.json" in files
    assert {"README.md", MANIFEST, "config.json", "metrics.json", "report.md",
            "encoder/open_clip_config.json"} <= set(files)
    assert json.loads((exported / "config.json").read_text())["encoder"]["model"] == "local-dir:encoder"
    argv = ["caption", "--images", ",".join(map(str, images))]
    code, from_run, err = cli([*argv, "--run", str(trained_run)], capsys)
    assert code == 0, err
    code, from_export, err = cli([*argv, "--run", str(exported)], capsys)
    assert code == 0, err
    assert from_export == from_run and all(f"  {n} " in from_run for n in DECODERS)
    torch.manual_seed(0)
    expected = dc.load_run(trained_run).caption(images)
    torch.manual_seed(0)
    assert dc.load_run(exported).caption(images) == expected


def test_model_card_front_matter_and_metrics(trained_run, exported):
    card = (exported / "README.md").read_text()
    front = read_front_matter(card)
    assert front["library_name"] == "diffusion_captioner"
    assert front["license"] == "mit" and front["datasets"] == ["shapes"]
    assert front["pipeline_tag"] == "image-to-text"
    assert {"image-captioning", *DECODERS} <= set(front["tags"])
    metrics = json.loads((trained_run / "metrics.json").read_text())
    entries = {entry["name"]: entry for entry in front["model-index"]}
    assert set(entries) == {f"run/{name}" for name in DECODERS}
    for name in DECODERS:
        result = entries[f"run/{name}"]["results"][0]
        assert result["task"]["type"] == "image-to-text" and result["dataset"]["split"] == "test"
        values = {m["name"]: m["value"] for m in result["metrics"]}
        scores = metrics["decoders"][name]["test"]["default"]["scores"]
        assert values["CIDEr"] == pytest.approx(round(scores["CIDEr"], 4))
        assert values["BLEU-4"] == pytest.approx(round(scores["Bleu_4"], 4))
        assert values["CLIP-S"] == pytest.approx(
            round(metrics["decoders"][name]["clip_scores"]["CLIPScore"], 4))
        assert f"| {name} | {scores['Bleu_1']:.3f} |" in card
    command = json.loads((trained_run / "config.json").read_text())["command"]
    assert command.startswith("dcap compare --decoders clipcap,diffusion,nearest")
    assert f"Command: `{command}`" in card
    assert "## Dataset and licence" in card and '"num_train": 24' in card


def test_overwrite_is_refused_unless_same_run(trained_run, tiny_clip_dir, tmp_path, capsys):
    occupied = tmp_path / "occupied"
    occupied.mkdir()
    (occupied / "notes.txt").write_text("mine")
    code, _, err = cli(["export", "--run", str(trained_run), "--to", str(occupied)], capsys)
    assert_one_line_error(code, err, f"--to {occupied}", "not an export", "new or empty folder")
    assert [p.name for p in occupied.iterdir()] == ["notes.txt"]

    target = tmp_path / "shared"
    assert cli(["export", "--run", str(trained_run), "--to", str(target)], capsys)[0] == 0
    (target / "stale.txt").write_text("left from before")
    code, out, err = cli(["export", "--run", str(trained_run), "--to", str(target)], capsys)
    assert code == 0, err  # an export of the same run is replaced, as a whole
    assert not (target / "stale.txt").exists() and (target / MANIFEST).is_file()

    other = write_untrained_run(tmp_path / "other", f"local-dir:{tiny_clip_dir}", ["nearest"])
    code, _, err = cli(["export", "--run", str(other), "--to", str(target)], capsys)
    assert_one_line_error(code, err, f"--to {target}", "another run (run)")
    code, _, err = cli(["export", "--run", str(tmp_path / "missing"), "--to",
                        str(tmp_path / "x")], capsys)
    assert_one_line_error(code, err, "no config.json")
    assert not list(tmp_path.glob(".*export-*"))  # no staging folder left behind


def test_export_survives_the_loss_of_the_original_files(trained_run, tiny_clip_dir, images,
                                                        tmp_path):
    """A shipped local-dir encoder: the export works after the run and the encoder folder are gone."""
    clip, run = tmp_path / "clip", tmp_path / "run"
    shutil.copytree(tiny_clip_dir, clip)
    shutil.copytree(trained_run, run)
    config = json.loads((run / "config.json").read_text())
    config["encoder"]["model"] = f"local-dir:{clip}"
    (run / "config.json").write_text(json.dumps(config))
    torch.manual_seed(0)
    expected = dc.load_run(run).caption(images)
    dc.export(run, tmp_path / "moved" / "shared")
    shutil.rmtree(clip)
    shutil.rmtree(run)
    shutil.move(tmp_path / "moved", tmp_path / "elsewhere")
    torch.manual_seed(0)
    assert dc.load_run(tmp_path / "elsewhere" / "shared").caption(images) == expected


def test_serve_accepts_an_export(exported):
    from diffusion_captioner.web import create_app

    app = create_app(exported)
    buffer = io.BytesIO()
    Image.new("RGB", (40, 40), (200, 30, 30)).save(buffer, format="PNG")
    reply = app.test_client().post("/api/caption", data={"image": (io.BytesIO(buffer.getvalue()),
                                                                   "x.png")},
                                   content_type="multipart/form-data")
    assert reply.status_code == 200, reply.get_json()
    assert set(reply.get_json()) == set(DECODERS)


def offline_hub(monkeypatch, cache: Path) -> Path:
    from huggingface_hub import constants

    cache.mkdir(parents=True, exist_ok=True)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    block_network(monkeypatch)
    return cache


def test_hf_hub_run_offline_fails_fast_in_one_line(monkeypatch, tmp_path, images, capsys):
    cache = offline_hub(monkeypatch, tmp_path / "hf-cache")
    started = time.monotonic()
    code, _, err = cli(["caption", "--run", "hf-hub:no-such-org/no-such-run",
                        "--images", str(images[0])], capsys)
    assert_one_line_error(code, err, "exported run 'no-such-org/no-such-run'", str(cache),
                          "HF_HUB_OFFLINE=1", "hf download no-such-org/no-such-run", "--run DIR")
    with pytest.raises(ComponentError) as error:
        dc.load_run("hf-hub:no-such-org/no-such-run")
    assert "\n" not in str(error.value)
    with pytest.raises(ValueError, match="is not a hub repository id; write it as org/name"):
        dc.load_run("hf-hub:not a repo")
    assert time.monotonic() - started < 10


def test_hf_hub_run_without_offline_flag_fails_fast_in_a_real_process(tmp_path, images):
    """HF_HUB_OFFLINE unset, the endpoint a closed local port: one line, no traceback, no hang."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE") and "proxy" not in k.lower()}
    env.update(HF_ENDPOINT="http://127.0.0.1:9", HF_HUB_CACHE=str(tmp_path / "hf-cache"),
               OMP_NUM_THREADS="1")
    started = time.monotonic()
    completed = subprocess.run(
        [sys.executable, "-m", "diffusion_captioner", "caption", "--run", "hf-hub:org/name",
         "--images", str(images[0])], capture_output=True, text=True, cwd=ROOT, env=env,
        timeout=120)
    assert time.monotonic() - started < 60
    assert_one_line_error(completed.returncode, completed.stderr, "exported run 'org/name'",
                          "127.0.0.1:9 cannot be reached")


def test_hf_hub_run_loads_from_the_cache_offline(exported, monkeypatch, tmp_path, images):
    """A repository already in the HF cache (as `hf download` leaves it) loads with the hub off."""
    cache = offline_hub(monkeypatch, tmp_path / "hf-cache")
    repo = cache / "models--org--shapes-captioners"
    commit = "0123456789abcdef0123456789abcdef01234567"
    shutil.copytree(exported, repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    torch.manual_seed(0)
    expected = dc.load_run(exported).caption(images)
    torch.manual_seed(0)
    run = dc.load_run("hf-hub:org/shapes-captioners")
    assert run.caption(images) == expected


def test_push_to_hub_offline_fails_fast_before_writing(trained_run, monkeypatch, tmp_path, capsys):
    offline_hub(monkeypatch, tmp_path / "hf-cache")
    target = tmp_path / "shared"
    started = time.monotonic()
    code, _, err = cli(["export", "--run", str(trained_run), "--to", str(target),
                        "--push-to-hub", "org/name"], capsys)
    assert_one_line_error(code, err, "--push-to-hub org/name", "HF_HUB_OFFLINE=1",
                          "nothing was written", "hf upload org/name")
    assert not target.exists() and time.monotonic() - started < 10
    code, _, err = cli(["export", "--run", str(trained_run), "--to", str(target),
                        "--push-to-hub", "no-slash"], capsys)
    assert_one_line_error(code, err, "--push-to-hub: 'no-slash' is not a hub repository id")


def test_push_to_hub_uploads_the_folder(trained_run, monkeypatch, tmp_path, capsys):
    """The thin upload path, with huggingface_hub's client replaced (no network here)."""
    import huggingface_hub

    from diffusion_captioner import hub

    calls = []

    class FakeApi:
        def create_repo(self, repo_id, exist_ok=False):
            calls.append(("create_repo", repo_id, exist_ok))
            return f"https://huggingface.co/{repo_id}"

        def upload_folder(self, repo_id, folder_path, commit_message):
            calls.append(("upload_folder", repo_id, sorted(os.listdir(folder_path))))

    monkeypatch.setattr(hub, "hub_available", lambda: True)
    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    target = tmp_path / "shared"
    code, out, err = cli(["export", "--run", str(trained_run), "--to", str(target),
                          "--push-to-hub", "org/shapes"], capsys)
    assert code == 0, err
    assert calls[0] == ("create_repo", "org/shapes", True)
    assert calls[1][:2] == ("upload_folder", "org/shapes") and "README.md" in calls[1][2]
    assert "hf-hub:org/shapes" in (target / "README.md").read_text()
    assert "--run hf-hub:org/shapes" in out
