"""The toy world's grammar, its procedural renderer and its GenEval-like detector (the reward); no model here.

Prompts over colours, shapes, counts and positions ("two red squares", "a blue circle left of a green triangle");
16x16 RGB images whose composition (where the blobs are, how many, which colour) is low-frequency, so decided early
in sampling, while shape (corners, edges, tips) is detail decided late; and a reward judging prompt adherence
softly, so that blurry one-step Tweedie estimates (METHOD.md §3) get graded scores.

    parse / prompt_of     prompt <-> Spec (objects, relation); ALL_PROMPTS = TRAIN_PROMPTS + EVAL_PROMPTS
    render_batch          images drawn from prompts, anti-aliased, jittered in size, position and colour
    geneval_score         R(image, c): adherence of an image to its own prompt, in [0, 1]
    render_quality        max over ALL_PROMPTS of R(image, c): is the image a clean render of some prompt

The reward is choice 29 of METHOD.md: soft criteria (colour amount, count, shape, position, purity) multiplied,
GenEval's "all must hold" made continuous so that groups rarely tie, on blob statistics that weigh pixels softly, so
that it does not jump when one pixel crosses a threshold (gains are differences of rewards of nearly equal images).
The image statistics (colour masks, blobs, centroids) are computed once per image and then scored against any number
of prompts: render_quality scores every image against all 252 prompts at the cost of one detection.
"""
import math
import random
from typing import NamedTuple

import torch
import torch.nn.functional as F

RES = 16            # image side in pixels
SUPERSAMPLE = 4     # render at 4x and average down, so edges are anti-aliased like real images
PALETTE = {"red": (0.9, 0.15, 0.15), "green": (0.15, 0.75, 0.2), "blue": (0.2, 0.3, 0.95),
           "yellow": (0.95, 0.85, 0.15)}
BACKGROUND = (0.1, 0.1, 0.1)
# per shape: area / size^2, then its blob's fill and skew (blobs) measured on renders (spread up to .07 and .06)
SHAPES = {"square": (1.0, 0.99, 0.0), "circle": (math.pi / 4, 0.79, 0.0), "triangle": (0.5, 0.63, -0.28)}
SIZE = (5.0, 7.0)   # object side / diameter in pixels, uniform
NUMBERS = {1: "a", 2: "two", 3: "three"}
RELATIONS = ("left of", "above")


class Obj(NamedTuple):
    colour: str
    shape: str
    count: int


class Spec(NamedTuple):
    objects: tuple  # one Obj, or two Objs of count 1 joined by the relation
    relation: str | None  # objects[0] <relation> objects[1]


def prompt_of(spec: Spec) -> str:
    first = spec.objects[0]
    if spec.relation:
        second = spec.objects[1]
        return f"a {first.colour} {first.shape} {spec.relation} a {second.colour} {second.shape}"
    plural = "s" if first.count > 1 else ""
    return f"{NUMBERS[first.count]} {first.colour} {first.shape}{plural}"


def _all_specs() -> tuple[list[Spec], list[Spec]]:
    counting = [Spec((Obj(c, s, n),), None) for n in NUMBERS for c in PALETTE for s in SHAPES]
    # the detector tells objects apart by colour, so a relation always joins two different colours
    relational = [Spec((Obj(c1, s1, 1), Obj(c2, s2, 1)), r) for r in RELATIONS for c1 in PALETTE for c2 in PALETTE
                  for s1 in SHAPES for s2 in SHAPES if c1 != c2]
    return counting, relational


def _split(holdout: float = 0.2, seed: int = 0) -> tuple[list[str], list[str]]:
    """A seeded shuffle's first `holdout` of each template is held out: unseen combinations of seen words."""
    train = []
    held = []
    for specs in _all_specs():
        prompts = sorted(prompt_of(s) for s in specs)
        random.Random(seed).shuffle(prompts)
        k = round(len(prompts) * holdout)
        train += prompts[k:]
        held += prompts[:k]
    return train, held


TRAIN_PROMPTS, EVAL_PROMPTS = _split()
ALL_PROMPTS = TRAIN_PROMPTS + EVAL_PROMPTS
_SPECS = {prompt_of(s): s for specs in _all_specs() for s in specs}


def parse(prompt: str) -> Spec:
    spec = _SPECS.get(" ".join(prompt.lower().split()))
    if spec is None:
        raise ValueError(f"prompt {prompt!r} is not in the toy grammar (counts a/two/three, colours {list(PALETTE)}, "
                         f"shapes {list(SHAPES)}, relations {list(RELATIONS)}); examples: {TRAIN_PROMPTS[:3]}")
    return spec


