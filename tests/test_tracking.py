"""Experiment trackers through accelerate: TensorBoard event files written offline by the
trainer carry the jsonl log's scalars (read back), the jsonl log is unchanged, and a tracker
that is unknown or not installed fails in one line before any training."""

from __future__ import annotations

import jsonlines
import pytest
import torch

from diffusion_captioner.cli import main
from diffusion_captioner.trainer import CaptionPairs, TrainConfig, Trainer
from registry import build

WORDS = "a the red blue green small circle".split()


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    from diffusion_captioner.tokenization import build_word_tokenizer

    folder = tmp_path_factory.mktemp("words")
    build_word_tokenizer(WORDS).save_pretrained(folder)
    return folder


def tiny_trainer(tokenizer_dir, out, **kwargs) -> Trainer:
    torch.manual_seed(0)
    decoder = build("decoder", {
        "type": "clipcap", "lm_pretrained": False, "tokenizer": str(tokenizer_dir),
        "lm_config": {"n_layer": 1, "n_embd": 16, "n_head": 2, "n_positions": 16},
        "prefix_length": 2, "max_length": 6}, feature_dim=4)
    generator = torch.Generator().manual_seed(0)
    features = torch.randn(6, 4, generator=generator)  # (N, 4)
    captions = [(f"a {c} circle", f"the small {c} circle") for c in ("red", "blue", "green") * 2]
    config = TrainConfig(batch_size=4, lr=1e-3, max_steps=4, eval_every=2, log_every=1,
                         eval_batches=1)
    return Trainer(decoder, CaptionPairs(features, captions), CaptionPairs(features, captions),
                   config, out, progress=False, **kwargs)


def read_log(folder):
    with jsonlines.open(folder / "train_log.jsonl") as log:
        return [{k: v for k, v in row.items() if k != "elapsed_s"} for row in log]


def test_tensorboard_gets_the_jsonl_scalars_and_the_log_is_unchanged(tokenizer_dir, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tracked = tiny_trainer(tokenizer_dir, tmp_path / "tracked", log_with=["tensorboard"],
                           tracker_dir=tmp_path / "tracker", tracker_name="clipcap")
    tracked.fit(end_tracking=False)
    tracked.track({"CIDEr": 0.5, "Bleu_4": 0.25}, tracked.state.step, prefix="test/")
    tracked.end_tracking()
    plain = tiny_trainer(tokenizer_dir, tmp_path / "plain")
    plain.fit()
    log = read_log(tmp_path / "tracked")
    assert log == read_log(tmp_path / "plain")  # the jsonl log is what it was without trackers
    assert not (tmp_path / "plain" / "tracker").exists()

    events = EventAccumulator(str(tmp_path / "tracker" / "clipcap"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"loss", "lr", "val_loss", "train_loss", "best_val_loss", "test/CIDEr"} <= tags
    assert "step" not in tags
    logged = {row["step"]: row["loss"] for row in log if "loss" in row}
    read_back = {event.step: event.value for event in events.Scalars("loss")}
    assert set(read_back) == set(logged)
    for step, value in logged.items():
        assert read_back[step] == pytest.approx(value, rel=1e-5)
    val = {row["step"]: row["val_loss"] for row in log if "val_loss" in row}
    assert {e.step: e.value for e in events.Scalars("val_loss")} == pytest.approx(val, rel=1e-5)
    assert [(e.step, e.value) for e in events.Scalars("test/CIDEr")] == [(4, 0.5)]


def test_unknown_or_missing_tracker_fails_in_one_line(monkeypatch, capsys):
    import accelerate.tracking

    from diffusion_captioner import cli
    from diffusion_captioner.tracking import check_trackers

    assert check_trackers(["tensorboard", "tensorboard", ""]) == ["tensorboard"]
    with pytest.raises(ValueError, match="unknown tracker nosuch; accelerate supports: tensorboard"):
        check_trackers(["nosuch"])
    monkeypatch.setattr(accelerate.tracking, "get_available_trackers", lambda: [])
    with pytest.raises(ValueError, match="--log-with wandb: wandb not installed; pip install wandb"):
        check_trackers(["wandb"])

    def no_training(*args, **kwargs):
        raise AssertionError("compare ran with a tracker that is not installed")

    monkeypatch.setattr("diffusion_captioner.comparison.compare", no_training)
    monkeypatch.setattr(cli, "_include", no_training)
    assert main(["compare", "--log-with", "tensorboard,mlflow"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert "--log-with tensorboard,mlflow: tensorboard and mlflow not installed; pip install tensorboard mlflow" in err
