"""The weight average (``train.ema_decay``): the update rule, the swap, checkpoint/best holding
the average while training continues from the trained weights, and resume."""

from __future__ import annotations

import pytest
import torch

from diffusion_captioner.ema import WeightAverage
from diffusion_captioner.trainer import TrainConfig, Trainer
from registry import CaptionDecoder
from tests.test_trainer import tiny_decoder, tokenizer_dir, toy_pairs  # noqa: F401 - fixture


def test_update_follows_the_warmed_up_decay_and_swap_restores_the_weights():
    weight = torch.nn.Parameter(torch.zeros(3))
    average = WeightAverage([weight], decay=0.5)
    expected = torch.zeros(3)
    for step, value in enumerate((1.0, 2.0, 4.0, 8.0)):
        with torch.no_grad():
            weight.fill_(value)
        d = min(0.5, (1 + step) / (10 + step))  # 0.1, 0.18.., 0.25, 0.30..
        expected = d * expected + (1 - d) * value
        average.update()
        assert torch.allclose(average.average[0], expected)
    with average.swapped_in():
        assert torch.allclose(weight, expected)
    assert torch.equal(weight.detach(), torch.full((3,), 8.0))
    with pytest.raises(ValueError, match="ema_decay"):
        WeightAverage([weight], decay=1.0)
    with pytest.raises(ValueError, match="ema_decay"):
        TrainConfig.from_dict({"ema_decay": 1.5})


def _best_and_trained(trainer: Trainer, folder) -> tuple[torch.Tensor, torch.Tensor, str]:
    """The first trained tensor as checkpoint/best holds it, and as the model holds it now."""
    model = trainer.accelerator.unwrap_model(trainer.model)
    name, trained = next((n, p) for n, p in model.named_parameters() if p.requires_grad)
    best = dict(CaptionDecoder.from_pretrained(folder / "checkpoint" / "best").named_parameters())
    return best[name].detach(), trained.detach().clone(), name


def test_best_checkpoint_holds_the_average_and_resume_continues_it(tokenizer_dir, tmp_path):  # noqa: F811
    config = TrainConfig(batch_size=4, lr=3e-3, max_steps=8, eval_every=8, log_every=1,
                         ema_decay=0.9)
    whole = Trainer(tiny_decoder(tokenizer_dir), toy_pairs(), toy_pairs(6, 1), config,
                    tmp_path / "whole", progress=False)
    whole.fit()
    best, trained, name = _best_and_trained(whole, tmp_path / "whole")
    average = whole.average.average[0]
    assert not torch.allclose(best, trained), "best holds the trained weights, not the average"
    assert torch.allclose(best, average.view_as(best)), name
    # killed at step 5 and resumed: the same average as the uninterrupted run
    first = Trainer(tiny_decoder(tokenizer_dir), toy_pairs(), toy_pairs(6, 1), config,
                    tmp_path / "parts", progress=False)
    first.fit(stop_at_step=5)
    second = Trainer(tiny_decoder(tokenizer_dir), toy_pairs(), toy_pairs(6, 1), config,
                     tmp_path / "parts", progress=False)
    second.fit()
    assert second.average.updates == 8
    for mine, theirs in zip(second.average.average, whole.average.average, strict=True):
        assert torch.allclose(mine, theirs, atol=1e-6)


def test_resuming_with_another_decay_is_refused():
    weight = torch.nn.Parameter(torch.zeros(2))
    saved = WeightAverage([weight], decay=0.9)
    saved.update()
    other = WeightAverage([weight], decay=0.99)
    with pytest.raises(ValueError, match="ema_decay 0.9, this run asks for 0.99"):
        other.load_state_dict(saved.state_dict())
    same = WeightAverage([weight], decay=0.9)
    same.load_state_dict(saved.state_dict())
    assert same.updates == 1
