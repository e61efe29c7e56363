"""Rewards of the CLIP family: an image and a prompt embedded by a CLIP model, scored by their cosine or by an MLP.

    clip_pixels     CLIP's preprocessing in torch, on the images' device (choice 22)
    CLIPScore       cos(text, image) of openai/clip-vit-large-patch14 (choice 24)
    PickScore       logit_scale.exp() cos / 26 of yuvalkirstain/PickScore_v1, as Flow-GRPO reports it (choice 23)
    HPSv2           HPS v2.1 (Wu et al. 2023, github.com/tgxs002/HPSv2): cos(text, image) of an open_clip ViT-H-14
                    fine-tune, xswu/HPSv2 HPS_v2.1_compressed.pt, mapped into a transformers CLIPModel (choice 31);
                    in [-1, 1], in practice about 0.2-0.4
    Aesthetic       LAION aesthetic predictor v2 (github.com/christophschuhmann/improved-aesthetic-predictor): an
                    MLP on the L2-normalised CLIP ViT-L/14 image embedding, as DDPO and Flow-GRPO score it; the prompt
                    is ignored; unbounded, trained on mean ratings of 1-10, in practice about 4-7
Each takes images (B, 3, H, W) float32 in [0, 1] and their prompts and returns (B,) float32 scores, without gradient;
rewards.py picks one by name. flops_per_image counts the model FLOPs of one image at full size.
"""
import re

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from files import hub_file, hub_load, quiet_image_processors

quiet_image_processors()  # before transformers' image processors are imported
from transformers import CLIPConfig, CLIPModel, CLIPProcessor  # noqa: E402

PICKSCORE_MODEL = "yuvalkirstain/PickScore_v1"
PICKSCORE_PROCESSOR = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"  # PickScore was fine-tuned from this CLIP-H
CLIP_MODEL = "openai/clip-vit-large-patch14"
HPS_REPO = "xswu/HPSv2"
HPS_FILE = "HPS_v2.1_compressed.pt"  # hpsv2.utils.hps_version_map["v2.1"]
HPS_PROCESSOR = PICKSCORE_PROCESSOR  # HPS v2.1 fine-tunes the same CLIP-H and keeps its tokenizer and image statistics
# sac+logos+ava1-l14-linearMSE.pth renamed, byte for byte (sha256 21dd590f...f1e0, as in the GitHub repo), kept by the
# TRL team for its DDPO trainer: an organisation's copy rather than one of the personal mirrors
AESTHETIC_REPO = "trl-lib/ddpo-aesthetic-predictor"
AESTHETIC_FILE = "aesthetic-model.pth"

# laion/CLIP-ViT-H-14-laion2B-s32B-b79K's config.json: open_clip's ViT-H-14 (embed 1024, width 1280, head width 80)
CLIP_H_CONFIG = dict(
    projection_dim=1024, logit_scale_init_value=2.6592,
    # eos_token_id 2, as there: transformers then pools the text at argmax(input_ids), the end token, as open_clip does
    text_config=dict(vocab_size=49408, hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                     num_attention_heads=16, max_position_embeddings=77, hidden_act="gelu", layer_norm_eps=1e-5,
                     bos_token_id=0, eos_token_id=2, pad_token_id=1),
    vision_config=dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=16,
                       image_size=224, patch_size=14, hidden_act="gelu", layer_norm_eps=1e-5))
