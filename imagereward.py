"""ImageReward (Xu et al. 2023, THUDM/ImageReward): a BLIP model fine-tuned on human preferences for text-to-image.

    imagereward_pixels   ImageReward's preprocessing in torch, on the images' device (choice 22)
    ImageReward          BLIP's ViT-L/16 (224 px) -> BERT with cross-attention to the image -> MLP on [CLS]
    map_state_dict       ImageReward.pt's keys -> transformers' BlipVisionModel / BlipTextModel (+ the MLP)
    load_imagereward     the published weights, THUDM/ImageReward, with google-bert/bert-base-uncased's vocabulary
The score is ImageReward.score()'s: r = (mlp(h_[CLS]) - 0.16717) / 1.03334, where h_[CLS] is the text encoder's
first output. The prompt is tokenized as ImageReward does (BLIP's bert-base-uncased tokenizer, padded to 35 tokens,
truncated), its first token stays [CLS] (score() does not swap in [ENC]), and the text attends to every image token.
Scale and range: ImageReward's mean and std make r a z-score over the data they were computed on (mean 0, std 1
there): higher is better, unbounded, typically within a few units of 0; no further scale is applied.
Sources: THUDM/ImageReward (ImageReward/ImageReward.py, utils.py, models/BLIP/{blip,blip_pretrain,med,vit}.py) and
salesforce/BLIP. Choice 31: the published weights through transformers' classes, in float32 as the package runs them;
the images resized in torch (antialiased bicubic), which matches PIL's resize up to its uint8 rounding.
"""
import json
import re

import torch
import torch.nn.functional as F

from files import hub_file, hub_load, quiet_image_processors

quiet_image_processors()  # before transformers' image processors are imported
from transformers import BertTokenizer, BlipTextConfig, BlipTextModel, BlipVisionConfig, BlipVisionModel  # noqa: E402

REPO = "THUDM/ImageReward"  # ImageReward.pt and med_config.json, the files ImageReward's own load() fetches
TOKENIZER_REPO = "google-bert/bert-base-uncased"  # BLIP's init_tokenizer loads 'bert-base-uncased', the same repo
FLAG = f"--reward imagereward (needs {REPO} and {TOKENIZER_REPO})"
MEAN, STD = 0.16717362830052426, 1.0333394966054072  # ImageReward.__init__: the raw reward's statistics
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)  # ImageReward's Normalize: CLIP's mean and std
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
MAX_TOKENS = 35  # score(): padding="max_length", truncation=True, max_length=35
MLP_WIDTHS = (1024, 128, 64, 16, 1)  # ImageReward's MLP; its ReLUs are commented out, so the head is affine
MED_CONFIG = dict(vocab_size=30524, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                  num_attention_heads=12, max_position_embeddings=512, hidden_act="gelu", layer_norm_eps=1e-12,
                  pad_token_id=0)  # the architecture in med_config.json, for flops_per_image without a download
TEXT_KEYS = tuple(MED_CONFIG)

VIT = r"blip\.visual_encoder\."
BLOCK = VIT + r"blocks\.(\d+)\."
LAYER = r"vision_model.encoder.layers.\1."
RENAMES = [  # (ImageReward.pt key, fully matched; its name here, or None: a key that score() never reads)
    (VIT + r"cls_token", "vision_model.embeddings.class_embedding"),
    (VIT + r"pos_embed", "vision_model.embeddings.position_embedding"),
    (VIT + r"patch_embed\.proj\.(weight|bias)", r"vision_model.embeddings.patch_embedding.\1"),
    (BLOCK + r"norm1\.(weight|bias)", LAYER + r"layer_norm1.\2"),
    (BLOCK + r"attn\.qkv\.(weight|bias)", LAYER + r"self_attn.qkv.\2"),  # both fuse q, k, v as (3, heads, d) rows
    (BLOCK + r"attn\.proj\.(weight|bias)", LAYER + r"self_attn.projection.\2"),
    (BLOCK + r"norm2\.(weight|bias)", LAYER + r"layer_norm2.\2"),
    (BLOCK + r"mlp\.(fc1|fc2)\.(weight|bias)", LAYER + r"mlp.\2.\3"),
    (VIT + r"norm\.(weight|bias)", r"vision_model.post_layernorm.\1"),
    (r"blip\.text_encoder\.embeddings\.position_ids", None),  # an arange buffer, which transformers rebuilds
    (r"blip\.text_encoder\.(.+)", r"text_encoder.\1"),  # BLIP's med.py kept BERT's names, as BlipTextModel does
    (r"blip\.(vision|text)_proj\.(weight|bias)", None),  # BLIP's contrastive projections: score() never uses them
    *[(rf"mlp\.layers\.{old}\.(weight|bias)", rf"mlp.{new}.\1") for new, old in enumerate((0, 2, 4, 6, 7))],
]  # the MLP's Dropouts (indices 1, 3, 5) hold no weights and are the identity in eval mode, so they are left out


def imagereward_pixels(images, size=224):
    """ImageReward's input from (B, 3, H, W) images in [0, 1], as its torchvision transform makes it from a PIL
    image: Resize(size, bicubic) sets the short side to `size` and truncates the long one, CenterCrop rounds its
    offsets, then CLIP's normalisation; in torch, on the images' device (choice 22)."""
    h, w = images.shape[-2:]
    hh, ww = (size, int(size * w / h)) if h <= w else (int(size * h / w), size)
    x = F.interpolate(images, size=(hh, ww), mode="bicubic", antialias=True, align_corners=False)
    top, left = int(round((hh - size) / 2.0)), int(round((ww - size) / 2.0))
    x = x[..., top:top + size, left:left + size].clamp(0, 1)  # PIL resizes in uint8, which clips bicubic overshoot
    mean = torch.tensor(CLIP_MEAN, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD, device=x.device).view(1, 3, 1, 1)
    return (x - mean) / std


