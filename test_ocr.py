"""Tests of ocr.py: Flow-GRPO's OCR reward on hand-made strings, and GOT-OCR-2.0's reading on a tiny random model."""
import time

import numpy as np
import pytest
import torch
from PIL import Image
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import (GotOcr2Config, GotOcr2ForConditionalGeneration, GotOcr2ImageProcessorPil,
                          GotOcr2Processor, PreTrainedTokenizerFast)
from transformers.convert_slow_tokenizer import bytes_to_unicode

import files
import ocr
from conftest import smooth_images, smooth_pil

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<img>", "</img>", "<imgpad>"]  # GOT's prompt's


def tiny_got_tokenizer():
    """A byte-level BPE without merges, as Qwen2's without its merges: 256 bytes and GOT's special tokens (262 ids)."""
    tokenizer = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(bytes_to_unicode().values())}, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens(SPECIAL_TOKENS)
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="<|endoftext|>", pad_token="<|endoftext|>")


@pytest.fixture(scope="module")
def tiny_got():
    """A random GotOcr2ForConditionalGeneration (64 px images, 8 px patches: 4 image tokens) and its processor, built
    in memory; weights drawn with std 0.5 so that different images make the model write different texts."""
    tokenizer = tiny_got_tokenizer()
    config = GotOcr2Config(
        text_config=dict(model_type="qwen2", vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32,
                         num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2,
                         max_position_embeddings=256, initializer_range=0.5),
        vision_config=dict(hidden_size=16, output_channels=8, num_hidden_layers=2, num_attention_heads=2,
                           image_size=64, patch_size=8, window_size=4, global_attn_indexes=[1], mlp_dim=32,
                           initializer_range=0.5),
        image_token_index=tokenizer.convert_tokens_to_ids("<imgpad>"))
    torch.manual_seed(0)
    model = GotOcr2ForConditionalGeneration(config).eval()
    processor = GotOcr2Processor(image_processor=GotOcr2ImageProcessorPil(size={"height": 64, "width": 64}),
                                 tokenizer=tokenizer)
    return model, processor


def to_pil(image):
    return Image.fromarray((image.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8))


def test_the_target_is_the_text_between_the_first_pair_of_double_quotes():
    """target_text takes what the first two double quotes enclose, as Flow-GRPO's prompt.split('"')[1] does."""
    assert ocr.target_text('a neon sign reading "Hello World" above a door') == "Hello World"
    assert ocr.target_text('"Open" and "Closed" on two signs') == "Open", "not the first quoted text"
    assert ocr.target_text('a cake with "Happy 30th, Anna!" in icing') == "Happy 30th, Anna!", "punctuation lost"


def test_a_prompt_without_quoted_text_is_refused_naming_it():
    """check_prompt, and so a prompt file read with it, refuse a prompt with no (or an empty) text in double quotes."""
    for prompt in ["a red apple on a table", 'a sign that says "Open', 'an empty sign saying "  "']:
        with pytest.raises(ValueError) as refused:
            ocr.check_prompt(prompt)
        message = str(refused.value)
        assert repr(prompt) in message and "double quotes" in message, f"the error does not name the prompt: {message}"
    ocr.check_prompt('a sign that says "Open"')


def test_a_prompt_file_with_an_unquoted_prompt_is_a_load_error_naming_the_file(tmp_path):
    """files.read_prompts(check=ocr.check_prompt) makes the refusal a LoadError naming --prompts and the prompt."""
    path = tmp_path / "prompts.txt"
    path.write_text('a sign that says "Open"\na red apple\n')
    with pytest.raises(files.LoadError) as refused:
        files.read_prompts(str(path), check=ocr.check_prompt)
    assert "--prompts" in str(refused.value) and "'a red apple'" in str(refused.value), "the error misses a name"