# ---- rendering -------------------------------------------------------------------------------------------------
def _gap(p: tuple, q: tuple, axis: int) -> float:
    """Free pixels from object p to object q (cx, cy, size) along an axis (0: x, 1: y); < 0 if they overlap on it."""
    return q[axis] - p[axis] - (p[2] + q[2]) / 2


def _fits(new: tuple, placed: list[tuple], axis: int | None) -> bool:
    """A free pixel to every placed object (else two blobs merge into one), and behind placed[0] along the axis."""
    apart = all(max(_gap(p, new, 0), _gap(new, p, 0), _gap(p, new, 1), _gap(new, p, 1)) >= 1 for p in placed)
    return apart and (axis is None or not placed or _gap(placed[0], new, axis) >= 1)


def _layout(spec: Spec, rng: random.Random) -> list[tuple[str, str, float, float, float]]:
    """(colour, shape, cx, cy, size) of every object: jittered sizes and positions, no overlaps, relation held."""
    objs = [(o.colour, o.shape) for o in spec.objects for _ in range(o.count)]
    # image rows grow downwards: "above" is a smaller y, so the first object is placed first and the second after it
    axis = None if spec.relation is None else RELATIONS.index(spec.relation)
    placed = []
    while len(placed) < len(objs):  # place one object at a time; start over when one finds no room
        for _ in range(20):
            s = rng.uniform(*SIZE)
            new = (rng.uniform(s / 2, RES - s / 2), rng.uniform(s / 2, RES - s / 2), s)
            if _fits(new, placed, axis):
                placed.append(new)
                break
        else:
            placed = []
    return [(c, sh, *p) for (c, sh), p in zip(objs, placed)]


def _masks(shape: torch.Tensor, cx: torch.Tensor, cy: torch.Tensor, size: torch.Tensor) -> torch.Tensor:
    """(N, RES*SUPERSAMPLE, RES*SUPERSAMPLE) coverage of N objects; shape indexes SHAPES."""
    grid = (torch.arange(RES * SUPERSAMPLE) + 0.5) / SUPERSAMPLE
    r = (size / 2).view(-1, 1, 1)
    y = grid.view(1, -1, 1) - cy.view(-1, 1, 1)
    x = grid.view(1, 1, -1) - cx.view(-1, 1, 1)
    square = (x.abs() <= r) & (y.abs() <= r)
    circle = x ** 2 + y ** 2 <= r ** 2
    triangle = (y.abs() <= r) & (x.abs() <= (y + r) / 2)  # pointing up: half-width grows from 0 at the tip to r
    shape = shape.view(-1, 1, 1)
    return torch.where(shape == 0, square, torch.where(shape == 1, circle, triangle)).float()


def render_batch(prompts: list[str], rng: random.Random) -> torch.Tensor:
    """(B, 3, RES, RES) images in [0, 1] drawing the prompts; object colours jitter by +-0.05 per channel."""
    objects = [(b, *o) for b, p in enumerate(prompts) for o in _layout(parse(p), rng)]
    image_of = torch.tensor([o[0] for o in objects])
    shape = torch.tensor([list(SHAPES).index(o[2]) for o in objects])
    cx, cy, size = torch.tensor([o[3:] for o in objects]).unbind(1)
    masks = _masks(shape, cx, cy, size)
    rgb = torch.tensor([[v + rng.uniform(-0.05, 0.05) for v in PALETTE[o[1]]] for o in objects])
    # objects never overlap (_layout keeps a free pixel between them), so painting is a sum over objects
    delta = masks[:, None] * (rgb.clamp(0, 1) - torch.tensor(BACKGROUND))[:, :, None, None]
    side = RES * SUPERSAMPLE
    img = torch.tensor(BACKGROUND).view(1, 3, 1, 1).repeat(len(prompts), 1, side, side)
    return F.avg_pool2d(img.index_add(0, image_of, delta), SUPERSAMPLE)


# ---- the GenEval-like detector (the reward) ----------------------------------------------------------------------
def colour_masks(images: torch.Tensor, tau: float = 0.12, outlier: float = 0.3) -> torch.Tensor:
    """(B, K, H, W) soft membership of pixels in the K palette colours: a softmax over palette, background and an
    "outlier" class at distance `outlier`: a pixel halfway to the background is half red; a stray colour, nothing."""
    protos = torch.tensor([*PALETTE.values(), BACKGROUND], device=images.device)       # (K+1, 3)
    d2 = (images[:, None] - protos[None, :, :, None, None]).square().sum(2)           # (B, K+1, H, W)
    logits = torch.cat([-d2, torch.full_like(d2[:, :1], -outlier ** 2)], 1) / (2 * tau ** 2)
    return logits.softmax(1)[:, :-2]


