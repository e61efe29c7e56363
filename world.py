"""The World: what the training loop needs of a text-to-image flow model, and nothing more.

Two worlds implement it: toy.ToyWorld (the built-in toy, on a CPU) and sd3.SD3World (Stable Diffusion 3 / 3.5 via
diffusers, the paper's setup). A new model (FLUX, SD3.5 Large, ...) is one new file with a class of these members
and a few lines in runs.build_world. The loop adds a peft LoRA to `transformer` and trains only that.

Notation: x -> x_t (B, *latent_shape); t -> (B,) in [0, 1], 1 = noise; v -> v_theta(x_t, t, c) ~ x1 - x0;
guidance -> g, CFG v = v_u + g (v_c - v_u) with v_u the velocity of the empty prompt (METHOD.md §1).
"""
from contextlib import contextmanager
from typing import Protocol, runtime_checkable

import torch


@runtime_checkable
class World(Protocol):
    transformer: torch.nn.Module  # the denoiser, base weights frozen; the loop adds the LoRA (choice 13)
    device: torch.device
    latent_shape: tuple  # (C, H, W) of one sample
    train_prompts: list  # the training prompts (--prompts replaces them)
    eval_prompts: list  # the held-out prompts
    default_guidance: float  # the CFG scale g when --guidance is 0

    def encode(self, prompts: list) -> dict:
        """Batch-first tensors that velocity needs for these prompts, CFG's negatives included."""

    def velocity(self, x: torch.Tensor, t: torch.Tensor, cond: dict, guidance: float,
                 detach_uncond: bool = False) -> torch.Tensor:
        """v_theta(x_t, t, c) in float32; guidance != 1 combines both branches of one doubled batch with `guided`."""

    def decode(self, x0: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) float32 images in [0, 1]: what a reward scores."""


# A world may also have render_quality(images) -> (B,), as the toy has: the evaluation then logs it.


def guided(v_u, v_c, guidance, detach_uncond=False):
    """Classifier-free guidance v_u + g (v_c - v_u). detach_uncond: no gradient through the unconditional branch,
    as Flow-GRPO trains (choice 14); else the LoRA is also pushed to widen v_c - v_u, i.e. to amplify guidance."""
    if detach_uncond:
        v_u = v_u.detach()
    return v_u + guidance * (v_c - v_u)


@contextmanager
def base_model(transformer):
    """The reference policy of the KL (METHOD.md §5): the same network with its LoRA switched off, no second copy."""
    transformer.disable_adapters()
    try:
        yield
    finally:
        transformer.enable_adapters()