def test_edit_distance_is_levenshteins_on_known_pairs():
    """The textbook values: kitten -> sitting 3, flaw -> lawn 2, intention -> execution 5, to or from '' its length."""
    pairs = [("kitten", "sitting", 3), ("flaw", "lawn", 2), ("intention", "execution", 5), ("", "abc", 3),
             ("abc", "", 3), ("same", "same", 0), ("ab", "ba", 2)]  # ab -> ba: two substitutions, no transposition
    for a, b, distance in pairs:
        assert ocr.edit_distance(a, b) == distance, f"edit_distance({a!r}, {b!r}) is not {distance}"
        assert ocr.edit_distance(b, a) == distance, f"edit_distance is not symmetric on {a!r}, {b!r}"


def test_reward_rules_on_hand_made_strings():
    """Normalisation, containment and the cap, each on a case worked by hand."""
    cases = [
        ("helo world", "Hello World", 1 - 1 / 10),  # heloworld vs helloworld: one deletion, n = 10
        ("HELLO   WORLD", "Hello World", 1.0),  # case and spaces do not count
        ("Hello\nWorld", "Hello World", 1.0),  # nor GOT's line breaks
        ("OPEN 24 HOURS\nhello world!", "Hello World", 1.0),  # the target occurs in the text: distance 0
        ("Spring Colection 2O24", "Spring Collection 2024", 1 - 2 / 20),  # one deletion, one substitution, n = 20
        ("a completely different text", "Hi", 0.0),  # distance 25 > n = 2: capped at 2, 1 - 2 / 2
        ("", "Hello", 0.0),  # nothing read: distance 5 = n
        ("Helo", "Hello", 1 - 1 / 5),  # one insertion
    ]
    for recognised, target, reward in cases:
        got = ocr.ocr_reward(recognised, target)
        assert abs(got - reward) < 1e-12, f"ocr_reward({recognised!r}, {target!r}) = {got}, not {reward}"
        assert 0 <= got <= 1, "a reward outside [0, 1]: the cap is missing"


def test_torch_preprocessing_matches_the_got_processor_on_a_pil_image(tiny_got):
    """got_pixels of a [0, 1] tensor is close to the processor's PIL resize and normalisation, up- and downscaling."""
    _, processor = tiny_got
    mean, std = torch.tensor(processor.image_processor.image_mean), torch.tensor(processor.image_processor.image_std)
    for height, width in [(40, 56), (96, 80)]:
        pil, image = smooth_pil(height, width)
        expected = processor.image_processor(pil, return_tensors="pt").pixel_values
        ours = ocr.got_pixels(image, 64, mean, std)
        assert ours.shape == expected.shape == (1, 3, 64, 64)
        err = (ours - expected).abs()  # PIL rounds to uint8: a step is 1 / 255 / 0.26 = 0.015 after normalising
        assert err.mean() < 0.01 and err.max() < 0.05, \
            f"{height}x{width}: preprocessing differs from GOT's: mean {err.mean()}, max {err.max()}"


def test_prompt_ids_are_the_processors_with_one_image_token_per_feature(tiny_got):
    """The scorer's prompt is token for token the processor's plain-OCR input, with as many image tokens as the
    projector makes features (256 at the published sizes)."""
    model, processor = tiny_got
    n = ocr.image_tokens(model.config.vision_config)
    pil = to_pil(smooth_images(1, 64, 64)[0])
    expected = processor(images=pil, return_tensors="pt", num_image_tokens=n).input_ids[0]
    assert torch.equal(ocr.OCRScore(model, processor).prompt, expected), "the prompt is not the processor's"
    pixels = torch.zeros(1, 3, 64, 64)
    features = model.get_image_features(pixel_values=pixels).pooler_output
    assert features.shape[1] == n == 4, f"image_tokens says {n}, the projector makes {features.shape[1]} features"
    assert ocr.image_tokens(GotOcr2Config().vision_config) == 256, "not GOT-OCR-2.0's 256 image tokens"