def _labels(mask: torch.Tensor) -> torch.Tensor:
    """(N, H, W) long: 4-connected components of a boolean mask, one label per blob, 0 outside the mask."""
    N, H, W = mask.shape
    ids = torch.arange(1, H * W + 1, device=mask.device).view(1, H, W)
    on = mask.float()
    lab = torch.where(mask, ids, 0).float()  # float: faster than long, and ids <= H*W are exact
    while True:  # every pixel takes the largest label among its 4 neighbours until each blob shares one label
        p = F.pad(lab, (1, 1, 1, 1))
        new = torch.stack([lab, p[:, :-2, 1:-1], p[:, 2:, 1:-1], p[:, 1:-1, :-2], p[:, 1:-1, 2:]]).amax(0) * on
        if torch.equal(new, lab):
            return lab.long()
        lab = new


def blobs(soft: torch.Tensor, lo: float = 0.3, hi: float = 0.7) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Mass, fill and skew of the 3 heaviest 4-connected blobs of N soft masks (N, H, W) -> (N, 3) each (0 if none).
    Blobs are the connected regions where soft > lo; a pixel weighs (soft - lo) / (hi - lo), clamped to [0, 1], so it
    joins a blob with weight 0 and every statistic moves continuously with the pixels (only merges and splits jump).
    fill = mass / (heaviest row x heaviest column): square 1, circle pi/4, triangle 1/2 (more, anti-aliased);
    skew = third moment of the mass over rows: 0 for symmetric shapes, < 0 for a triangle pointing up."""
    N, H, W = soft.shape
    lab = _labels(soft > lo).view(N, 1, H, W)
    weight = ((soft - lo) / (hi - lo)).clamp(0, 1).float()
    mass = torch.zeros(N, H * W + 1, device=soft.device).scatter_add(1, lab.view(N, -1), weight.view(N, -1))
    top, idx = mass[:, 1:].topk(3, 1)  # label 0 is the background
    w = weight[:, None] * (lab == torch.where(top > 0, idx + 1, -1)[..., None, None])  # (N, 3, H, W): one blob each
    rows = w.sum(3)                                                                      # mass per row (N, 3, H)
    eps = 1e-6
    y = torch.arange(H, device=soft.device)
    d = y - (rows * y).sum(2, True) / (top[..., None] + eps)                             # row - the blob's mean row
    m2 = (rows * d ** 2).sum(2) / (top + eps)
    m3 = (rows * d ** 3).sum(2) / (top + eps)
    fill = top / (rows.amax(2) * w.sum(2).amax(2)).clamp(min=eps)
    # the skew's scale gets +1 px^2: a blob of one or two rows has no meaningful skew and scores ~0, not noise
    return top, fill, m3 / (m2 + 1) ** 1.5


def detect(images: torch.Tensor) -> dict[str, torch.Tensor]:
    """What the detector sees in images (B, 3, H, W) in [0, 1], per palette colour K: its mass (B, K), centroid
    cy, cx (B, K), and its 3 heaviest blobs' mass, fill and skew (B, K, 3). No prompt involved."""
    B = images.shape[0]
    K = len(PALETTE)
    soft = colour_masks(images.float())                                                 # (B, K, H, W)
    blob, fill, skew = (v.view(B, K, 3) for v in blobs(soft.flatten(0, 1)))
    mass = soft.sum((2, 3))
    grid = torch.arange(images.shape[-1], device=images.device, dtype=torch.float32)
    cy = (soft * grid.view(-1, 1)).sum((2, 3)) / (mass + 1e-6)
    cx = (soft * grid).sum((2, 3)) / (mass + 1e-6)
    return dict(mass=mass, cy=cy, cx=cx, blob=blob, fill=fill, skew=skew)


def targets(prompts: list[str], device) -> dict[str, torch.Tensor]:
    """Per prompt, its (up to) two objects as tensors (B, 2); count 0 marks a missing second object."""
    specs = [parse(p) for p in prompts]
    rows = [list(s.objects) + [Obj("red", "square", 0)] * (2 - len(s.objects)) for s in specs]
    mean_size2 = (SIZE[0] ** 2 + SIZE[0] * SIZE[1] + SIZE[1] ** 2) / 3  # E[size^2] under the uniform size law

    def per_object(f):
        return torch.tensor([[f(o) for o in r] for r in rows], device=device)

    relation = [RELATIONS.index(s.relation) + 1 if s.relation else 0 for s in specs]  # 0 none, 1 "left of", 2 "above"
    return dict(colour=per_object(lambda o: list(PALETTE).index(o.colour)), count=per_object(lambda o: o.count),
                area=per_object(lambda o: SHAPES[o.shape][0] * mean_size2),
                fill=per_object(lambda o: SHAPES[o.shape][1]), skew=per_object(lambda o: SHAPES[o.shape][2]),
                relation=torch.tensor(relation, device=device))


