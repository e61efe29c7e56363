"""What the test files share: no download ever, tiny toy runs, tiny CLIPs, float comparisons that hold on any CPU.

Run: python -m pytest -q   (slow end-to-end runs: python -m pytest -q -m slow)
"""
import dataclasses
import os

os.environ["HF_HUB_OFFLINE"] = "1"  # nothing can be downloaded in tests: fail at once instead of retrying

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402
from transformers import (CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTextConfig,  # noqa: E402
                          CLIPTokenizer)
from transformers.convert_slow_tokenizer import bytes_to_unicode  # noqa: E402

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


def tiny_clip_tokenizer():
    """A byte-level CLIP tokenizer without merges: 256 bytes, their </w> forms, start and end (514 ids), 40 tokens."""
    chars = list(bytes_to_unicode().values())
    vocab = {c: i for i, c in enumerate(chars)} | {c + "</w>": 256 + i for i, c in enumerate(chars)}
    vocab |= {"<|startoftext|>": 512, "<|endoftext|>": 513}
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=40)


def tiny_text_config():
    return CLIPTextConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                          projection_dim=16, vocab_size=514, max_position_embeddings=40,
                          bos_token_id=512, eos_token_id=513, pad_token_id=513)


def tiny_clip():
    """A random CLIPModel (16 px images, 8 px patches) and a processor built in memory."""
    torch.manual_seed(0)
    config = CLIPConfig(text_config=tiny_text_config().to_dict(), projection_dim=16,
                        vision_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                           num_attention_heads=2, image_size=16, patch_size=8, projection_dim=16))
    processor = CLIPProcessor(image_processor=CLIPImageProcessor(size={"shortest_edge": 16},
                                                                 crop_size={"height": 16, "width": 16}),
                              tokenizer=tiny_clip_tokenizer())
    return CLIPModel(config).eval(), processor


def smooth_images(batch, height, width, seed=0):
    """Random low-frequency images in [0, 1], where PIL's and torch's resampling differ least."""
    coarse = torch.rand(batch, 3, 4, 4, generator=torch.Generator().manual_seed(seed))
    return torch.nn.functional.interpolate(coarse, size=(height, width), mode="bilinear", align_corners=True)


def smooth_pil(height, width, seed=0):
    """A smooth random image as a PIL image (uint8) and as the (1, 3, H, W) tensor in [0, 1] of those very bytes: the
    same picture for a processor's PIL path and for a torch preprocessing."""
    pixels = (smooth_images(1, height, width, seed)[0].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    return Image.fromarray(pixels), torch.from_numpy(pixels).permute(2, 0, 1)[None].float() / 255