def vision_config(**overrides):
    """BLIP's create_vit('large', 224): ViT-L/16 with timm's LayerNorm eps 1e-6 and exact GELU; tests shrink it."""
    sizes = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                 image_size=224, patch_size=16) | overrides
    return BlipVisionConfig(**sizes, hidden_act="gelu", layer_norm_eps=1e-6)


def text_config(med, encoder_width):
    """BlipTextConfig of a med_config.json dict. is_decoder builds the cross-attention layers (med.py's
    add_cross_attention); forward still runs the encoder bidirectionally. The keys and values of the cross-attention
    read the ViT's width, which BLIP_Pretrain writes over the file's encoder_width."""
    return BlipTextConfig(**{k: med[k] for k in TEXT_KEYS}, encoder_hidden_size=encoder_width, is_decoder=True)


def blip_tokenizer(vocab_file):
    """BLIP's init_tokenizer: bert-base-uncased's WordPiece, plus [DEC] as bos and [ENC] (ids 30522 and 30523)."""
    tokenizer = BertTokenizer(vocab=vocab_file, do_lower_case=True)
    tokenizer.add_special_tokens({"bos_token": "[DEC]"})
    tokenizer.add_special_tokens({"additional_special_tokens": ["[ENC]"]})
    return tokenizer


def map_key(key):
    """The name here of one ImageReward.pt key: None for a key that score() never reads, the key itself where no
    rule matches, so that a strict load names it as unexpected."""
    for old, new in RENAMES:
        match = re.fullmatch(old, key)
        if match:
            return None if new is None else match.expand(new)
    return key


def map_state_dict(state):
    """ImageReward.pt's state dict under this module's names; the keys that score() never reads are dropped on
    purpose (RENAMES' None: BLIP's contrastive projections and the text position_ids buffer)."""
    return {new: value for key, value in state.items() if (new := map_key(key)) is not None}


class ImageReward(torch.nn.Module):
    """ImageReward's score of images and prompts, (B,) float32, from transformers' Blip towers and the MLP head."""

    def __init__(self, vision, text, tokenizer):
        super().__init__()
        self.vision_model = BlipVisionModel(vision)
        self.text_encoder = BlipTextModel(text, add_pooling_layer=False)
        widths = (text.hidden_size,) + MLP_WIDTHS
        self.mlp = torch.nn.Sequential(*[torch.nn.Linear(a, b) for a, b in zip(widths[:-1], widths[1:])])
        self.tokenizer = tokenizer
        self.size = vision.image_size
        self.eval().requires_grad_(False)

    def score(self, pixels, input_ids, attention_mask):
        """ImageReward.score() from its preprocessed images and tokens: (B,) rewards."""
        image_embeds = self.vision_model(pixel_values=pixels).last_hidden_state  # (B, 1 + patches, 1024)
        # ImageReward's image mask is all ones: the text attends to every image token, as with no mask at all
        text = self.text_encoder(input_ids=input_ids, attention_mask=attention_mask,
                                 encoder_hidden_states=image_embeds, is_decoder=False)
        reward = self.mlp(text.last_hidden_state[:, 0]).squeeze(-1)  # [CLS], then the MLP: (B,)
        return (reward.float() - MEAN) / STD

    @torch.no_grad()
    def forward(self, images, prompts):
        device = self.mlp[0].weight.device
        pixels = imagereward_pixels(images.to(device, torch.float32), self.size)
        text = self.tokenizer(list(prompts), padding="max_length", truncation=True, max_length=MAX_TOKENS,
                              return_tensors="pt").to(device)
        return self.score(pixels, text.input_ids, text.attention_mask)


def load_weights(model, state):
    """Load ImageReward.pt's state dict into `model` through map_state_dict, strictly: a missing or unexpected key
    is a RuntimeError naming it."""
    model.load_state_dict(map_state_dict(state), strict=True)
    return model


def load_imagereward(device):
    """ImageReward with the published weights on `device`, or a files.LoadError within seconds naming FLAG."""
    med_config = hub_load(hub_file("med_config.json"), REPO, FLAG, folder_ok=False)  # the small files first
    # the vocabulary file, not BertTokenizer.from_pretrained: transformers 5 returns an empty tokenizer, no error,
    # when the repo is not in the cache
    vocab = hub_load(hub_file("vocab.txt"), TOKENIZER_REPO, FLAG, folder_ok=False)
    checkpoint = hub_load(hub_file("ImageReward.pt"), REPO, FLAG, folder_ok=False)  # 1.8 GB
    vision = vision_config()
    with open(med_config, encoding="utf-8") as f:
        text = text_config(json.load(f), encoder_width=vision.hidden_size)
    model = ImageReward(vision, text, blip_tokenizer(vocab))
    state = torch.load(checkpoint, map_location="cpu", weights_only=True)  # a plain state dict of tensors
    return load_weights(model, state).to(device)


def flops_per_image():
    """Model FLOPs of scoring one image at full size (ViT-L/16 at 224, BERT-base with cross-attention on 35 tokens),
    counted by FlopCounterMode on meta tensors: no weights and no work."""
    from torch.utils.flop_counter import FlopCounterMode

    with torch.device("meta"):
        vision = vision_config()
        model = ImageReward(vision, text_config(MED_CONFIG, vision.hidden_size), tokenizer=None)
        pixels = torch.randn(1, 3, 224, 224)
        ids = torch.zeros(1, MAX_TOKENS, dtype=torch.long)
    with FlopCounterMode(display=False) as flops, torch.no_grad():
        model.score(pixels, ids, attention_mask=None)  # a mask costs no matmul; checking one needs values
    return flops.get_total_flops()
