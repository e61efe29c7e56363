"""Flow-GRPO's OCR reward: how much of the text a prompt asks for an OCR model reads in the image.

    target_text     the text between the prompt's first pair of double quotes (check_prompt: a ValueError if none)
    ocr_reward      1 - d / n, n = len(target), d = 0 if the target occurs in the recognised text, else
                    min(Levenshtein distance, n); both strings without whitespace, lower-cased; in [0, 1]
    got_pixels      GOT-OCR-2.0's preprocessing in torch, on the images' device (choice 22)
    OCRScore        GOT-OCR-2.0 reads a batch of images, ocr_reward scores each: (B,) float32 in [0, 1]
    load_ocr        stepfun-ai/GOT-OCR-2.0-hf from the hub; flops_per_image: its model FLOPs on one image
The score is Flow-GRPO's (yifan123/flow_grpo, flow_grpo/ocr.py): 1 when the text is read in full, 0 when nothing of it
is. Where this module departs from it (choice 33):
- The reader is GOT-OCR-2.0 (transformers' GotOcr2ForConditionalGeneration, its processor's plain-OCR query, greedy),
  not PaddleOCR, which needs paddlepaddle and python-Levenshtein: rewards differ where the two readers do.
- GOT writes a line break between lines; it is removed as spaces are (Flow-GRPO joins PaddleOCR's lines with "").
- Generation stops at <|im_end|> or after 2 n_max + 8 new tokens, n_max the longest target in characters (a token
  holds at least one character of Latin text). A text cut there is about 2 n long, so its distance is capped at n
  (reward 0) unless it contains the target: the cut changes a reward only when the target follows over n other
  characters. The 8 cover the stop token and a stray line break.
- A prompt without quoted text is a ValueError naming it (Flow-GRPO would stop on an IndexError), as is an empty one.
"""
import functools
import re

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from files import hub_load, quiet_image_processors

quiet_image_processors()  # before transformers' image processors are imported
from transformers import GotOcr2Config, GotOcr2ForConditionalGeneration, GotOcr2Processor  # noqa: E402

OCR_MODEL = "stepfun-ai/GOT-OCR-2.0-hf"
PROMPT_TEXT_TOKENS = 30  # Qwen2 tokens of the plain-OCR prompt besides the image's: system 17, user 10, assistant 3
NEW_TOKENS = 66  # the token bound of Flow-GRPO's longest OCR test target (29 characters): 2 * 29 + 8


def target_text(prompt):
    """The text the prompt asks to be written: what stands between its first pair of double quotes."""
    quoted = re.search(r'"([^"]*)"', prompt)
    if quoted is None:
        raise ValueError("the OCR reward needs the text to write in double quotes, as in "
                         f"'a sign that says \"Open\"'; this prompt has none: {prompt!r}")
    if not normalise(quoted.group(1)):
        raise ValueError("the OCR reward needs a text in double quotes to write; this prompt quotes an empty one: "
                         f"{prompt!r}")
    return quoted.group(1)


def check_prompt(prompt):
    """A ValueError naming a prompt the OCR reward cannot score (for files.read_prompts' check)."""
    target_text(prompt)


def normalise(text):
    """Without spaces and line breaks, lower-cased: case and layout are not what the reward asks of the image."""
    return "".join(text.split()).lower()


def edit_distance(a, b):
    """Levenshtein distance: the fewest insertions, deletions and substitutions of characters that turn a into b."""
    previous = list(range(len(b) + 1))  # distances from a[:0] to each prefix of b
    for i, char_a in enumerate(a, 1):
        current = [i]
        for j, char_b in enumerate(b, 1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (char_a != char_b)))
        previous = current
    return previous[-1]


def ocr_reward(recognised, target):
    """1 - d / n in [0, 1], n the target's length: d = 0 when the target occurs in the recognised text (other text
    around it costs nothing), else the edit distance, capped at n so that a long wrong text costs no more than none."""
    recognised, target = normalise(recognised), normalise(target)
    distance = 0 if target in recognised else min(edit_distance(recognised, target), len(target))
    return 1 - distance / len(target)


def token_bound(targets):
    """max_new_tokens for a batch: 2 n_max + 8, n_max the longest target in characters (module docstring)."""
    return 2 * max(len(target) for target in targets) + 8


def got_pixels(images, size, mean, std):
    """GOT-OCR-2.0's input from (B, 3, H, W) images in [0, 1]: resized to size x size whatever the aspect (the
    processor's plain-OCR path: no crop to patches), normalised; in torch, on the images' device (choice 22)."""
    x = F.interpolate(images, size=(size, size), mode="bicubic", antialias=True, align_corners=False)
    x = x.clamp(0, 1)  # PIL resizes in uint8, which clips bicubic overshoot
    return (x - mean.view(1, 3, 1, 1)) / std.view(1, 3, 1, 1)


def image_tokens(vision_config):
    """The tokens one image becomes: side / patch patches a side, halved (rounding up) by each of the projector's two
    stride-2 convolutions, squared: 256 for GOT-OCR-2.0 (1024 / 16 = 64 -> 32 -> 16)."""
    side = vision_config.image_size // vision_config.patch_size
    for _ in range(2):
        side = (side + 1) // 2
    return side * side


