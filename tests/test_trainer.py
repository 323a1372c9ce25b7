"""Trainer: loss goes down, logs and checkpoints are written, resume == uninterrupted run,
every LR schedule runs, and two CPU processes train through `accelerate launch`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import jsonlines
import pytest
import torch

from diffusion_captioner.trainer import CaptionPairs, TrainConfig, Trainer
from registry import build

ROOT = Path(__file__).resolve().parents[1]
WORDS = "a the red blue green small large circle square triangle left right of to above below".split()


def tiny_decoder(tokenizer_dir: Path, feature_dim: int = 8):
    torch.manual_seed(0)
    return build("decoder", {
        "type": "clipcap", "lm_pretrained": False, "tokenizer": str(tokenizer_dir),
        "lm_config": {"n_layer": 1, "n_embd": 32, "n_head": 2, "n_positions": 32,
                      "resid_pdrop": 0.1, "embd_pdrop": 0.1, "attn_pdrop": 0.1},
        "prefix_length": 2, "max_length": 8,
    }, feature_dim=feature_dim)


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory) -> Path:
    from diffusion_captioner.tokenization import build_word_tokenizer

    folder = tmp_path_factory.mktemp("words")
    build_word_tokenizer(WORDS).save_pretrained(folder)
    return folder


def toy_pairs(n: int = 12, seed: int = 0) -> CaptionPairs:
    generator = torch.Generator().manual_seed(seed)
    features = torch.randn(n, 8, generator=generator)  # (N, 8)
    captions = [(f"a {c} circle", f"the {c} circle", f"a small {c} circle")
                for c in ("red", "blue", "green") * (n // 3)]
    return CaptionPairs(features, captions)


def losses(folder: Path) -> dict[int, float]:
    with jsonlines.open(folder / "train_log.jsonl") as log:
        return {row["step"]: row["loss"] for row in log if "loss" in row}


def test_training_reduces_loss_and_writes_checkpoints(tokenizer_dir, tmp_path):
    config = TrainConfig(batch_size=6, lr=3e-3, max_steps=30, eval_every=10, log_every=1,
                         eval_batches=2)
    trainer = Trainer(tiny_decoder(tokenizer_dir), toy_pairs(), toy_pairs(6, 1), config,
                      tmp_path, progress=False)
    state = trainer.fit()
    logged = losses(tmp_path)
    assert state.finished and state.step == 30
    assert sum(list(logged.values())[-5:]) / 5 < sum(list(logged.values())[:5]) / 5
    assert (tmp_path / "checkpoint" / "best" / "config.json").is_file()
    assert json.loads((tmp_path / "checkpoint" / "last" / "trainer_state.json").read_text())[
        "finished"]
    with jsonlines.open(tmp_path / "train_log.jsonl") as log:
        assert any("val_loss" in row for row in log)
    assert not list((tmp_path / "checkpoint").glob("*.partial"))


def test_resume_takes_the_same_steps_as_an_uninterrupted_run(tokenizer_dir, tmp_path):
    config = TrainConfig(batch_size=4, lr=1e-3, max_steps=8, eval_every=100, log_every=1,
                         lr_schedule="linear", warmup_steps=2)
    whole = tmp_path / "whole"
    Trainer(tiny_decoder(tokenizer_dir), toy_pairs(), None, config, whole, progress=False).fit()
    parts = tmp_path / "parts"
    first = Trainer(tiny_decoder(tokenizer_dir), toy_pairs(), None, config, parts, progress=False)
    assert first.fit(stop_at_step=5).step == 5  # mid-epoch: 36 pairs / batch 4 = 9 per epoch
    # a fresh process would rebuild everything from scratch; perturb the RNG to prove it is restored
    torch.manual_seed(1234)
    second = Trainer(tiny_decoder(tokenizer_dir), toy_pairs(), None, config, parts, progress=False)
    assert second.fit().step == 8
    uninterrupted, resumed = losses(whole), losses(parts)
    for step in (6, 7, 8):
        assert resumed[step] == pytest.approx(uninterrupted[step], abs=1e-6), step
    assert resumed[6] != uninterrupted[5]


@pytest.mark.parametrize("schedule", ["constant", "linear", "cosine_with_restarts"])
def test_lr_schedules(tokenizer_dir, tmp_path, schedule):
    config = TrainConfig(batch_size=4, lr=1e-3, max_steps=6, warmup_steps=2, log_every=1,
                         lr_schedule=schedule, num_cycles=2)
    Trainer(tiny_decoder(tokenizer_dir), toy_pairs(), None, config, tmp_path, progress=False).fit()
    with jsonlines.open(tmp_path / "train_log.jsonl") as log:
        rates = [row["lr"] for row in log if "lr" in row]
    assert rates[0] < 1e-3  # warm-up
    if schedule == "constant":
        assert rates[-1] == pytest.approx(1e-3)
    else:
        assert rates[-1] < max(rates)


def test_epochs_budget_and_unknown_option():
    with pytest.raises(ValueError, match="unknown training option.*bogus"):
        TrainConfig.from_dict({"bogus": 1})
    with pytest.raises(ValueError, match="epochs or max_steps"):
        Trainer(torch.nn.Linear(1, 1), toy_pairs(), None, TrainConfig(), "/tmp/unused",
                progress=False)


def test_two_cpu_processes_through_accelerate_launch(tokenizer_dir, tmp_path):
    script = tmp_path / "train_ddp.py"
    script.write_text(textwrap.dedent(f"""
        import sys
        sys.path[:0] = [{str(ROOT)!r}, {str(Path(__file__).parent)!r}]
        import torch
        from accelerate import PartialState
        from test_trainer import tiny_decoder, toy_pairs
        from diffusion_captioner.trainer import Trainer, TrainConfig
        from pathlib import Path
        config = TrainConfig(batch_size=3, lr=1e-3, max_steps=4, log_every=1, eval_every=2)
        trainer = Trainer(tiny_decoder(Path({str(tokenizer_dir)!r})), toy_pairs(), toy_pairs(6, 1),
                          config, Path({str(tmp_path / 'out')!r}), progress=False)
        assert trainer.accelerator.num_processes == 2, trainer.accelerator.num_processes
        state = trainer.fit()
        weights = torch.cat([p.detach().flatten() for p in trainer.model.parameters()])
        gathered = trainer.accelerator.gather(weights.unsqueeze(0))
        assert torch.allclose(gathered[0], gathered[1]), "replicas diverged"
        print("RANK_DONE", PartialState().process_index, state.step)
        PartialState().destroy_process_group()  # else gloo may abort at interpreter exit
        sys.stdout.flush()
        import os
        os._exit(0)  # gloo's threads can still abort the teardown on a loaded machine
        """))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "CUDA_VISIBLE_DEVICES": ""}
    completed = subprocess.run(
        [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
         "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
         "--main_process_port", "29533", str(script)],
        capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)
    assert completed.returncode == 0, completed.stderr[-3000:]
    assert completed.stdout.count("RANK_DONE") == 2
    assert (tmp_path / "out" / "checkpoint" / "best" / "model.safetensors").is_file()
