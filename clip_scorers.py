"""Rewards of the CLIP family: an image and a prompt embedded by a CLIP model, scored by their cosine.

    clip_pixels     CLIP's preprocessing in torch, on the images' device (choice 22)
    CLIPScore       cos(text, image) of openai/clip-vit-large-patch14 (choice 24)
    PickScore       logit_scale.exp() cos / 26 of yuvalkirstain/PickScore_v1, as Flow-GRPO reports it (choice 23)
Each takes images (B, 3, H, W) float32 in [0, 1] and their prompts and returns (B,) float32 scores, without gradient;
rewards.py picks one by name.
"""
import torch
import torch.nn.functional as F

from files import hub_load, quiet_image_processors

quiet_image_processors()  # before transformers' image processors are imported
from transformers import CLIPModel, CLIPProcessor  # noqa: E402

PICKSCORE_MODEL = "yuvalkirstain/PickScore_v1"
PICKSCORE_PROCESSOR = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"  # PickScore was fine-tuned from this CLIP-H
CLIP_MODEL = "openai/clip-vit-large-patch14"


def clip_pixels(images, size, mean, std):
    """CLIP's input from (B, 3, H, W) images in [0, 1]: short side resized to `size`, centre crop, normalised; in
    torch, on the images' device: the T+1 images of every trajectory need no GPU -> CPU -> PIL trip (choice 22)."""
    h, w = images.shape[-2:]
    hh, ww = max(size, round(h * size / min(h, w))), max(size, round(w * size / min(h, w)))
    x = F.interpolate(images, size=(hh, ww), mode="bicubic", antialias=True, align_corners=False)
    top, left = (hh - size) // 2, (ww - size) // 2
    x = x[..., top:top + size, left:left + size].clamp(0, 1)  # PIL resizes in uint8, which clips bicubic overshoot
    return (x - mean.view(1, 3, 1, 1)) / std.view(1, 3, 1, 1)


def embedding(features):
    """The projected embedding: transformers 5 returns an output object (its .pooler_output), 4.x a tensor."""
    return features if torch.is_tensor(features) else features.pooler_output


class CLIPScore(torch.nn.Module):
    """scale * cos(text embedding, image embedding) of a transformers CLIPModel and its CLIPProcessor."""

    def __init__(self, model, processor):
        super().__init__()
        self.model = model.eval().requires_grad_(False)
        self.tokenizer, image_processor = processor.tokenizer, processor.image_processor
        self.size = image_processor.crop_size["height"]
        self.register_buffer("mean", torch.tensor(image_processor.image_mean), persistent=False)
        self.register_buffer("std", torch.tensor(image_processor.image_std), persistent=False)

    def scale(self):
        return 1.0

    @torch.no_grad()
    def forward(self, images, prompts):
        device, dtype = self.mean.device, self.model.dtype
        pixels = clip_pixels(images.to(device, torch.float32), self.size, self.mean, self.std)
        text = self.tokenizer(list(prompts), padding=True, truncation=True, return_tensors="pt",
                              max_length=self.model.config.text_config.max_position_embeddings).to(device)
        image_features = self.model.get_image_features(pixel_values=pixels.to(dtype))
        image_emb = F.normalize(embedding(image_features).float(), dim=-1)
        text_emb = F.normalize(embedding(self.model.get_text_features(**text)).float(), dim=-1)
        return self.scale() * (image_emb * text_emb).sum(-1)  # (B,)


class PickScore(CLIPScore):
    """PickScore as Flow-GRPO reports it: logit_scale.exp() * cos / 26 (the score a softmax over images uses, / 26)."""

    def scale(self):
        return self.model.logit_scale.exp().float() / 26


def _load_scorer(cls, name, model_id, processor_id, device):
    """cls(model, processor) on `device`, failing fast with --reward and both repos in the message (files.hub_load)."""
    flag = f"--reward {name} (needs {' and '.join(dict.fromkeys([model_id, processor_id]))})"
    processor = hub_load(CLIPProcessor.from_pretrained, processor_id, flag, folder_ok=False)
    model = hub_load(CLIPModel.from_pretrained, model_id, flag, folder_ok=False)
    return cls(model, processor).to(device)


def load_pickscore(device):
    return _load_scorer(PickScore, "pickscore", PICKSCORE_MODEL, PICKSCORE_PROCESSOR, device)


def load_clip(device):
    return _load_scorer(CLIPScore, "clip", CLIP_MODEL, CLIP_MODEL, device)
