"""Rewards by name: the one place where a run's --reward is chosen; a new reward is one builder here.

A reward R maps images (B, 3, H, W) float32 in [0, 1] and their prompts to (B,) float32 scores, without gradient.
It scores final images and the Tweedie estimates decode(x0_est(x^(k))) alike (METHOD.md §3: r_k), so a Stepwise
iteration scores T + 1 images a trajectory: `build` runs it in chunks of --reward-batch images.
- "toy_geneval": render.geneval_score, the toy world's compositional check (choice 29).
- "pickscore", "clip", "hpsv2", "aesthetic": clip_scorers.py (choices 22-24).
- "imagereward": imagereward.py; "unifiedreward": unifiedreward.py, a VLM judge; "ocr": ocr.py (choices 31-33).
--reward also takes Flow-GRPO's weighted sum of several, "ocr:0.8,pickscore:0.2" (a name alone weighs 1; choice 34). A
builder imports its model's module only when asked for: a toy run needs none of them.
"""
import math

import torch

import batching

REWARDS = {}
PROMPT_CHECKS = {}  # name -> check(prompt), a ValueError for a prompt that the reward cannot score


def register(name):
    """Decorator: REWARDS[name] = builder, a function device -> RewardFn."""
    def add(builder):
        REWARDS[name] = builder
        return builder
    return add


def parse(spec):
    """"ocr:0.8,pickscore:0.2" -> [("ocr", 0.8), ("pickscore", 0.2)]; a name alone weighs 1. An unknown name, a
    weight that is not a finite number, or a reward named twice is a ValueError naming --reward."""
    parts = []
    for item in spec.split(","):
        name, colon, weight = item.strip().partition(":")
        if name not in REWARDS:
            raise ValueError(f"--reward {spec!r}: {name!r} is unknown; valid rewards: {', '.join(sorted(REWARDS))}")
        try:
            value = float(weight) if colon else 1.0
        except ValueError:
            value = math.nan
        if not math.isfinite(value):
            raise ValueError(f"--reward {spec!r}: the weight of {name} must be a number, as in ocr:0.8,pickscore:0.2")
        parts.append((name, value))
    names = [name for name, _ in parts]
    if len(set(names)) < len(names):
        raise ValueError(f"--reward {spec!r}: a reward is named twice; give each once, with its weight")
    return parts


def check_prompts(spec, prompts):
    """A ValueError for the first prompt that a reward of `spec` cannot score (the OCR reward needs a quoted text)."""
    for name, _ in parse(spec):
        for prompt in prompts if name in PROMPT_CHECKS else []:
            PROMPT_CHECKS[name](prompt)


def build(spec, device, batch=0):
    """The reward `spec` names, on `device`: one reward, or the weighted sum of several (Flow-GRPO's multi_score),
    each scoring at most `batch` images at a time (0: all at once)."""
    parts = [(REWARDS[name](device), weight) for name, weight in parse(spec)]
    if len(parts) == 1 and parts[0][1] == 1 and not batch:
        return parts[0][0]

    def reward(images, prompts):
        pieces = batching.chunks(len(images), batch)
        total = 0.0
        for fn, weight in parts:
            scores = torch.cat([fn(images[c], prompts[c]) for c in pieces]).float()  # (B,)
            total = total + weight * scores
        return total

    return reward


def flops_per_image(name):
    """Model FLOPs of scoring one image at full size with reward `name`, as its module counts them (on meta tensors,
    or by parameters x tokens where a forward cannot run on them); the toy's reward runs no model."""
    if name in ("pickscore", "clip", "hpsv2", "aesthetic"):
        import clip_scorers

        return clip_scorers.flops_per_image(name)
    if name == "imagereward":
        import imagereward

        return imagereward.flops_per_image()
    if name == "unifiedreward":
        import unifiedreward

        return unifiedreward.flops_per_image()
    if name == "ocr":
        import ocr

        return ocr.flops_per_image()
    return 0


@register("toy_geneval")
def _toy_geneval(device):
    import render

    return render.geneval_score


@register("pickscore")
def _pickscore(device):
    import clip_scorers

    return clip_scorers.load_pickscore(device)


@register("clip")
def _clip(device):
    import clip_scorers

    return clip_scorers.load_clip(device)


@register("hpsv2")
def _hpsv2(device):
    import clip_scorers

    return clip_scorers.load_hpsv2(device)


@register("aesthetic")
def _aesthetic(device):
    import clip_scorers

    return clip_scorers.load_aesthetic(device)


@register("imagereward")
def _imagereward(device):
    import imagereward

    return imagereward.load_imagereward(device)


@register("unifiedreward")
def _unifiedreward(device):
    import unifiedreward

    return unifiedreward.load_unifiedreward(device)


@register("ocr")
def _ocr(device):
    import ocr

    return ocr.load_ocr(device)


def _ocr_prompt(prompt):
    import ocr

    ocr.check_prompt(prompt)


PROMPT_CHECKS["ocr"] = _ocr_prompt
