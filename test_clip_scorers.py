"""Tests of clip_scorers.py: CLIP score, PickScore, HPS v2.1 and the aesthetic predictor on tiny random CLIPModels,
their torch preprocessing, HPS's open_clip key map against a plain-torch open_clip forward, and the loaders offline."""
import time

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from transformers import CLIPConfig, CLIPModel

import clip_scorers
import files
from conftest import relative_error, smooth_images, smooth_pil, tiny_clip


def test_pickscore_is_the_scaled_cosine_of_the_models_embeddings():
    """PickScore = diag(logits_per_image) / 26, i.e. logit_scale.exp() * cos(text, image) / 26."""
    model, processor = tiny_clip()
    images = smooth_images(3, 24, 20)
    prompts = ["a red apple", "two dogs", "a bench"]
    score = clip_scorers.PickScore(model, processor)(images, prompts)
    pixels = clip_scorers.clip_pixels(images, 16, torch.tensor(processor.image_processor.image_mean),
                                 torch.tensor(processor.image_processor.image_std))
    text = processor.tokenizer(prompts, padding=True, return_tensors="pt")
    with torch.no_grad():
        logits = model(input_ids=text.input_ids, attention_mask=text.attention_mask, pixel_values=pixels)
    logits = logits.logits_per_image
    assert score.shape == (3,) and score.dtype == torch.float32
    assert relative_error(score, logits.diagonal() / 26) < 1e-5, "PickScore is not logit_scale.exp() * cos / 26"
    cos = clip_scorers.CLIPScore(model, processor)(images, prompts)
    assert relative_error(cos * model.logit_scale.exp() / 26, score) < 1e-5, "CLIPScore is not the plain cosine"


@pytest.mark.parametrize("pixels, height, width", [(clip_scorers.clip_pixels, 40, 32),
                                                   (clip_scorers.hps_pixels, 40, 40)], ids=["clip", "hps_square"])
def test_torch_preprocessing_matches_the_clip_processor_on_a_pil_image(pixels, height, width):
    """clip_pixels of a [0, 1] tensor is close to the processor's PIL resize, crop and normalisation; so is HPSv2's
    pad-to-square on a square image, where it is CLIP's resize."""
    _, processor = tiny_clip()
    pil, image = smooth_pil(height, width)
    expected = processor(images=pil, return_tensors="pt").pixel_values
    ours = pixels(image, 16, torch.tensor(processor.image_processor.image_mean),
                  torch.tensor(processor.image_processor.image_std))
    assert ours.shape == expected.shape
    err = (ours - expected).abs()
    assert err.mean() < 0.02 and err.max() < 0.1, \
        f"{pixels.__name__} differs from CLIP's preprocessing: mean {err.mean()}, max {err.max()}"


# HPS v2.1's CLIP-H at toy sizes: the real config's activation, layer norm and text pooling (eos_token_id 2: argmax)
TINY_H = dict(clip_scorers.CLIP_H_CONFIG, projection_dim=16,
              text_config=clip_scorers.CLIP_H_CONFIG["text_config"] | dict(
                  vocab_size=514, hidden_size=16, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                  max_position_embeddings=40),
              vision_config=clip_scorers.CLIP_H_CONFIG["vision_config"] | dict(
                  hidden_size=16, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=16,
                  patch_size=8))


def open_clip_blocks(prefix, width, layers, randn):
    """open_clip's ResidualAttentionBlock weights: nn.MultiheadAttention's fused in_proj, an MLP of ratio 4."""
    state = {}
    for i in range(layers):
        p = f"{prefix}.resblocks.{i}."
        state |= {p + "ln_1.weight": 1 + randn(width), p + "ln_1.bias": randn(width),
                  p + "attn.in_proj_weight": randn(3 * width, width), p + "attn.in_proj_bias": randn(3 * width),
                  p + "attn.out_proj.weight": randn(width, width), p + "attn.out_proj.bias": randn(width),
                  p + "ln_2.weight": 1 + randn(width), p + "ln_2.bias": randn(width),
                  p + "mlp.c_fc.weight": randn(4 * width, width), p + "mlp.c_fc.bias": randn(4 * width),
                  p + "mlp.c_proj.weight": randn(width, 4 * width), p + "mlp.c_proj.bias": randn(width)}
    return state


