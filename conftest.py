"""What the test files share: no download ever, tiny toy runs, float comparisons that hold on any CPU.

Run: python -m pytest -q   (slow end-to-end runs: python -m pytest -q -m slow)
"""
import dataclasses
import os

os.environ["HF_HUB_OFFLINE"] = "1"  # nothing can be downloaded in tests: fail at once instead of retrying

import torch  # noqa: E402

import config  # noqa: E402


def relative_error(a, b):
    """||a - b|| / ||b||: how float32 results of different orders of computation (batched or not, another CPU's
    kernels, another thread count) are compared, since their elements may differ in the last bits."""
    return (torch.linalg.vector_norm((a - b).double()) / torch.linalg.vector_norm(b.double())).item()


def tiny_config(tmp_path, **overrides):
    """A toy run small enough for seconds on 2 CPU cores: 2 prompts x 2 trajectories, T = 4, 20 pretraining steps
    (one base, pretrained once for the whole session in the shared cache)."""
    cfg = config.toy(config.Config())
    cfg = dataclasses.replace(cfg, out=str(tmp_path / "run"), cache_dir=str(tmp_path.parent / "toy_cache"),
                              pretrain_steps=20, steps=2, prompts_per_step=2, group_size=2, num_steps=4,
                              tweedie_substeps=2, eval_steps=2, eval_every=1, micro_batch=2, lr=1e-2)
    return dataclasses.replace(cfg, **overrides)


def lora_state(out):
    """The live LoRA of a run's checkpoint."""
    return torch.load(os.path.join(out, "ckpt.pt"), weights_only=False)["lora"]


def dead_ends(transformer):
    """The LoRA B's that get no gradient: a context_pre_only block (SD3's last) discards its text outputs, so its
    text-stream query add_q_proj reaches nothing (Flow-GRPO adapts it all the same); B starts at 0 and stays."""
    return [f"transformer_blocks.{i}.attn.add_q_proj.lora_B.weight"
            for i, block in enumerate(transformer.transformer_blocks) if block.context_pre_only]