# openai/clip-vit-large-patch14's config.json (the aesthetic predictor reads only the image tower)
CLIP_L_VISION = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                     image_size=224, patch_size=14, hidden_act="quick_gelu", projection_dim=768)
CLIP_L_CONFIG = dict(projection_dim=768, vision_config=CLIP_L_VISION,
                     text_config=dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                                      num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu"))


def clip_pixels(images, size, mean, std):
    """CLIP's input from (B, 3, H, W) images in [0, 1]: short side resized to `size`, centre crop, normalised; in
    torch, on the images' device: the T+1 images of every trajectory need no GPU -> CPU -> PIL trip (choice 22)."""
    h, w = images.shape[-2:]
    hh, ww = max(size, round(h * size / min(h, w))), max(size, round(w * size / min(h, w)))
    x = F.interpolate(images, size=(hh, ww), mode="bicubic", antialias=True, align_corners=False)
    top, left = (hh - size) // 2, (ww - size) // 2
    x = x[..., top:top + size, left:left + size].clamp(0, 1)  # PIL resizes in uint8, which clips bicubic overshoot
    return (x - mean.view(1, 3, 1, 1)) / std.view(1, 3, 1, 1)


def hps_pixels(images, size, mean, std):
    """HPSv2's preprocessing (its open_clip fork's ResizeMaxSize) in torch: the long side resized to `size`, the short
    side padded with black to a square, normalised; a square image gets clip_pixels' resize. The resize is
    torchvision's on the float tensor: bicubic, antialiased as torchvision >= 0.17 does, and not clipped to [0, 1]."""
    h, w = images.shape[-2:]
    hh, ww = round(h * size / max(h, w)), round(w * size / max(h, w))
    x = F.interpolate(images, size=(hh, ww), mode="bicubic", antialias=True, align_corners=False)
    top, left = (size - hh) // 2, (size - ww) // 2
    x = F.pad(x, (left, size - ww - left, top, size - hh - top))  # zeros, before normalising: black, as HPSv2 pads
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

    def pixels(self, images):
        return clip_pixels(images.to(self.mean.device, torch.float32), self.size, self.mean, self.std)

    @torch.no_grad()
    def forward(self, images, prompts):
        device, dtype = self.mean.device, self.model.dtype
        pixels = self.pixels(images)
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


class HPSv2(CLIPScore):
    """HPS v2.1 as hpsv2.score computes it: the product of the normalised image and text features, no logit scale,
    of images padded to a square (hps_pixels) rather than cropped."""

    def pixels(self, images):
        return hps_pixels(images.to(self.mean.device, torch.float32), self.size, self.mean, self.std)


# open_clip's names -> CLIPModel's, applied in turn to every key; a key that none matches keeps its name, so that
# load_state_dict(strict=True) reports it as unexpected rather than dropping it unseen
OPEN_CLIP_NAMES = [
    (r"^visual\.transformer\.resblocks\.", "vision_model.encoder.layers."),
    (r"^transformer\.resblocks\.", "text_model.encoder.layers."),
    (r"\.ln_1\.", ".layer_norm1."),
    (r"\.ln_2\.", ".layer_norm2."),
    (r"\.attn\.out_proj\.", ".self_attn.out_proj."),
    (r"\.mlp\.c_fc\.", ".mlp.fc1."),
    (r"\.mlp\.c_proj\.", ".mlp.fc2."),
    (r"^visual\.conv1\.", "vision_model.embeddings.patch_embedding."),
    (r"^visual\.class_embedding$", "vision_model.embeddings.class_embedding"),
    (r"^visual\.positional_embedding$", "vision_model.embeddings.position_embedding.weight"),
    (r"^visual\.ln_pre\.", "vision_model.pre_layrnorm."),
    (r"^visual\.ln_post\.", "vision_model.post_layernorm."),
    (r"^visual\.proj$", "visual_projection.weight"),
    (r"^token_embedding\.", "text_model.embeddings.token_embedding."),
    (r"^positional_embedding$", "text_model.embeddings.position_embedding.weight"),
    (r"^ln_final\.", "text_model.final_layer_norm."),
    (r"^text_projection$", "text_projection.weight"),
]


def open_clip_to_transformers(state):
    """The CLIPModel state dict of an open_clip CLIP's (ViT image tower, built-in text transformer): renamed, the
    fused attention input projection [W_q; W_k; W_v] split into q_proj, k_proj, v_proj, and the two output
    projections transposed (open_clip computes x @ proj, a Linear x @ weight.T)."""
    mapped = {}
    for key, value in state.items():
        for pattern, name in OPEN_CLIP_NAMES:
            key = re.sub(pattern, name, key)
        if ".attn.in_proj_" in key:
            block, kind = key.split(".attn.in_proj_")
            for proj, part in zip("qkv", value.chunk(3)):
                mapped[f"{block}.self_attn.{proj}_proj.{kind}"] = part
        elif key in ("visual_projection.weight", "text_projection.weight"):
            mapped[key] = value.T
        else:
            mapped[key] = value
    return mapped


def load_open_clip(path, config, device):
    """A CLIPModel of `config` on `device` holding the open_clip checkpoint at `path`, a state dict or, as HPSv2
    saves it, {"state_dict": ...}; every weight must find its place and every place a weight (strict)."""
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    state = checkpoint.get("state_dict", checkpoint)
    state = {key.removeprefix("module."): value for key, value in state.items()}  # a DistributedDataParallel save
    with torch.device(device):  # a CPU init of CLIP-H's 986M random parameters is slow where a GPU is at hand
        model = CLIPModel(CLIPConfig(**config))
    model.load_state_dict(open_clip_to_transformers(state), strict=True)
    return model


class AestheticMLP(torch.nn.Module):
    """The predictor's MLP as improved-aesthetic-predictor defines it: five Linear layers and no activation (an affine
    map, as published), the Dropouts keeping the file's layer numbers 0, 2, 4, 6, 7."""

    def __init__(self, dim=768):
        super().__init__()
        self.layers = torch.nn.Sequential(
            torch.nn.Linear(dim, 1024), torch.nn.Dropout(0.2), torch.nn.Linear(1024, 128), torch.nn.Dropout(0.2),
            torch.nn.Linear(128, 64), torch.nn.Dropout(0.1), torch.nn.Linear(64, 16), torch.nn.Linear(16, 1))

    def forward(self, embed):
        return self.layers(embed)


def load_aesthetic_mlp(path):
    """The AestheticMLP holding the state dict at `path` (strict)."""
    mlp = AestheticMLP()
    mlp.load_state_dict(torch.load(path, map_location="cpu", weights_only=True), strict=True)
    return mlp


class Aesthetic(CLIPScore):
    """mlp(image embedding / its norm) of a CLIPModel; the prompts are ignored."""

    def __init__(self, model, processor, mlp):
        super().__init__(model, processor)
        self.mlp = mlp.eval().requires_grad_(False)

    @torch.no_grad()
    def forward(self, images, prompts):
        pixels = self.pixels(images).to(self.model.dtype)
        image_emb = F.normalize(embedding(self.model.get_image_features(pixel_values=pixels)).float(), dim=-1)
        return self.mlp(image_emb).squeeze(-1)  # (B,)


def load_hpsv2(device):
    flag = f"--reward hpsv2 (needs {HPS_REPO} and {HPS_PROCESSOR})"
    processor = hub_load(CLIPProcessor.from_pretrained, HPS_PROCESSOR, flag, folder_ok=False)
    path = hub_load(hub_file(HPS_FILE), HPS_REPO, flag, folder_ok=False)
    return HPSv2(load_open_clip(path, CLIP_H_CONFIG, device), processor).to(device)


def load_aesthetic(device):
    flag = f"--reward aesthetic (needs {AESTHETIC_REPO} and {CLIP_MODEL})"
    path = hub_load(hub_file(AESTHETIC_FILE), AESTHETIC_REPO, flag, folder_ok=False)
    processor = hub_load(CLIPProcessor.from_pretrained, CLIP_MODEL, flag, folder_ok=False)
    model = hub_load(CLIPModel.from_pretrained, CLIP_MODEL, flag, folder_ok=False)
    return Aesthetic(model, processor, load_aesthetic_mlp(path)).to(device)


def flops_per_image(name):
    """Model FLOPs of scoring one image at full size with reward `name` (pickscore, clip, hpsv2 or aesthetic),
    counted by torch's FlopCounterMode on meta tensors (no weights, no memory): the 224 px image tower, and but for
    the aesthetic predictor the text tower on one prompt of 77 tokens."""
    configs = dict(pickscore=CLIP_H_CONFIG, hpsv2=CLIP_H_CONFIG, clip=CLIP_L_CONFIG,
                   aesthetic=dict(projection_dim=768, vision_config=CLIP_L_VISION))
    if name not in configs:
        raise ValueError(f"flops_per_image: {name!r} is not one of {', '.join(configs)}")
    with torch.device("meta"):
        model = CLIPModel(CLIPConfig(**configs[name]))
        mlp = AestheticMLP()
        pixels = torch.randn(1, 3, 224, 224)
        tokens = torch.zeros(1, 77, dtype=torch.long)
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        if name == "aesthetic":
            mlp(F.normalize(embedding(model.get_image_features(pixel_values=pixels)), dim=-1))
        else:
            model(input_ids=tokens, pixel_values=pixels)
    return counter.get_total_flops()