# open_clip's model_configs/ViT-H-14.json (head counts aside: they shape no weight), and its layout at TINY_H's sizes
VIT_H_14 = dict(embed_dim=1024, vision_cfg=dict(image_size=224, layers=32, width=1280, patch_size=14),
                text_cfg=dict(context_length=77, vocab_size=49408, width=1024, layers=24))
TOY_H = dict(embed_dim=16, vision_cfg=dict(image_size=16, layers=2, width=16, patch_size=8),
             text_cfg=dict(context_length=40, vocab_size=514, width=16, layers=2))


def open_clip_state(cfg=TOY_H, randn=None):
    """An open_clip CLIP state dict of model config `cfg` under open_clip's own names, of randn(*shape) tensors."""
    gen = torch.Generator().manual_seed(0)
    randn = randn or (lambda *shape: 0.3 * torch.randn(shape, generator=gen))
    vision, text, embed = cfg["vision_cfg"], cfg["text_cfg"], cfg["embed_dim"]
    vw, tw, patch = vision["width"], text["width"], vision["patch_size"]
    tokens = (vision["image_size"] // patch) ** 2 + 1  # the patches and the class token
    state = {"visual.conv1.weight": randn(vw, 3, patch, patch), "visual.class_embedding": randn(vw),
             "visual.positional_embedding": randn(tokens, vw), "visual.ln_pre.weight": 1 + randn(vw),
             "visual.ln_pre.bias": randn(vw), "visual.ln_post.weight": 1 + randn(vw), "visual.ln_post.bias": randn(vw),
             "visual.proj": randn(vw, embed), "token_embedding.weight": randn(text["vocab_size"], tw),
             "positional_embedding": randn(text["context_length"], tw), "ln_final.weight": 1 + randn(tw),
             "ln_final.bias": randn(tw), "text_projection": randn(tw, embed), "logit_scale": torch.tensor(4.6052)}
    state |= open_clip_blocks("visual.transformer", vw, vision["layers"], randn)
    return state | open_clip_blocks("transformer", tw, text["layers"], randn)


def open_clip_transformer(x, state, prefix, heads, mask=None):
    """open_clip's Transformer on x (L, B, D): pre-norm blocks of torch's own multi-head attention, exact GELU."""
    width = x.shape[-1]
    blocks = {int(k.split(".")[len(prefix.split("."))]) for k in state if k.startswith(prefix)}
    for i in sorted(blocks):
        p = lambda name: state[f"{prefix}.{i}.{name}"]  # noqa: E731
        h = F.layer_norm(x, (width,), p("ln_1.weight"), p("ln_1.bias"))
        h, _ = F.multi_head_attention_forward(h, h, h, width, heads, p("attn.in_proj_weight"), p("attn.in_proj_bias"),
                                              None, None, False, 0.0, p("attn.out_proj.weight"),
                                              p("attn.out_proj.bias"), training=False, need_weights=False,
                                              attn_mask=mask)
        x = x + h
        h = F.layer_norm(x, (width,), p("ln_2.weight"), p("ln_2.bias"))
        x = x + F.linear(F.gelu(F.linear(h, p("mlp.c_fc.weight"), p("mlp.c_fc.bias"))), p("mlp.c_proj.weight"),
                         p("mlp.c_proj.bias"))
    return x


def open_clip_image(pixels, state):
    """open_clip's VisionTransformer.forward: patches, class token, positions, ln_pre, blocks, ln_post(CLS) @ proj."""
    x = F.conv2d(pixels, state["visual.conv1.weight"], stride=8).flatten(2).permute(0, 2, 1)  # (B, 4, 16)
    x = torch.cat([state["visual.class_embedding"].expand(len(x), 1, 16), x], dim=1)
    x = x + state["visual.positional_embedding"]
    x = F.layer_norm(x, (16,), state["visual.ln_pre.weight"], state["visual.ln_pre.bias"])
    x = open_clip_transformer(x.permute(1, 0, 2), state, "visual.transformer.resblocks", 2).permute(1, 0, 2)
    pooled = F.layer_norm(x[:, 0], (16,), state["visual.ln_post.weight"], state["visual.ln_post.bias"])
    return pooled @ state["visual.proj"]


def open_clip_text(tokens, state):
    """open_clip's CLIP.encode_text: causal blocks, ln_final, the end token (the largest id) @ text_projection."""
    x = state["token_embedding.weight"][tokens] + state["positional_embedding"][:tokens.shape[1]]
    mask = torch.full((tokens.shape[1], tokens.shape[1]), float("-inf")).triu(1)
    x = open_clip_transformer(x.permute(1, 0, 2), state, "transformer.resblocks", 2, mask).permute(1, 0, 2)
    x = F.layer_norm(x, (16,), state["ln_final.weight"], state["ln_final.bias"])
    return x[torch.arange(len(x)), tokens.argmax(-1)] @ state["text_projection"]


def tiny_hpsv2(tmp_path, state):
    """HPSv2 on the open_clip `state`, saved as HPSv2 saves it and loaded by the real checkpoint's code path."""
    path = tmp_path / clip_scorers.HPS_FILE
    torch.save({"state_dict": state}, path)
    _, processor = tiny_clip()
    return clip_scorers.HPSv2(clip_scorers.load_open_clip(path, TINY_H, "cpu"), processor)


def test_the_open_clip_checkpoint_loads_strictly_and_computes_what_open_clip_computes(tmp_path):
    """An open_clip state dict maps onto every CLIPModel weight, and HPSv2 is cos(open_clip's text, image
    features) as a plain-torch open_clip forward computes them: q, k, v, transposes and pooling in their places."""
    state = open_clip_state()
    scorer = tiny_hpsv2(tmp_path, state)  # load_state_dict(strict=True) inside: no key missing, none unexpected
    images = smooth_images(3, 24, 20)
    prompts = ["a red apple", "two dogs on a long bench", "a bench"]
    score = scorer(images, prompts)
    pixels = clip_scorers.hps_pixels(images, 16, scorer.mean, scorer.std)
    text = scorer.tokenizer(prompts, padding=True, return_tensors="pt")
    tokens = text.input_ids * text.attention_mask  # open_clip pads with 0
    with torch.no_grad():
        image_emb = F.normalize(open_clip_image(pixels, state), dim=-1)
        text_emb = F.normalize(open_clip_text(tokens, state), dim=-1)
    assert score.shape == (3,) and score.dtype == torch.float32
    assert score.abs().max() <= 1 + 1e-6, "HPS is a cosine: a logit scale crept in"
    assert relative_error(score, (image_emb * text_emb).sum(-1)) < 1e-5, \
        "the mapped CLIPModel does not compute open_clip's features: a weight landed in the wrong place"


def test_the_full_size_vit_h_14_layout_fits_the_clip_h_config_weight_for_weight():
    """open_clip's ViT-H-14 state dict, on meta tensors, maps onto CLIP_H_CONFIG's CLIPModel: the same keys, and
    every weight of the same shape."""
    state = open_clip_state(VIT_H_14, lambda *shape: torch.empty(shape, device="meta"))
    mapped = clip_scorers.open_clip_to_transformers(state)
    with torch.device("meta"):
        model = CLIPModel(CLIPConfig(**clip_scorers.CLIP_H_CONFIG))
    expected = {key: tuple(value.shape) for key, value in model.state_dict().items()}
    assert {key: tuple(value.shape) for key, value in mapped.items()} == expected, \
        "CLIP_H_CONFIG's numbers or the key map disagree with open_clip's ViT-H-14"


def test_a_checkpoint_with_a_weight_too_many_or_too_few_is_refused(tmp_path):
    """load_open_clip is strict: an unknown open_clip key (an attentional pooler) or a missing one is an error."""
    with pytest.raises(RuntimeError, match="Unexpected key"):
        tiny_hpsv2(tmp_path, open_clip_state() | {"visual.attn_pool.query": torch.zeros(4, 16)})
    with pytest.raises(RuntimeError, match="Missing key"):
        tiny_hpsv2(tmp_path, {k: v for k, v in open_clip_state().items() if k != "ln_final.bias"})


def test_hps_preprocessing_resizes_the_long_side_and_pads_with_black():
    """A 24 x 16 image becomes 16 x 11 (PIL's bicubic resize) between black columns 2 and 3 wide, as HPSv2's
    ResizeMaxSize lays it out; black is normalised to -mean / std."""
    image = smooth_images(1, 24, 16)
    mean, std = torch.tensor([0.4, 0.5, 0.6]), torch.tensor([0.2, 0.25, 0.3])
    ours = clip_scorers.hps_pixels(image, 16, mean, std)[0]  # (3, 16, 16)
    black = (-mean / std).view(3, 1, 1)
    left, right = ours[..., :2], ours[..., 13:]
    assert torch.allclose(left, black.expand_as(left)) and torch.allclose(right, black.expand_as(right)), \
        "the padding is not black columns 2 and 3 wide around the resized image"
    pil = Image.fromarray((image[0].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8))
    resized = torch.from_numpy(np.array(pil.resize((11, 16), Image.BICUBIC))).permute(2, 0, 1).float() / 255
    err = (ours[..., 2:13] * std.view(3, 1, 1) + mean.view(3, 1, 1) - resized).abs()
    assert err.mean() < 0.01 and err.max() < 0.05, f"the resized content differs from PIL's: {err.mean()}, {err.max()}"


def test_the_aesthetic_mlp_loads_the_published_files_keys_strictly(tmp_path):
    """AestheticMLP's state dict is the published file's, layers.{0,2,4,6,7}.{weight,bias} of 768 -> 1024 -> 128
    -> 64 -> 16 -> 1, and load_aesthetic_mlp loads such a file strictly."""
    shapes = {0: (1024, 768), 2: (128, 1024), 4: (64, 128), 6: (16, 64), 7: (1, 16)}
    gen = torch.Generator().manual_seed(0)
    published = {}
    for i, (n_out, n_in) in shapes.items():
        published |= {f"layers.{i}.weight": torch.randn(n_out, n_in, generator=gen),
                      f"layers.{i}.bias": torch.randn(n_out, generator=gen)}
    torch.save(published, tmp_path / clip_scorers.AESTHETIC_FILE)
    mlp = clip_scorers.load_aesthetic_mlp(tmp_path / clip_scorers.AESTHETIC_FILE)
    assert all(torch.equal(mlp.state_dict()[k], v) for k, v in published.items()), \
        "the MLP's weights are not the file's"


def test_the_aesthetic_score_is_the_mlp_of_the_normalised_image_embedding_whatever_the_prompt():
    """Aesthetic = mlp(e / |e|) for e the CLIP image embedding of clip_pixels(images); prompts change nothing."""
    model, processor = tiny_clip()
    torch.manual_seed(1)
    mlp = clip_scorers.AestheticMLP(dim=16)
    scorer = clip_scorers.Aesthetic(model, processor, mlp)
    images = smooth_images(3, 20, 28)
    score = scorer(images, ["a", "b", "c"])
    pixels = clip_scorers.clip_pixels(images, 16, scorer.mean, scorer.std)
    with torch.no_grad():
        emb = clip_scorers.embedding(model.get_image_features(pixel_values=pixels))
        expected = mlp(emb / emb.norm(dim=-1, keepdim=True))[:, 0]
    assert score.shape == (3,) and score.dtype == torch.float32 and score.isfinite().all()
    assert relative_error(score, expected) < 1e-5, "the aesthetic score is not the MLP of the normalised embedding"
    assert torch.equal(scorer(images, ["x", "y", "z"]), score), "the aesthetic score depends on the prompt"


@pytest.mark.parametrize("name, repo", [("hpsv2", "xswu/HPSv2"), ("aesthetic", "trl-lib/ddpo-aesthetic-predictor")])
def test_a_loader_without_the_weights_fails_within_seconds_naming_the_flag_and_the_repo(name, repo):
    """Offline and uncached, load_<name> raises LoadError naming --reward <name> and the hub repo, in < 10 s."""
    start = time.perf_counter()
    with pytest.raises(files.LoadError, match=f"--reward {name} .*{repo}"):
        getattr(clip_scorers, f"load_{name}")("cpu")
    assert time.perf_counter() - start < 10, "the loader retried the hub instead of failing fast"


def test_flops_per_image_are_counted_in_seconds():
    """flops_per_image counts the full-size models on meta tensors: a positive count, in a few seconds."""
    start = time.perf_counter()
    counts = [clip_scorers.flops_per_image(name) for name in ("hpsv2", "aesthetic")]
    assert all(count > 0 for count in counts) and time.perf_counter() - start < 10
