"""Tests of imagereward.py: ImageReward.pt's layout mapped into tiny transformers Blip towers, checked against
a plain-torch ImageReward (timm's ViT block, BLIP's BERT with cross-attention, the MLP) written here."""
import json
import time

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import files
import imagereward
from conftest import relative_error, smooth_images, smooth_pil

WORDS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "red", "apple", "two", "dogs", "on", "the", "bench",
         "##es", "cat"]
VISION = dict(hidden_size=24, intermediate_size=48, num_hidden_layers=2, num_attention_heads=3, image_size=16,
              patch_size=8)
MED = dict(imagereward.MED_CONFIG, vocab_size=len(WORDS) + 2, hidden_size=16, intermediate_size=32,
           num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=40, encoder_width=768,
           add_cross_attention=True, architectures=["BertModel"])  # as med_config.json, at tiny sizes
PROMPTS = ["a red apple", "two dogs on the benches", "a cat"]  # of different lengths: the padding mask matters


def tiny_tokenizer(tmp_path):
    (tmp_path / "vocab.txt").write_text("\n".join(WORDS) + "\n")
    return imagereward.blip_tokenizer(str(tmp_path / "vocab.txt"))


def tiny_model(tmp_path):
    text = imagereward.text_config(MED, encoder_width=VISION["hidden_size"])
    return imagereward.ImageReward(imagereward.vision_config(**VISION), text, tiny_tokenizer(tmp_path))


def checkpoint_state(seed=0):
    """A state dict with ImageReward.pt's key names (ImageReward.state_dict(): blip.*, mlp.layers.*), tiny sizes."""
    g = torch.Generator().manual_seed(seed)
    shapes = vision_shapes() | text_shapes() | head_shapes()
    state = {key: weight(key, shape, g) for key, shape in shapes.items()}
    state["blip.text_encoder.embeddings.position_ids"] = torch.arange(MED["max_position_embeddings"])[None]
    return state


def vision_shapes():
    """BLIP's VisionTransformer: timm's names (cls_token, pos_embed, patch_embed.proj, blocks.N.*, norm)."""
    v, f, p, vit = VISION["hidden_size"], VISION["intermediate_size"], VISION["patch_size"], "blip.visual_encoder."
    shapes = {vit + "cls_token": (1, 1, v), vit + "pos_embed": (1, 5, v),  # 1 + (16 / 8)^2 tokens
              vit + "patch_embed.proj.weight": (v, 3, p, p), vit + "patch_embed.proj.bias": (v,)}
    shapes |= linear(vit + "norm", v, 0)
    for i in range(VISION["num_hidden_layers"]):
        for name, out, inp in [("norm1", v, 0), ("attn.qkv", 3 * v, v), ("attn.proj", v, v), ("norm2", v, 0),
                               ("mlp.fc1", f, v), ("mlp.fc2", v, f)]:
            shapes |= linear(f"{vit}blocks.{i}.{name}", out, inp)
    return shapes


def text_shapes():
    """BLIP's med.py BertModel without pooler: self-attention, cross-attention to the ViT's width, feed-forward."""
    t, v, text = MED["hidden_size"], VISION["hidden_size"], "blip.text_encoder."
    shapes = {text + "embeddings.word_embeddings.weight": (MED["vocab_size"], t),
              text + "embeddings.position_embeddings.weight": (MED["max_position_embeddings"], t)}
    shapes |= linear(text + "embeddings.LayerNorm", t, 0)
    for i in range(MED["num_hidden_layers"]):
        layer = f"{text}encoder.layer.{i}."
        for attention, width in [("attention.", t), ("crossattention.", v)]:
            for name, out, inp in [("self.query", t, t), ("self.key", t, width), ("self.value", t, width),
                                   ("output.dense", t, t), ("output.LayerNorm", t, 0)]:
                shapes |= linear(layer + attention + name, out, inp)
        f = MED["intermediate_size"]
        for name, out, inp in [("intermediate.dense", f, t), ("output.dense", t, f), ("output.LayerNorm", t, 0)]:
            shapes |= linear(layer + name, out, inp)
    return shapes


