"""Feature extraction at scale: a messy real folder, resumable shards, precision, two processes."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from conftest import SHARED, TINY_SHAPES
from PIL import Image

from diffusion_captioner.features import FeatureCache, extract_features
from registry import build

ROOT = Path(__file__).resolve().parents[1]
SHAPES_12 = {**TINY_SHAPES, "num_val": 11}


class StopAfter:
    """Wraps an encoder, counts encoded images, and raises KeyboardInterrupt after ``limit``."""

    def __init__(self, encoder, limit: int | None = None):
        self.inner, self.limit, self.encoded = encoder, limit, 0
        self.dim, self.fingerprint = encoder.dim, encoder.fingerprint

    def preprocess(self, image):
        return self.inner.preprocess(image)

    def encode_images(self, pixels):
        if self.limit is not None and self.encoded + len(pixels) > self.limit:
            raise KeyboardInterrupt
        self.encoded += len(pixels)
        return self.inner.encode_images(pixels)


def messy_folder(folder: Path) -> Path:
    """A jsonl dataset over good, corrupt, truncated, CMYK, RGBA and missing images."""
    folder.mkdir()
    sample = sorted((SHARED / "data" / "coco-sample").glob("*.jpg"))
    if sample:
        (folder / "good.jpg").write_bytes(sample[0].read_bytes())
    else:
        Image.effect_noise((80, 60), 50).convert("RGB").save(folder / "good.jpg")
    buffer = io.BytesIO()
    Image.effect_noise((96, 96), 60).convert("RGB").save(buffer, "JPEG", quality=95)
    (folder / "truncated.jpg").write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    (folder / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 garbage, not a jpeg")
    Image.new("CMYK", (40, 30), (0, 200, 200, 0)).save(folder / "cmyk.jpg")
    Image.new("RGBA", (40, 30), (0, 0, 255, 128)).save(folder / "rgba.png")
    names = ["good.jpg", "truncated.jpg", "corrupt.jpg", "cmyk.jpg", "rgba.png", "missing.jpg"]
    lines = [{"image": name, "captions": [f"picture {i}"], "split": "test"}
             for i, name in enumerate(names)]
    path = folder / "data.jsonl"
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return path


def test_extract_survives_a_messy_folder_and_names_the_bad_images(tiny_clip_dir, tmp_path, capsys,
                                                                 caplog):
    from diffusion_captioner.cli import main

    data = messy_folder(tmp_path / "photos")
    argv = ["extract", "--dataset", json.dumps({"type": "jsonl", "path": str(data)}),
            "--encoder", f"local-dir:{tiny_clip_dir}", "--splits", "test",
            "--cache-dir", str(tmp_path / "cache"), "--quiet"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "test: 3 images extracted" in out and "3 skipped (1 missing files)" in out
    for bad in ("truncated.jpg", "corrupt.jpg", "missing.jpg"):
        assert bad in out and bad in caplog.text
    assert "cmyk.jpg" not in out and "rgba.png" not in out
    assert main(argv) == 0
    again = capsys.readouterr().out
    assert "3 images cached, 3 skipped" in again  # the skipped list is kept with the features


def test_interrupted_extraction_resumes_at_its_shard(tiny_encoder, tmp_path):
    dataset = build("dataset", SHAPES_12)
    records = dataset.records("val")  # 11 records -> shards [0,4) [4,8) [8,11)
    cache = FeatureCache(tmp_path / "cache", shard_size=4)
    stopping = StopAfter(tiny_encoder, limit=6)  # dies inside the second shard
    with pytest.raises(KeyboardInterrupt):
        cache.get(dataset, "val", stopping, batch_size=2, progress=False)
    shards = cache.shard_dir(dataset, "val", tiny_encoder)
    assert sorted(p.name for p in shards.glob("*.safetensors")) == [
        "rows-000000000-000000004.safetensors"]
    assert not cache.path(dataset, "val", tiny_encoder).exists()

    resumed_encoder = StopAfter(tiny_encoder)
    resumed = cache.get(dataset, "val", resumed_encoder, batch_size=2, progress=False)
    assert resumed_encoder.encoded == len(records) - 4  # the finished shard was not redone
    assert not resumed.from_cache and resumed.image_ids == [r.image_id for r in records]
    assert cache.path(dataset, "val", tiny_encoder).is_file() and not shards.exists()
    whole = extract_features(dataset, records, tiny_encoder, batch_size=5, progress=False)
    assert torch.allclose(resumed.features, whole.features, atol=1e-5)
    assert cache.get(dataset, "val", StopAfter(tiny_encoder, limit=0), progress=False).from_cache


def test_a_damaged_shard_is_extracted_again(tiny_encoder, tmp_path):
    dataset = build("dataset", SHAPES_12)
    cache = FeatureCache(tmp_path, shard_size=4)
    with pytest.raises(KeyboardInterrupt):
        cache.get(dataset, "val", StopAfter(tiny_encoder, limit=8), batch_size=4, progress=False)
    shards = sorted(cache.shard_dir(dataset, "val", tiny_encoder).glob("*.safetensors"))
    assert len(shards) == 2
    shards[1].write_bytes(b"half a file")
    counting = StopAfter(tiny_encoder)
    result = cache.get(dataset, "val", counting, batch_size=4, progress=False)
    assert counting.encoded == 4 + 3 and len(result.records) == 11


def test_empty_split_and_reduced_precision(tiny_clip_dir, tmp_path):
    from diffusion_captioner.encoders import OpenClipEncoder

    photos = tmp_path / "p"
    photos.mkdir()
    Image.new("RGB", (32, 32), "red").save(photos / "a.png")
    file = tmp_path / "c.json"
    file.write_text(json.dumps({"images": [{"id": 5, "file_name": "a.png"}],
                                "annotations": [{"id": 1, "image_id": 5, "caption": "red"}]}))
    dataset = build("dataset", {"type": "coco", "annotations": str(file), "image_dir": str(photos)})
    full = OpenClipEncoder(f"local-dir:{tiny_clip_dir}")
    half = OpenClipEncoder(f"local-dir:{tiny_clip_dir}", precision="bf16")
    assert half.fingerprint != full.fingerprint  # different precision, different cache entry
    cache = FeatureCache(tmp_path / "cache")
    empty = cache.get(dataset, "train", full, progress=False)
    assert empty.features.shape == (0, full.dim) and empty.records == []
    a = cache.get(dataset, "test", full, progress=False).features
    b = cache.get(dataset, "test", half, progress=False).features
    assert b.dtype == torch.float32 and torch.nn.functional.cosine_similarity(a, b).item() > 0.95


def test_two_cpu_processes_share_the_shards_through_accelerate_launch(tiny_clip_dir, tmp_path):
    script = tmp_path / "extract_ddp.py"
    script.write_text(textwrap.dedent(f"""
        import json, sys
        sys.path[:0] = [{str(ROOT)!r}]
        import torch
        torch.set_num_threads(1)
        from accelerate import PartialState
        from diffusion_captioner.encoders import OpenClipEncoder
        from diffusion_captioner.features import FeatureCache
        from registry import build
        dataset = build("dataset", {SHAPES_12!r})
        encoder = OpenClipEncoder("local-dir:{tiny_clip_dir}")
        encoded = []
        inner = encoder.encode_images
        encoder.encode_images = lambda pixels: encoded.append(len(pixels)) or inner(pixels)
        features = FeatureCache({str(tmp_path / 'cache')!r}, shard_size=3).get(
            dataset, "val", encoder, batch_size=2, progress=False)
        assert features.image_ids == [r.image_id for r in dataset.records("val")]
        torch.save(features.features, {str(tmp_path)!r} + f"/rank{{PartialState().process_index}}.pt")
        state = PartialState()
        with open({str(tmp_path)!r} + f"/rank{{state.process_index}}.json", "w") as handle:
            json.dump({{"world": state.num_processes, "encoded": sum(encoded)}}, handle)
        """))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "CUDA_VISIBLE_DEVICES": ""}
    completed = subprocess.run(
        [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
         "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
         "--main_process_port", "29547", str(script)],
        capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)
    assert completed.returncode == 0, completed.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    # shards of 3: rank 0 takes [0,3) and [6,9) (6 images), rank 1 [3,6) and [9,11) (5 images)
    assert ranks == [{"world": 2, "encoded": 6}, {"world": 2, "encoded": 5}]
    rank0, rank1 = torch.load(tmp_path / "rank0.pt"), torch.load(tmp_path / "rank1.pt")
    assert torch.equal(rank0, rank1) and rank0.shape[0] == 11
    cache_files = list((tmp_path / "cache").iterdir())
    assert [p.suffix for p in cache_files] == [".safetensors"]  # merged; the shards are gone
    from diffusion_captioner.encoders import OpenClipEncoder

    dataset = build("dataset", SHAPES_12)
    single = extract_features(dataset, dataset.records("val"),
                              OpenClipEncoder(f"local-dir:{tiny_clip_dir}"), progress=False)
    assert torch.allclose(rank0, single.features, atol=1e-5)
