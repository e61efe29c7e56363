"""Tests of unifiedreward.py on a tiny random Qwen2.5-VL and a byte-level Qwen tokenizer built in memory."""
import re
import time

import pytest
import torch
from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen2Tokenizer, Qwen2VLImageProcessor
from transformers.convert_slow_tokenizer import bytes_to_unicode
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize  # the PIL processor's own

import files
import unifiedreward
from conftest import relative_error, smooth_images, smooth_pil

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>",
            "<|video_pad|>"]
FLOW_GRPO_SCORE = r"Final Score:\s*([1-5](?:\.\d+)?)"  # flow_grpo/rewards.py, _extract_scores
DIGIT_LOGITS = torch.tensor([0.5, 1.0, 2.0, 3.0, 2.5])  # the scripted judge's logits of "1".."5" after "Final Score: "


def tiny_tokenizer():
    """Qwen's byte-level BPE and pre-tokenizer with the 256 bytes, merges for 'Final' and ' Score', and Qwen's
    special tokens: digits are single tokens and the space before one is a token of its own, as in Qwen's."""
    vocab = {c: i for i, c in enumerate(bytes_to_unicode().values())}
    merges = []
    for word in ["Final", "ĠScore"]:
        for k in range(2, len(word) + 1):
            merges.append((word[:k - 1], word[k - 1]))
            vocab[word[:k]] = len(vocab)
    vocab |= {token: len(vocab) + i for i, token in enumerate(SPECIALS)}
    return Qwen2Tokenizer(vocab=vocab, merges=merges, additional_special_tokens=SPECIALS[1:])