def head_shapes():
    """BLIP_Pretrain's contrastive projections (unused by score()) and ImageReward's MLP, Dropouts at 1, 3, 5."""
    shapes = linear("blip.vision_proj", 8, VISION["hidden_size"]) | linear("blip.text_proj", 8, MED["hidden_size"])
    widths = (MED["hidden_size"],) + imagereward.MLP_WIDTHS
    for index, inp, out in zip((0, 2, 4, 6, 7), widths[:-1], widths[1:]):
        shapes |= linear(f"mlp.layers.{index}", out, inp)
    return shapes


def linear(prefix, out, inp):
    """The shapes of a Linear's (or, with inp = 0, a LayerNorm's) weight and bias."""
    return {f"{prefix}.weight": (out, inp) if inp else (out,), f"{prefix}.bias": (out,)}


def weight(key, shape, g):
    """Random values of the scale a trained network has: LayerNorm scales near 1, Linear weights ~ 1/sqrt(fan in)."""
    noise = torch.randn(shape, generator=g)
    if "norm" in key.lower() and key.endswith("weight"):
        return 1 + 0.1 * noise
    return noise / shape[-1] ** 0.5 if len(shape) > 1 and "embed" not in key else 0.5 * noise


def normalise(x):
    """ImageReward's Normalize: CLIP's mean and std, written out."""
    mean = torch.tensor([0.48145466, 0.4578275, 0.40821073])[:, None, None]
    return (x - mean) / torch.tensor([0.26862954, 0.26130258, 0.27577711])[:, None, None]


def layer_norm(x, state, prefix, eps):
    return F.layer_norm(x, x.shape[-1:], state[prefix + ".weight"], state[prefix + ".bias"], eps)


def dense(x, state, prefix):
    return F.linear(x, state[prefix + ".weight"], state[prefix + ".bias"])


