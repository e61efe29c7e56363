"""UnifiedReward (Wang et al. 2025), a VLM judge of an image against its caption, scored as Flow-GRPO scores it.

    UnifiedReward       forward(images (B, 3, H, W) in [0, 1], prompts) -> (B,) float32 scores in [0.2, 1]
    qwen_pixels         Qwen2VLImageProcessor's pixel_values and image_grid_thw, in torch (choice 22)
    load_unifiedreward  CodeGoat24/UnifiedReward-qwen-7b;   flops_per_image: the cost of one image at full size
Checkpoint (choice 32): Flow-GRPO (flow_grpo/rewards.py, unifiedreward_score_sglang) serves UnifiedReward-7b-v1.5, a
LLaVA-OneVision fine-tune in LLaVA-NeXT's format that transformers cannot load; its Qwen2.5-VL twin, by the same
authors on the same data and prompts, loads as Qwen2_5_VLForConditionalGeneration (Flow-GRPO's authors point users
to it: flow_grpo issues #16, #18). As in Flow-GRPO: the image resized to 512x512, its question (caption alignment and
overall quality, a score from 1 to 5 after 'Final Score:'), a greedy answer, the score / 5: range [0.2, 1].
Scoring: UnifiedReward's own point-score prompts have the judge list the caption's elements before its score, so a
forced 'Final Score: ' could skip reasoning it writes first. The judge answers greedily instead (batched, each row
stopped once its score is written: ~6 cached steps if it answers at once) and is read at the digit it writes after
'Final Score:': sum_d p(d) (d + f_d) / 5, p(d) its probabilities of "1".."5" there, f_d the decimals written after
the greedy digit (its scores are means of ratings, e.g. 3.7; 0 after the other digits), clamped to [0.2, 1]. Sure of
its digit, the judge gets Flow-GRPO's parse; unsure, a graded score where the parse jumps by whole points and ties a
group. A row with no score within max_new_tokens is read after an appended 'Final Score: ' (Flow-GRPO: 0). Qwen's
digits are single tokens and the space before one a token of its own, so that prefix ends as the judge's own does.
The text is Qwen2.5-VL's chat template written by hand: its default system turn, the image, then the question.
"""
import math
import re
from functools import partial

import regex
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from files import hub_load, quiet_image_processors

quiet_image_processors()  # before transformers' image processors are imported
from transformers import (AutoTokenizer, GenerationConfig, LogitsProcessor, LogitsProcessorList,  # noqa: E402
                          Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen2VLImageProcessor,
                          StoppingCriteria, StoppingCriteriaList)
from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX  # noqa: E402

REPO = "CodeGoat24/UnifiedReward-qwen-7b"
FLAG = f"--reward unifiedreward (needs {REPO})"
SIZE = 512  # Flow-GRPO: Image.fromarray(image).resize((512, 512)), PIL's default bicubic
MAX_NEW_TOKENS = 256  # room for an element list before the score; a judge that answers at once stops after ~6
QUESTION = (  # Flow-GRPO's, less its leading "<image>\n": LLaVA's image placeholder, which Qwen's vision tokens take
    "You are given a text caption and a generated image based on that caption. Your task is to evaluate this image "
    "based on two key criteria:\n1. Alignment with the Caption: Assess how well this image aligns with the provided "
    "caption. Consider the accuracy of depicted objects, their relationships, and attributes as described in the "
    "caption.\n2. Overall Image Quality: Examine the visual quality of this image, including clarity, detail "
    "preservation, color accuracy, and overall aesthetic appeal.\nBased on the above criteria, assign a score from 1 "
    "to 5 after 'Final Score:'.\nYour task is provided as follows:\nText Caption: [{prompt}]")
SCORE = "Final Score:"
WRITTEN = re.compile(r"Final Score:\s*[1-5](\.\d+)?([^\d.]|\.\D)")  # a score and its decimals, then something else
QWEN25_VL_7B = dict(  # Qwen/Qwen2.5-VL-7B-Instruct's config.json, for flops_per_image without a download
    vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
    num_key_value_heads=4, rms_norm_eps=1e-6, rope_theta=1e6, tie_word_embeddings=False,
    rope_scaling=dict(type="default", mrope_section=[16, 24, 24]),
    vision_config=dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, out_hidden_size=3584,
                       window_size=112, fullatt_block_indexes=[7, 15, 23, 31], tokens_per_second=2))