def tiny_judge(tokenizer):
    """A random Qwen2_5_VLForConditionalGeneration: 1 text layer of width 32, a 1-block vision tower of width 16;
    text weights drawn with std 0.5, so that its digit probabilities differ between inputs."""
    ids = dict(zip(SPECIALS, tokenizer.convert_tokens_to_ids(SPECIALS)))
    config = Qwen2_5_VLConfig(
        text_config=dict(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, rms_norm_eps=1e-12,
                         rope_parameters=dict(rope_type="default", rope_theta=1e6, mrope_section=[2, 3, 3]),
                         initializer_range=0.5, bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"],
                         pad_token_id=ids["<|endoftext|>"]),
        vision_config=dict(depth=1, hidden_size=16, intermediate_size=32, num_heads=2, out_hidden_size=32,
                           fullatt_block_indexes=[0], window_size=112),
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"])
    torch.manual_seed(0)
    return Qwen2_5_VLForConditionalGeneration(config).eval()


def tiny_reward(max_new_tokens=3):
    tokenizer = tiny_tokenizer()
    return unifiedreward.UnifiedReward(tiny_judge(tokenizer), tokenizer, Qwen2VLImageProcessor(), max_new_tokens)


def scripted_judge(reward, chain):
    """Make the judge a bigram table: each token of `chain` (token -> next) is followed by its next one, and after
    'Final Score: ' come the digits with DIGIT_LOGITS. Attention and MLP outputs are zeroed, so the last hidden state
    is the last token's embedding, one-hot on an axis of its own (the digits share one)."""
    model, tok = reward.model, reward.tokenizer.convert_tokens_to_ids
    width = model.config.text_config.hidden_size
    with torch.no_grad():
        for layer in model.model.language_model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        model.lm_head.weight.zero_()
        embed = model.model.language_model.embed_tokens.weight
        axes = {token: axis for axis, token in enumerate(dict.fromkeys([*chain, "Ġ", "1"]))}
        for token, axis in axes.items():
            for t in ["1", "2", "3", "4", "5"] if token == "1" else [token]:
                embed[tok(t)] = torch.eye(width)[axis]  # normalised by the final RMSNorm to sqrt(width) there
        for token, after in chain.items():
            model.lm_head.weight[tok(after), axes[token]] = 10.0  # a logit of 10 sqrt(width); others 0
        for digit, logit in zip("12345", DIGIT_LOGITS):
            model.lm_head.weight[tok(digit), axes["Ġ"]] = logit / width ** 0.5
    return reward


# "Final Score: 4.7" after the prompt's last token, "\n" (Ċ), then the end of the turn; "1" stands for every digit
SAYS_SCORE = {"Ċ": "Final", "Final": "ĠScore", "ĠScore": ":", ":": "Ġ", "1": ".", ".": "7", "7": "<|im_end|>"}


def test_smart_size_is_qwen2vls_smart_resize():
    """smart_size equals transformers' smart_resize, round half to even and both pixel bounds included."""
    for height, width in [(70, 100), (512, 512), (20, 30), (3000, 4000), (14, 1000), (41, 97)]:
        assert unifiedreward.smart_size(height, width) == smart_resize(height, width), \
            f"smart resize of {height}x{width} differs from Qwen2-VL's: the judge would see other patches"


@pytest.mark.parametrize("height, width, grid, mean_err, max_err", [(56, 84, [1, 4, 6], 1e-6, 1e-5),
                                                                   (70, 100, [1, 4, 8], 0.02, 0.1)])
def test_torch_preprocessing_matches_the_qwen2vl_image_processor(height, width, grid, mean_err, max_err):
    """On a 56 x 84 image (multiples of 28, not resized) qwen_pixels equals Qwen2VLImageProcessor's pixel_values
    exactly (the 2x2 merge order of the patches); a 70 x 100 image is smart-resized to 56 x 112 like the
    processor's PIL resize, up to resampling."""
    processor = Qwen2VLImageProcessor()
    pil, image = smooth_pil(height, width)
    expected = processor(images=pil, return_tensors="pt")
    mean, std = torch.tensor(processor.image_mean), torch.tensor(processor.image_std)
    ours, thw = unifiedreward.qwen_pixels(image, mean, std)
    assert thw.tolist() == expected.image_grid_thw.tolist() == [grid], "smart resize picked another size"
    err = (ours - expected.pixel_values).abs()
    assert err.mean() < mean_err and err.max() < max_err, \
        f"preprocessing differs from Qwen2-VL's (patch order, resize): {err.mean()}, {err.max()}"


def test_the_question_is_flow_grpos_in_qwens_chat_template_with_one_pad_per_image_token():
    """chat_text holds Flow-GRPO's question with the caption, 324 image pads, and ends where the judge answers."""
    tokenizer = tiny_tokenizer()
    text = unifiedreward.chat_text("a red cube", 324)
    ids = tokenizer(text).input_ids
    assert ids.count(tokenizer.convert_tokens_to_ids("<|image_pad|>")) == 324, "image pads miscounted"
    assert "assign a score from 1 to 5 after 'Final Score:'.\nYour task is provided as follows:\nText Caption: " \
           "[a red cube]<|im_end|>" in text, "the question is not Flow-GRPO's"
    assert text.startswith("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
                           "<|vision_start|><|image_pad|>"), "the image does not open the user turn as Qwen's template"
    assert "<|vision_end|>You are given a text caption" in text, "the question does not follow the image"
    assert text.endswith("<|im_end|>\n<|im_start|>assistant\n"), "the text does not end where the answer starts"


def test_encode_marks_the_image_pads_for_qwens_3d_rope_positions():
    """mm_token_type_ids is 1 exactly at the image pads: transformers 5 gives them 3D positions only by it."""
    reward = tiny_reward()
    texts = [unifiedreward.chat_text("a red cube", 4), unifiedreward.chat_text("two dogs on a bench", 4)]
    inputs = reward.encode(texts, torch.zeros(32, 1176), torch.tensor([[1, 4, 4], [1, 4, 4]]))
    pads = inputs["input_ids"] == reward.model.config.image_token_id
    assert pads.sum(-1).tolist() == [4, 4], "image pads miscounted"
    assert torch.equal(inputs["mm_token_type_ids"], pads.int()), "image tokens would get 1D text positions"
    assert (inputs["attention_mask"][0, :3] == 0).all(), "the shorter prompt is not left-padded"


def test_expected_score_is_the_mean_digit_over_the_judges_probabilities():
    """p = (.1, .2, .3, .3, .1): E = .1 + .4 + .9 + 1.2 + .5 = 3.1 -> 0.62; decimals .5 after 4: +.3 x .5 -> 0.65."""
    logits = torch.tensor([[0.1, 0.2, 0.3, 0.3, 0.1]]).log().repeat(3, 1)
    decimals = torch.zeros(3, 5)
    decimals[1, 3] = 0.5
    decimals[2, 4] = 0.9
    logits[2] = torch.tensor([-50.0, -50.0, -50.0, -50.0, 0.0])  # sure of 5, writes 5.9: clamped to 5
    score = unifiedreward.expected_score(logits, decimals)
    assert score.dtype == torch.float32
    assert torch.allclose(score, torch.tensor([0.62, 0.65, 1.0]), atol=1e-6), f"not sum p(d)(d + f_d) / 5: {score}"


def test_find_score_reads_the_score_flow_grpos_regex_reads():
    """The digit found after 'Final Score:' and its decimals are the number Flow-GRPO's regex extracts."""
    tokenizer = tiny_tokenizer()
    digits = tokenizer.convert_tokens_to_ids(list("12345"))
    for answer in ["Final Score: 4", "cat (object): 1\nFinal Score:3.67\n", "Final Score: 0, no: Final Score: 2.5",
                   "Final Score:\n\n5<|im_end|>", "Score: 3", "Final Score: N/A"]:
        tokens = tokenizer(answer).input_ids
        found = unifiedreward.find_score(tokens, digits, lambda t: tokenizer.decode(t, skip_special_tokens=True))
        match = re.search(FLOW_GRPO_SCORE, answer)
        assert (found is None) == (match is None), f"{answer!r}: found {found}, Flow-GRPO reads {match}"
        if found:
            assert found[1] + found[2] == pytest.approx(float(match.group(1))), f"{answer!r}: read {found}"
            assert tokens[found[0]] == digits[found[1] - 1], f"{answer!r}: the step is not the digit's"


def test_a_judge_that_writes_its_score_is_read_at_the_digit_it_writes():
    """A judge answering 'Final Score: 4.7' scores (sum_d p(d) d + p(4) .7) / 5, p the softmax of its digit logits."""
    reward = scripted_judge(tiny_reward(max_new_tokens=12), SAYS_SCORE)
    score = reward(smooth_images(2, 32, 40), ["a red cube", "two dogs"])
    p = DIGIT_LOGITS.softmax(0)
    expected = ((p * torch.arange(1.0, 6.0)).sum() + p[3] * 0.7) / 5
    assert torch.allclose(score, expected.expand(2), atol=1e-5), \
        f"{score} is not the expectation at the written digit plus its decimals, {expected}"


def test_a_judge_that_goes_on_after_its_score_is_stopped_once_the_score_is_complete():
    """A judge that repeats 'Final Score: 4.7' forever is stopped after the newline that ends its first score."""
    reward = scripted_judge(tiny_reward(max_new_tokens=40), SAYS_SCORE | {"7": "Ċ"})
    answer = reward.answer
    answers = []

    def recorded(inputs):
        tokens, steps = answer(inputs)
        answers.append(tokens)
        return tokens, steps

    reward.answer = recorded
    score = reward(smooth_images(2, 32, 40), ["a red cube", "two dogs"])
    assert [reward.decode(row) for row in answers[0].tolist()] == ["Final Score: 4.7\n"] * 2, \
        "generation ran past the score: every reward pays for tokens nobody reads"
    p = DIGIT_LOGITS.softmax(0)
    expected = ((p * torch.arange(1.0, 6.0)).sum() + p[3] * 0.7) / 5
    assert torch.allclose(score, expected.expand(2), atol=1e-5), f"{score} != {expected}"


def test_a_judge_that_writes_no_score_is_read_after_a_forced_final_score():
    """A judge that ends its answer at once is read after 'Final Score: ': sum_d p(d) d / 5."""
    reward = scripted_judge(tiny_reward(max_new_tokens=12), SAYS_SCORE | {"Ċ": "<|im_end|>"})
    score = reward(smooth_images(2, 32, 40), ["a red cube", "two dogs"])
    expected = (DIGIT_LOGITS.softmax(0) * torch.arange(1.0, 6.0)).sum() / 5
    assert torch.allclose(score, expected.expand(2), atol=1e-5), f"{score} is not the forced prefix's {expected}"


def test_batched_scores_equal_one_at_a_time_scores():
    """Left padding and the shared grid make each row's score independent of its batch: (B,) float32 in [0.2, 1]."""
    reward = tiny_reward()
    images = smooth_images(3, 48, 36, seed=1)
    prompts = ["a red cube", "two dogs on a long wooden bench", "a bench"]
    batched = reward(images, prompts)
    single = torch.cat([reward(images[i:i + 1], prompts[i:i + 1]) for i in range(3)])
    assert batched.shape == (3,) and batched.dtype == torch.float32
    assert ((batched >= 0.2) & (batched <= 1)).all(), f"scores outside [0.2, 1]: {batched}"
    assert batched.unique().numel() == 3, "the score ignores the image or the prompt"
    assert relative_error(batched, single) < 1e-5, f"batched {batched} != one at a time {single}: padding leaks"


def test_loader_fails_fast_offline_naming_the_flag_and_the_repo():
    """Offline (conftest: HF_HUB_OFFLINE=1), load_unifiedreward raises a LoadError naming --reward and the repo."""
    start = time.perf_counter()
    with pytest.raises(files.LoadError, match=re.escape(unifiedreward.FLAG)) as error:
        unifiedreward.load_unifiedreward("cpu")
    assert "CodeGoat24/UnifiedReward-qwen-7b" in str(error.value)
    assert time.perf_counter() - start < 10, "the loader retried the hub instead of failing fast"


def test_flops_per_image_runs_in_seconds_and_is_positive():
    """The full-size count runs on meta tensors: no weights, no download."""
    start = time.perf_counter()
    flops = unifiedreward.flops_per_image()
    assert flops > 0 and time.perf_counter() - start < 30