def ocr_prompt(processor, n_image_tokens):
    """The text GotOcr2Processor writes for one image with neither box nor colour: its plain-OCR query " OCR: " in
    its chat format, the image as n_image_tokens image tokens."""
    image = processor.img_start_token + processor.image_token * n_image_tokens + processor.img_end_token
    start, end = processor.message_start_token, processor.message_end_token
    return (start + processor.system_query + end + start + "user\n" + image + "\n OCR: " + end
            + start + "assistant\n")


class OCRScore(torch.nn.Module):
    """Flow-GRPO's OCR reward with GOT-OCR-2.0 as the reader: (B,) float32 in [0, 1]."""

    def __init__(self, model, processor):
        super().__init__()
        self.model = model.eval().requires_grad_(False)
        self.tokenizer, image_processor = processor.tokenizer, processor.image_processor
        self.size = image_processor.size["height"]  # square: GOT's vision tower takes image_size x image_size only
        self.register_buffer("mean", torch.tensor(image_processor.image_mean), persistent=False)
        self.register_buffer("std", torch.tensor(image_processor.image_std), persistent=False)
        prompt = ocr_prompt(processor, image_tokens(model.config.vision_config))
        self.register_buffer("prompt", self.tokenizer(prompt, return_tensors="pt").input_ids[0], persistent=False)
        end = self.tokenizer.convert_tokens_to_ids(processor.message_end_token)
        self.stop = [end]  # GOT ends its answer with <|im_end|>, which its published generation config omits
        if self.tokenizer.eos_token_id is not None:
            self.stop.append(self.tokenizer.eos_token_id)
        self.pad = end if self.tokenizer.pad_token_id is None else self.tokenizer.pad_token_id

    @torch.no_grad()
    def recognise(self, images, max_new_tokens):
        """The text GOT-OCR-2.0 reads in each image, by greedy generation of the whole batch at once: every row holds
        the same prompt, so no padding is needed and a row gets the tokens it would get alone (up to the rounding of
        batched kernels)."""
        pixels = got_pixels(images.to(self.mean.device, torch.float32), self.size, self.mean, self.std)
        ids = self.prompt.expand(len(images), -1)  # (B, L)
        out = self.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                                  pixel_values=pixels.to(self.model.dtype), do_sample=False, num_beams=1,
                                  max_new_tokens=max_new_tokens, eos_token_id=self.stop, pad_token_id=self.pad)
        return self.tokenizer.batch_decode(out[:, ids.shape[1]:], skip_special_tokens=True)  # generated tokens only

    @torch.no_grad()
    def forward(self, images, prompts):
        targets = [target_text(prompt) for prompt in prompts]  # before any model work: a bad prompt fails at once
        texts = self.recognise(images, token_bound(targets))
        rewards = [ocr_reward(text, target) for text, target in zip(texts, targets)]
        return torch.tensor(rewards, dtype=torch.float32, device=self.mean.device)  # (B,)


def load_ocr(device):
    """OCRScore of stepfun-ai/GOT-OCR-2.0-hf on `device`, bfloat16 on a GPU (its published dtype), float32 on the CPU;
    failing fast with --reward ocr and the repo in the message (files.hub_load)."""
    device = torch.device(device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    flag = f"--reward ocr (needs {OCR_MODEL})"
    processor = hub_load(GotOcr2Processor.from_pretrained, OCR_MODEL, flag, folder_ok=False)
    load_model = functools.partial(GotOcr2ForConditionalGeneration.from_pretrained, dtype=dtype)
    model = hub_load(load_model, OCR_MODEL, flag, folder_ok=False)
    return OCRScore(model, processor).to(device)


def flops_per_image(new_tokens=NEW_TOKENS):
    """Model FLOPs of reading one 1024 x 1024 image with GOT-OCR-2.0 at its published sizes, generating new_tokens.

    Counted by FlopCounterMode on meta tensors, as generate runs: the prefill (vision tower and projector, the language
    model over the 256 image and PROMPT_TEXT_TOKENS text tokens, the head at the last position), then new_tokens - 1
    steps of one token through the language model and head, one counted with a cache of the prompt's length (the
    cache's growth over the steps adds under 0.1% to the total). The whole model's forward checks its image tokens by
    reading a value, which meta tensors lack, so its parts are counted; the embedding lookup and scatter have no
    FLOPs."""
    config = GotOcr2Config()  # transformers' defaults are the sizes of stepfun-ai/GOT-OCR-2.0-hf's config.json
    hidden = config.text_config.hidden_size
    prompt_tokens = image_tokens(config.vision_config) + PROMPT_TEXT_TOKENS
    with torch.device("meta"):
        model = GotOcr2ForConditionalGeneration(config)
        pixels = torch.randn(1, 3, config.vision_config.image_size, config.vision_config.image_size)
        prompt = torch.randn(1, prompt_tokens, hidden)
        token = torch.randn(1, 1, hidden)
    language_model = model.model.language_model
    with FlopCounterMode(display=False) as prefill, torch.no_grad():
        model.model.get_image_features(pixel_values=pixels)
        out = language_model(inputs_embeds=prompt, use_cache=True)
        model.lm_head(out.last_hidden_state[:, -1:])  # generate keeps the last position's logits only
    with FlopCounterMode(display=False) as step, torch.no_grad():
        out = language_model(inputs_embeds=token, cache=out.cache, use_cache=True)
        model.lm_head(out.last_hidden_state)
    return prefill.get_total_flops() + (new_tokens - 1) * step.get_total_flops()
