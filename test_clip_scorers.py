"""Tests of clip_scorers.py: CLIP score and PickScore on a tiny random CLIPModel, and their torch preprocessing."""
import numpy as np
import torch
from PIL import Image

import clip_scorers
from conftest import relative_error, smooth_images, tiny_clip


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


def test_torch_preprocessing_matches_the_clip_processor_on_a_pil_image():
    """clip_pixels of a [0, 1] tensor is close to the processor's PIL resize, crop and normalisation."""
    _, processor = tiny_clip()
    image = smooth_images(1, 40, 32)
    pil = Image.fromarray((image[0].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8))
    expected = processor(images=pil, return_tensors="pt").pixel_values
    ours = clip_scorers.clip_pixels(torch.from_numpy(np.array(pil)).permute(2, 0, 1)[None].float() / 255, 16,
                               torch.tensor(processor.image_processor.image_mean),
                               torch.tensor(processor.image_processor.image_std))
    assert ours.shape == expected.shape
    err = (ours - expected).abs()
    assert err.mean() < 0.02 and err.max() < 0.1, \
        f"preprocessing differs from CLIP's: mean {err.mean()}, max {err.max()}"