def test_forward_reads_the_batch_at_once_as_it_reads_each_image_alone(tiny_got):
    """Batched greedy generation writes each image's text as generating for it alone does; forward returns (B,)
    float32 in [0, 1]: the scores of those texts."""
    scorer = ocr.OCRScore(*tiny_got)
    images = smooth_images(3, 48, 72, seed=1)
    prompts = ['a sign saying "Open"', 'a mug with "Dad" printed', 'a door marked "Exit 3"']
    targets = [ocr.target_text(p) for p in prompts]
    bound = ocr.token_bound(targets)  # 2 * 6 + 8 = 20
    alone = [scorer.recognise(images[i:i + 1], bound)[0] for i in range(3)]
    assert scorer.recognise(images, bound) == alone, "a row's text depends on the batch it is generated in"
    assert len(set(alone)) > 1, "the tiny model writes one text for all images: the comparison above proves nothing"
    lengths = [len(text) for text in alone]  # a byte token decodes to at most one character
    assert 0 < max(lengths) <= bound, f"texts of {lengths} characters from {bound} new tokens (the prompt decoded?)"
    rewards = scorer(images, prompts)
    assert rewards.shape == (3,) and rewards.dtype == torch.float32
    assert ((rewards >= 0) & (rewards <= 1)).all(), f"rewards outside [0, 1]: {rewards}"
    one_by_one = torch.tensor([ocr.ocr_reward(text, target) for text, target in zip(alone, targets)])
    assert torch.equal(rewards, one_by_one), "batched rewards differ from scoring one image at a time"


def test_forward_scores_the_recognised_texts_as_worked_by_hand(tiny_got):
    """With the reader replaced by a stub of known texts, forward's rewards are ocr_reward's hand-computed values,
    and the token bound follows the longest target."""
    scorer = ocr.OCRScore(*tiny_got)
    asked = []

    def stub(images, max_new_tokens):
        asked.append(max_new_tokens)
        return ["helo world", "SPRING COLLECTION 2024 - new!", "xyz"]

    scorer.recognise = stub
    prompts = ['a sign, "Hello World"', 'a runway under "Spring Collection 2024" lights', 'a door saying "Hi"']
    rewards = scorer(smooth_images(3, 32, 32), prompts)
    expected = torch.tensor([1 - 1 / 10, 1.0, 0.0])  # one deletion of 10; contained; xyz vs hi: 3 > 2, capped
    assert torch.allclose(rewards, expected), f"rewards {rewards} are not the hand-computed {expected}"
    assert asked == [2 * 22 + 8], f"max_new_tokens {asked}: not 2 x the longest target (22 characters) + 8"
    with pytest.raises(ValueError, match="double quotes"):
        scorer(smooth_images(1, 32, 32), ["a plain sign"])


def test_loading_offline_fails_fast_naming_the_flag_and_the_repo():
    """Without the weights in the cache (HF_HUB_OFFLINE=1 in conftest) load_ocr is a LoadError within seconds that
    names --reward ocr and the repo."""
    start = time.perf_counter()
    with pytest.raises(files.LoadError) as failed:
        ocr.load_ocr("cpu")
    assert time.perf_counter() - start < 10, "the loader does not fail fast"
    message = str(failed.value)
    assert "--reward ocr" in message and "stepfun-ai/GOT-OCR-2.0-hf" in message, f"the error misses a name: {message}"


def test_the_loader_builds_the_scorer_from_a_saved_model_and_processor(tiny_got, tmp_path, monkeypatch):
    """load_ocr's loading calls, given a folder holding a model and processor, give a float32 scorer on the CPU that
    reads as the one built in memory."""
    model, processor = tiny_got
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    monkeypatch.setattr(ocr, "OCR_MODEL", str(tmp_path))  # hub_load takes a folder for a hub id
    loaded = ocr.load_ocr("cpu")
    assert loaded.model.dtype == torch.float32, "not float32 on the CPU"
    assert torch.equal(loaded.prompt, ocr.OCRScore(model, processor).prompt), "the loaded processor's prompt differs"
    images = smooth_images(2, 40, 40, seed=2)
    expected = ocr.OCRScore(model, processor).recognise(images, 12)
    assert loaded.recognise(images, 12) == expected, "the loaded scorer reads otherwise than the saved one"


def test_full_size_flops_are_counted_in_seconds():
    """flops_per_image counts the published model on meta tensors in seconds: a positive count, no memory."""
    start = time.perf_counter()
    flops = ocr.flops_per_image()
    assert time.perf_counter() - start < 20, "counting FLOPs on meta tensors took too long"
    assert flops > 0, "no FLOPs counted"