def reference_vit(state, pixels, heads):
    """BLIP's VisionTransformer in plain torch: timm's pre-norm blocks, qkv read as (3, heads, d), eps 1e-6."""
    vit = "blip.visual_encoder."
    kernel = state[vit + "patch_embed.proj.weight"]
    x = F.conv2d(pixels, kernel, state[vit + "patch_embed.proj.bias"], stride=kernel.shape[-1]).flatten(2).mT
    x = torch.cat([state[vit + "cls_token"].expand(len(x), -1, -1), x], dim=1) + state[vit + "pos_embed"]
    B, N, C = x.shape
    for i in range(VISION["num_hidden_layers"]):
        block = f"{vit}blocks.{i}."
        qkv = dense(layer_norm(x, state, block + "norm1", 1e-6), state, block + "attn.qkv")
        q, k, v = qkv.reshape(B, N, 3, heads, C // heads).permute(2, 0, 3, 1, 4)
        attention = (q @ k.mT * (C // heads) ** -0.5).softmax(-1)
        x = x + dense((attention @ v).transpose(1, 2).reshape(B, N, C), state, block + "attn.proj")
        hidden = F.gelu(dense(layer_norm(x, state, block + "norm2", 1e-6), state, block + "mlp.fc1"))
        x = x + dense(hidden, state, block + "mlp.fc2")
    return layer_norm(x, state, vit + "norm", 1e-6)


def reference_attention(state, prefix, x, context, mask, heads):
    """med.py's BertAttention: scaled dot product with an additive mask, then dense, residual, LayerNorm."""
    def split(y):
        return y.unflatten(-1, (heads, -1)).transpose(1, 2)
    q = split(dense(x, state, prefix + "self.query"))
    k = split(dense(context, state, prefix + "self.key"))
    v = split(dense(context, state, prefix + "self.value"))
    probs = (q @ k.mT / q.shape[-1] ** 0.5 + mask).softmax(-1)
    out = dense((probs @ v).transpose(1, 2).flatten(2), state, prefix + "output.dense")
    return layer_norm(out + x, state, prefix + "output.LayerNorm", MED["layer_norm_eps"])


def reference_score(state, pixels, ids, mask):
    """ImageReward.score(): the ViT, BLIP's BERT over the prompt attending to every image token, the MLP on the
    [CLS] output, normalised by ImageReward's mean and std."""
    image = reference_vit(state, pixels, VISION["num_attention_heads"])
    text, heads, eps = "blip.text_encoder.", MED["num_attention_heads"], MED["layer_norm_eps"]
    x = state[text + "embeddings.word_embeddings.weight"][ids]
    x = x + state[text + "embeddings.position_embeddings.weight"][:ids.shape[1]]
    x = layer_norm(x, state, text + "embeddings.LayerNorm", eps)
    padding = (1.0 - mask[:, None, None, :].float()) * -10000.0  # med.py's get_extended_attention_mask
    for i in range(MED["num_hidden_layers"]):
        layer = f"{text}encoder.layer.{i}."
        x = reference_attention(state, layer + "attention.", x, x, padding, heads)
        x = reference_attention(state, layer + "crossattention.", x, image, 0.0, heads)
        hidden = F.gelu(dense(x, state, layer + "intermediate.dense"))
        x = layer_norm(dense(hidden, state, layer + "output.dense") + x, state, layer + "output.LayerNorm", eps)
    reward = x[:, 0]
    for index in (0, 2, 4, 6, 7):  # the Dropouts between are the identity in eval mode
        reward = dense(reward, state, f"mlp.layers.{index}")
    return (reward.squeeze(-1) - 0.16717362830052426) / 1.0333394966054072


def test_the_checkpoints_keys_load_strictly_and_only_the_unused_ones_are_dropped(tmp_path):
    """ImageReward.pt's keys map onto every key of the model; only the projections and position_ids are dropped."""
    model, state = tiny_model(tmp_path), checkpoint_state()
    imagereward.load_weights(model, state)  # strict: a missing or unexpected key raises
    dropped = {key for key in state if imagereward.map_key(key) is None}
    assert dropped == {"blip.vision_proj.weight", "blip.vision_proj.bias", "blip.text_proj.weight",
                       "blip.text_proj.bias", "blip.text_encoder.embeddings.position_ids"}, \
        f"the key map drops weights that score() uses, or keeps unused ones: {sorted(dropped)}"
    with pytest.raises(RuntimeError, match="blip.text_decoder"):
        imagereward.load_weights(model, state | {"blip.text_decoder.bias": torch.zeros(3)})


def test_the_vision_tower_computes_blips_vit_from_the_checkpoints_layout(tmp_path):
    """BlipVisionModel loaded through the key map equals timm's ViT run on ImageReward.pt's own tensors."""
    model, state = tiny_model(tmp_path), checkpoint_state()
    imagereward.load_weights(model, state)
    pixels = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours = model.vision_model(pixel_values=pixels).last_hidden_state
    expected = reference_vit(state, pixels, VISION["num_attention_heads"])
    assert relative_error(ours, expected) < 1e-5, \
        "the vision tower differs from BLIP's ViT: a wrong q/k/v split, norm, eps or position embedding in the map"


def test_the_score_is_the_mlp_on_cls_normalised_by_imagerewards_mean_and_std(tmp_path):
    """forward(images, prompts) is ImageReward.score() of each pair: (B,) float32, one score a prompt and image."""
    model, state = tiny_model(tmp_path), checkpoint_state()
    imagereward.load_weights(model, state)
    images = smooth_images(3, 16, 16)
    scores = model(images, PROMPTS)
    assert scores.shape == (3,) and scores.dtype == torch.float32, f"scores are {scores.shape}, {scores.dtype}"
    text = model.tokenizer(PROMPTS, padding="max_length", truncation=True, max_length=35, return_tensors="pt")
    assert (text.input_ids[:, 0] == model.tokenizer.cls_token_id).all(), "score() keeps [CLS] as the first token"
    pixels = normalise(images)  # 16 x 16 images: the resize and crop are the identity
    expected = reference_score(state, pixels, text.input_ids, text.attention_mask)
    assert relative_error(scores, expected) < 1e-5, \
        "the score is not ImageReward's: check the padding mask, the cross-attention, [CLS], the MLP or mean/std"
    alone = torch.stack([model(images[i:i + 1], PROMPTS[i:i + 1])[0] for i in range(3)])
    assert relative_error(alone, scores) < 1e-5, "an image's score depends on the other prompts of its batch"


def test_the_tokenizer_is_blips_with_dec_as_bos_and_enc_added(tmp_path):
    """blip_tokenizer adds [DEC] as bos and [ENC] after the vocabulary, as BLIP's init_tokenizer does."""
    tokenizer = tiny_tokenizer(tmp_path)
    assert tokenizer.bos_token == "[DEC]" and tokenizer.bos_token_id == len(WORDS), "[DEC] is not BLIP's bos"
    assert tokenizer.convert_tokens_to_ids("[ENC]") == len(WORDS) + 1, "[ENC] is missing or not after [DEC]"
    assert len(tokenizer) == MED["vocab_size"], "the vocabulary does not match med_config's vocab_size (30524)"


def test_torch_preprocessing_matches_imagerewards_pil_transform():
    """imagereward_pixels of a [0, 1] tensor is close to Resize(bicubic), CenterCrop and Normalize on a PIL image."""
    pil, image = smooth_pil(43, 29)  # 43 x 29 -> 23 x 16 (truncated, not rounded), crop offset round(3.5) = 4
    width, height = 16, int(16 * 43 / 29)  # torchvision's Resize(16) of a PIL image calls PIL's resize
    resized = pil.resize((width, height), Image.BICUBIC)
    top = int(round((height - 16) / 2.0))  # torchvision's CenterCrop
    cropped = np.asarray(resized.crop((0, top, 16, top + 16)), dtype=np.float32) / 255
    expected = normalise(torch.from_numpy(cropped).permute(2, 0, 1)[None])  # ToTensor, Normalize
    ours = imagereward.imagereward_pixels(image, 16)
    assert ours.shape == expected.shape == (1, 3, 16, 16)
    err = (ours - expected).abs()
    assert err.mean() < 0.02 and err.max() < 0.1, \
        f"preprocessing differs from ImageReward's: mean {err.mean()}, max {err.max()}"


def test_the_loader_builds_the_model_from_the_three_hub_files(tmp_path, monkeypatch):
    """load_imagereward reads med_config.json and ImageReward.pt of THUDM/ImageReward and BERT's vocab.txt."""
    expected = imagereward.load_weights(tiny_model(tmp_path), checkpoint_state())
    (tmp_path / "med_config.json").write_text(json.dumps(MED))
    (tmp_path / "vocab.txt").write_text("\n".join(WORDS) + "\n")
    torch.save(checkpoint_state(), tmp_path / "ImageReward.pt")
    repos = {"med_config.json": "THUDM/ImageReward", "ImageReward.pt": "THUDM/ImageReward",
             "vocab.txt": "google-bert/bert-base-uncased"}

    def hub_file(filename):
        def load(repo, local_files_only=False):
            assert repo == repos[filename], f"{filename} is fetched from {repo}, not {repos[filename]}"
            return str(tmp_path / filename)
        return load
    monkeypatch.setattr(imagereward, "hub_file", hub_file)
    full_size = imagereward.vision_config
    monkeypatch.setattr(imagereward, "vision_config", lambda: full_size(**VISION))  # ViT-L would take seconds
    model = imagereward.load_imagereward("cpu")
    images = smooth_images(3, 16, 16)
    assert relative_error(model(images, PROMPTS), expected(images, PROMPTS)) < 1e-5, \
        "the loaded model differs from the checkpoint's: a config read wrongly from med_config.json?"


def test_the_loader_fails_within_seconds_naming_the_flag_and_the_repo():
    """Offline and without the weights in the cache, load_imagereward raises LoadError naming --reward and the repo."""
    start = time.perf_counter()
    with pytest.raises(files.LoadError, match="--reward imagereward .*THUDM/ImageReward"):
        imagereward.load_imagereward("cpu")
    assert time.perf_counter() - start < 10, "the loader retries the hub instead of failing at once"


def test_flops_per_image_are_counted_in_seconds():
    """flops_per_image counts the full-size model on meta tensors: positive, with no weights and no wait."""
    start = time.perf_counter()
    flops = imagereward.flops_per_image()
    assert flops > 0 and time.perf_counter() - start < 10