def _band(d: torch.Tensor, tol: float) -> torch.Tensor:
    """1 while |d| <= tol, then a Gaussian decay of width tol."""
    return torch.exp(-0.5 * ((d.abs() - tol).clamp(min=0) / tol) ** 2)


def score(seen: dict[str, torch.Tensor], tg: dict[str, torch.Tensor]) -> torch.Tensor:
    """(B,) reward of detections `seen` (detect, B rows) against prompt targets `tg` (targets, the same B rows)."""
    K = len(PALETTE)
    colour_of = tg["colour"]                                                            # (B, 2)

    def pick(v):  # the rows of v (B, K, 3) of the prompt's two colours -> (B, 2, 3)
        return v.gather(1, colour_of[..., None].expand(-1, -1, v.shape[-1]))

    n = tg["count"].float()                                                            # (B, 2): asked objects
    present = tg["count"] > 0
    # colour: the right amount of the colour, with a band for the size jitter (ratio 0.6 .. 1.6 scores 1)
    ratio = seen["mass"].gather(1, colour_of) / (n * tg["area"]).clamp(min=1e-6)
    colour = torch.minimum(ratio / 0.6, 1.6 / ratio.clamp(min=1e-6)).clamp(max=1)
    # count: blobs of the colour versus the asked number, one factor e per miscounted object; a blob counts fully
    # from a mass of 7 (the lightest rendered object has 8) and not at all under 2, so specks fade in, not jump
    exist = ((pick(seen["blob"]) - 2) / 5).clamp(0, 1)                                 # (B, 2, 3)
    count = torch.exp(-(exist.sum(-1) - n).abs())
    # shape: fill ratio and skew of the n largest blobs versus the shape's (a missing blob scores 0)
    like = _band(pick(seen["fill"]) - tg["fill"][..., None], 0.08)
    like = like * _band(pick(seen["skew"]) - tg["skew"][..., None], 0.06)
    first_n = torch.arange(3, device=n.device) < n[..., None]
    shape = (like * exist * first_n).sum(-1) / n.clamp(min=1)
    # an object needs its colour and count; a wrong shape (detail, decided last) halves its credit; objects share
    objects = (colour * count * (0.5 + 0.5 * shape) * present).sum(1) / present.sum(1)
    # position: mass centroids of the two colours, a sigmoid of their separation in pixels
    along = torch.where((tg["relation"] == 2)[:, None], seen["cy"], seen["cx"]).gather(1, colour_of)  # (B, 2)
    position = torch.where(tg["relation"] > 0, torch.sigmoid(along[:, 1] - along[:, 0]), 1)
    # purity: coloured mass outside the prompt's colours (extra objects) costs in proportion
    asked = (F.one_hot(colour_of, K) * present[..., None]).amax(1) > 0                  # (B, K)
    purity = ((seen["mass"] * asked).sum(1) + 1) / (seen["mass"].sum(1) + 1)
    return (objects * position * purity).float()


def geneval_score(images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
    """(B,) float32 in [0, 1]: how well images (B, 3, H, W) in [0, 1] show their prompts, GenEval-like but soft:
    mean over the prompt's objects of colour x count x shape, times position and purity. Every factor is continuous
    in the pixels, so blurry Tweedie estimates get partial credit and samples of a group rarely tie."""
    return score(detect(images), targets(prompts, images.device))


_ALL_TARGETS = {}  # device -> targets(ALL_PROMPTS): parsing 252 prompts once, not at every evaluation


def render_quality(images: torch.Tensor) -> torch.Tensor:
    """(B,) float32: the best geneval_score of each image over ALL_PROMPTS, i.e. how clean a render of SOME prompt
    it is, whatever it was asked for. Always >= the image's adherence to its own prompt."""
    device = images.device
    if device not in _ALL_TARGETS:
        _ALL_TARGETS[device] = targets(ALL_PROMPTS, device)
    seen = detect(images)
    B = images.shape[0]
    P = len(ALL_PROMPTS)
    # every (image, prompt) pair as one row: image-major, B * P rows of a few numbers each
    pairs = {k: v.repeat_interleave(P, 0) for k, v in seen.items()}
    tg = {k: v.repeat(B, *[1] * (v.dim() - 1)) for k, v in _ALL_TARGETS[device].items()}
    return score(pairs, tg).view(B, P).amax(1)
