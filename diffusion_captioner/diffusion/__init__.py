"""CLIP-DiffusionLM: continuous diffusion over caption word embeddings.

``schedule`` (noise schedules and the sampler step; pure tensors, owns no network) |
``denoiser`` (the DistilBERT x_0 predictor, an ``nn.Module``) | ``decoder`` (both plus the frozen
word embeddings and LM head: the ``diffusion`` :class:`~registry.CaptionDecoder`).
"""

from diffusion_captioner.diffusion.schedule import NoiseSchedule, clamp_to_vocabulary

__all__ = ["NoiseSchedule", "clamp_to_vocabulary"]
