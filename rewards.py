"""Rewards by name: the one place where a run's --reward is chosen; a new reward is one builder here.

A reward R maps images (B, 3, H, W) float32 in [0, 1] and their prompts to (B,) float32 scores, without gradient.
It scores final images and the Tweedie estimates decode(x0_est(x^(k))) alike (METHOD.md §3: r_k).
- "toy_geneval": render.geneval_score, the toy world's compositional check (choice 29).
- "pickscore", "clip": clip_scorers.py (choices 22-24).
A builder imports its model's module only when asked for: a toy run needs none of them.
"""
REWARDS = {}


def register(name):
    """Decorator: REWARDS[name] = builder, a function device -> RewardFn."""
    def add(builder):
        REWARDS[name] = builder
        return builder
    return add


def build(name, device):
    """The reward called `name` on `device`; an unknown name is a ValueError listing the valid ones."""
    if name not in REWARDS:
        raise ValueError(f"--reward {name!r} is unknown; valid rewards: {', '.join(sorted(REWARDS))}")
    return REWARDS[name](device)


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