def smart_size(height, width, factor=28, min_pixels=56 * 56, max_pixels=28 * 28 * 1280):
    """Qwen2-VL's smart resize: each side rounded to a multiple of `factor` (Python's round, half to even), then
    scaled, keeping the aspect ratio, into [min_pixels, max_pixels]."""
    h, w = round(height / factor) * factor, round(width / factor) * factor
    if h * w > max_pixels:
        beta = (height * width / max_pixels) ** 0.5
        h = max(factor, math.floor(height / beta / factor) * factor)
        w = max(factor, math.floor(width / beta / factor) * factor)
    elif h * w < min_pixels:
        beta = (min_pixels / (height * width)) ** 0.5
        h = math.ceil(height * beta / factor) * factor
        w = math.ceil(width * beta / factor) * factor
    return h, w


def qwen_pixels(images, mean, std, patch=14, merge=2, temporal=2, min_pixels=56 * 56, max_pixels=28 * 28 * 1280):
    """Qwen2VLImageProcessor's pixel_values and image_grid_thw of (B, 3, H, W) images in [0, 1], in torch: smart
    resize (antialiased bicubic, as PIL's), normalised, cut into patch x patch pieces ordered 2x2 merge block by
    block, each repeated `temporal` times (a still image is a 2-frame clip)."""
    b, c, height, width = images.shape
    h, w = smart_size(height, width, patch * merge, min_pixels, max_pixels)
    if (h, w) != (height, width):  # PIL returns an image of unchanged size as is
        images = F.interpolate(images, size=(h, w), mode="bicubic", antialias=True, align_corners=False).clamp(0, 1)
    x = (images - mean.view(1, 3, 1, 1)) / std.view(1, 3, 1, 1)
    gh, gw = h // patch, w // patch
    x = x.reshape(b, c, gh // merge, merge, patch, gw // merge, merge, patch)
    x = x.permute(0, 2, 5, 3, 6, 1, 4, 7)  # (B, block row, block col, row in block, col in block, C, p, p)
    x = x.unsqueeze(6).expand(*x.shape[:6], temporal, patch, patch)
    grid = torch.tensor([[1, gh, gw]] * b, device=images.device)  # (B, 3)
    return x.reshape(b * gh * gw, c * temporal * patch * patch), grid


def chat_text(prompt, image_tokens):
    """The judge's input as Qwen2.5-VL's chat template renders a user turn of one image then text, with its default
    system turn, ready for the assistant's answer."""
    image = "<|vision_start|>" + "<|image_pad|>" * image_tokens + "<|vision_end|>"
    return (f"<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n{image}"
            f"{QUESTION.format(prompt=prompt)}<|im_end|>\n<|im_start|>assistant\n")


def expected_score(digit_logits, decimals):
    """sum_d p(d) (d + f_d) / 5 clamped to [0.2, 1], p the softmax of the logits of "1".."5" (B, 5) and f_d the
    decimals written after digit d (B, 5): the judge's 1-5 score on Flow-GRPO's scale."""
    p = digit_logits.float().softmax(-1)  # renormalised over the five digits: other tokens are no score
    values = torch.arange(1, 6, device=p.device) + decimals.to(p.device)
    return ((p * values).sum(-1).clamp(1, 5) / 5).float()


def find_score(tokens, digits, decode):
    """(step, digit, decimals) of the first digit 1-5 the answer `tokens` writes after 'Final Score:' and any
    whitespace (as Flow-GRPO's regex reads it), or None."""
    for t, token in enumerate(tokens):
        if token in digits and decode(tokens[max(0, t - 8):t]).rstrip().endswith(SCORE):
            decimals = re.match(r"\.\d+", decode(tokens[t + 1:t + 12]))
            return t, digits.index(token) + 1, float(decimals.group()) if decimals else 0.0
    return None


class DigitLogits(LogitsProcessor):
    """Keeps the logits of the digits 1-5 at each generated step, leaving the logits as they are: storing all of
    them would take B x steps x 152k floats."""

    def __init__(self, digits):
        self.digits = digits
        self.steps = []

    def __call__(self, input_ids, scores):
        self.steps.append(scores[:, self.digits].float())
        return scores


class ScoreWritten(StoppingCriteria):
    """Stops a row once its answer (tokens from `start` on) holds a complete score: the rest is not read."""

    def __init__(self, decode, start):
        self.decode = decode
        self.start = start

    def __call__(self, input_ids, scores, **kwargs):
        done = [WRITTEN.search(self.decode(row)) is not None for row in input_ids[:, self.start:].tolist()]
        return torch.tensor(done, device=input_ids.device)


class UnifiedReward(torch.nn.Module):
    """The judge's score of images against their prompts: (B,) float32 in [0.2, 1] (module docstring)."""

    def __init__(self, model, tokenizer, image_processor, max_new_tokens=MAX_NEW_TOKENS):
        super().__init__()
        self.model = model.eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self.max_new_tokens = max_new_tokens
        pieces = [tokenizer.encode(d, add_special_tokens=False) for d in "12345"]
        if any(len(piece) != 1 for piece in pieces):
            raise ValueError(f"the judge's tokenizer splits a digit 1-5 into several tokens: {pieces}")
        self.digits = [piece[0] for piece in pieces]
        ip = image_processor
        self.patching = dict(patch=ip.patch_size, merge=ip.merge_size, temporal=ip.temporal_patch_size,
                             min_pixels=ip.size["shortest_edge"], max_pixels=ip.size["longest_edge"])
        self.register_buffer("mean", torch.tensor(ip.image_mean, device=model.device), persistent=False)
        self.register_buffer("std", torch.tensor(ip.image_std, device=model.device), persistent=False)

    def decode(self, tokens):
        return self.tokenizer.decode(tokens, skip_special_tokens=True)

    def encode(self, texts, pixels, grid):
        """Model inputs of `texts`, left-padded so that every row's answer starts at the same step."""
        batch = self.tokenizer(texts, padding=True, padding_side="left", return_tensors="pt").to(self.mean.device)
        # transformers 5 places Qwen's 3D rope positions by mm_token_type_ids; without them it uses 1D positions
        batch["mm_token_type_ids"] = (batch.input_ids == self.model.config.image_token_id).int()
        return dict(batch, pixel_values=pixels.to(self.model.dtype), image_grid_thw=grid)

    def answer(self, inputs):
        """Greedy answers (B, N) and their digit logits (B, N, 5), each row stopped once its score is written."""
        start = inputs["input_ids"].shape[1]
        recorder = DigitLogits(self.digits)
        eos = self.tokenizer.convert_tokens_to_ids(["<|im_end|>", "<|endoftext|>"])
        # greedy as Flow-GRPO's temperature 0; explicit values, or the hub's sampling defaults and penalty would apply
        config = GenerationConfig(do_sample=False, repetition_penalty=1.0, max_new_tokens=self.max_new_tokens,
                                  eos_token_id=eos, pad_token_id=self.tokenizer.pad_token_id)
        out = self.model.generate(**inputs, generation_config=config, logits_processor=LogitsProcessorList([recorder]),
                                  stopping_criteria=StoppingCriteriaList([ScoreWritten(self.decode, start)]))
        return out[:, start:], torch.stack(recorder.steps, 1)

    def forced_digit_logits(self, texts, pixels, grid):
        """The digit logits (B, 5) right after each text, which ends in 'Final Score: '."""
        logits = self.model(**self.encode(texts, pixels, grid), logits_to_keep=1).logits
        return logits[:, -1, self.digits].float()

    def read(self, answers, steps):
        """Each answer's digit logits (B, 5) and decimals (B, 5) where it wrote its score, and the rows without one."""
        digit_logits = torch.zeros(len(answers), 5, device=steps.device)  # (B, 5)
        decimals = torch.zeros_like(digit_logits)
        missing = []
        for i, tokens in enumerate(answers.tolist()):
            found = find_score(tokens, self.digits, self.decode)
            if found is None:
                missing.append(i)
                continue
            step, digit, fraction = found
            digit_logits[i] = steps[i, step]
            decimals[i, digit - 1] = fraction
        return digit_logits, decimals, missing

    @torch.no_grad()
    def forward(self, images, prompts):
        """Scores (B,) of images (B, 3, H, W) in [0, 1] against their B prompts."""
        x = F.interpolate(  # Flow-GRPO's resize to 512x512, before the processor's own smart resize (to 504)
            images.to(self.mean.device, torch.float32), size=(SIZE, SIZE), mode="bicubic", antialias=True,
            align_corners=False).clamp(0, 1)
        pixels, grid = qwen_pixels(x, self.mean, self.std, **self.patching)
        texts = [chat_text(p, int(grid[0].prod()) // self.patching["merge"] ** 2) for p in prompts]
        answers, steps = self.answer(self.encode(texts, pixels, grid))
        digit_logits, decimals, missing = self.read(answers, steps)
        if missing:
            said = [self.decode(answers[i].tolist()).rstrip() for i in missing]
            forced = [texts[i] + s + ("\n" if s else "") + SCORE + " " for i, s in zip(missing, said)]
            rows = pixels.view(len(texts), -1, pixels.shape[-1])[missing].flatten(0, 1)  # all images share one grid
            digit_logits[missing] = self.forced_digit_logits(forced, rows, grid[missing])
        return expected_score(digit_logits, decimals)


def load_unifiedreward(device, max_new_tokens=MAX_NEW_TOKENS):
    """UnifiedReward-qwen-7b on `device` (bfloat16 on CUDA, float32 on the CPU), failing fast (files.hub_load)."""
    device = torch.device(device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    tokenizer = hub_load(AutoTokenizer.from_pretrained, REPO, FLAG, folder_ok=False)
    image_processor = hub_load(Qwen2VLImageProcessor.from_pretrained, REPO, FLAG, folder_ok=False)
    load = partial(Qwen2_5_VLForConditionalGeneration.from_pretrained, dtype=dtype, device_map=device)
    model = hub_load(load, REPO, FLAG, folder_ok=False)
    return UnifiedReward(model, tokenizer, image_processor, max_new_tokens)


def text_tokens(text):
    """Qwen's token count of `text`, taking each pre-token (its split regex) as one token and each special token as
    one: exact for common English words, which its 151k vocabulary holds whole."""
    pieces = re.split(r"<\|[a-z_]+\|>", text)
    return len(pieces) - 1 + sum(len(regex.findall(PRETOKENIZE_REGEX, piece)) for piece in pieces)


def flops_per_image(prompt="a photo of a cat and a dog"):
    """Model FLOPs of scoring one 512x512 image with Qwen2.5-VL-7B's published config, counted by FlopCounterMode on
    meta tensors: the vision tower on its 36 x 36 patches (504 px after smart resize), the language model over the
    prompt (324 image tokens and ~150 text tokens) and the answer 'Final Score: d' (5 cached steps), the LM head at
    the 6 answer positions. A judge that writes an element list first adds ~15 GFLOPs a token."""
    from transformers.vision_utils import get_vision_position_ids, get_vision_window_index  # only the count needs it

    config = Qwen2_5_VLConfig(**QWEN25_VL_7B)
    vc = config.vision_config
    with torch.device("meta"):
        model = Qwen2_5_VLForConditionalGeneration(config).to(torch.bfloat16)
    h, w = smart_size(SIZE, SIZE)
    grid = torch.tensor([[1, h // vc.patch_size, w // vc.patch_size]])  # on the CPU: the tower reads its values
    pixels = torch.empty(int(grid.prod()), 3 * vc.temporal_patch_size * vc.patch_size ** 2, device="meta")
    # the tower's position and window indices depend on grid values, which meta tensors lack: computed here
    positions = get_vision_position_ids(grid, vc.spatial_merge_size).to("meta")
    window, cu_window = get_vision_window_index(grid, vc.spatial_merge_size, vc.window_size, vc.patch_size)
    length = text_tokens(chat_text(prompt, int(grid.prod()) // vc.spatial_merge_size ** 2)) + 5
    hidden = torch.empty(1, length, config.text_config.hidden_size, device="meta", dtype=torch.bfloat16)
    with FlopCounterMode(display=False) as counter:
        model.model.visual(pixels.to(torch.bfloat16), grid_thw=grid, position_ids=positions,
                           window_index=window.to("meta"), cu_window_seqlens=cu_window)
        states = model.model.language_model(inputs_embeds=hidden, position_ids=torch.zeros(
            3, 1, length, dtype=torch.long, device="meta")).last_hidden_state
        model.lm_head(states[:, -6:])
    return counter.get_total_flops()
