"""The toy text-to-image world: prompts, a procedural renderer, a GenEval-like detector and a tiny SD3 base model.

It keeps what the paper needs (METHOD.md §1, §3): text prompts over colours, shapes, counts and positions ("two red
squares", "a blue circle left of a green triangle"); 16x16 RGB images whose composition (where the blobs are, how
many, which colour) is low-frequency, so decided early in sampling, while shape (corners, edges, tips) is detail
decided late; and a reward judging prompt adherence softly, so blurry one-step Tweedie estimates get graded scores.
The model: a small diffusers SD3Transformer2DModel and a token-embedding text encoder, pretrained by flow matching
on freshly rendered pairs and cached on disk. The world's latent is the image itself.

Notation: x0 clean image in [-1, 1] (B, 3, H, W); x1 ~ N(0, I); x_t = (1 - t) x0 + t x1; v ~ x1 - x0; timestep = 1000 t.

Choices (the paper has nothing to say here):
1. t ~ U(0, 1) in pretraining, not SD3's logit-normal: the sampler (shift 3) and the Tweedie rewards visit every
   level from t = 1 to t ~ 0.01, and this tiny model has no capacity to spare for favouring the middle.
2. The base model is deliberately undertrained (held-out score ~0.25 at guidance 1) so RL has room.
3. The reward multiplies soft criteria (colour amount, count, shape, position, purity), GenEval's "all must hold"
   made continuous so that groups rarely tie; two objects share credit, and a wrong shape only halves an object's.
   Blob statistics weigh pixels softly: gains are differences of rewards of nearly equal images, so the reward must
   not jump when one pixel crosses a threshold (test_detector_barely_moves_under_invisible_noise).
"""
import hashlib, json, math, random
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn.functional as F
from diffusers import SD3Transformer2DModel
from safetensors.torch import load_file, save_file
from tqdm import tqdm

RES = 16            # image side in pixels
SUPERSAMPLE = 4     # render at 4x and average down, so edges are anti-aliased like real images
PALETTE = {"red": (0.9, 0.15, 0.15), "green": (0.15, 0.75, 0.2), "blue": (0.2, 0.3, 0.95), "yellow": (0.95, 0.85, 0.15)}
BACKGROUND = (0.1, 0.1, 0.1)
# per shape: area / size^2, then its blob's fill and skew (toy.blobs) measured on renders (spread up to .07 and .06)
SHAPES = {"square": (1.0, 0.99, 0.0), "circle": (math.pi / 4, 0.79, 0.0), "triangle": (0.5, 0.63, -0.28)}
SIZE = (5.0, 7.0)   # object side / diameter in pixels, uniform
NUMBERS = {1: "a", 2: "two", 3: "three"}
RELATIONS = ("left of", "above")
MAX_TOKENS = 8


Obj = NamedTuple("Obj", [("colour", str), ("shape", str), ("count", int)])
Spec = NamedTuple("Spec", [("objects", tuple), ("relation", str | None)])  # relation: objects[0] to objects[1]


def prompt_of(spec: Spec) -> str:
    (a, *b), rel = spec
    return (f"a {a.colour} {a.shape} {rel} a {b[0].colour} {b[0].shape}" if rel else
            f"{NUMBERS[a.count]} {a.colour} {a.shape}{'s' if a.count > 1 else ''}")


def _all_specs() -> tuple[list[Spec], list[Spec]]:
    counting = [Spec((Obj(c, s, n),), None) for n in NUMBERS for c in PALETTE for s in SHAPES]
    # the detector tells objects apart by colour, so a relation always joins two different colours
    relational = [Spec((Obj(c1, s1, 1), Obj(c2, s2, 1)), r) for r in RELATIONS for c1 in PALETTE for c2 in PALETTE
                  for s1 in SHAPES for s2 in SHAPES if c1 != c2]
    return counting, relational


def _split(holdout: float = 0.2, seed: int = 0) -> tuple[list[str], list[str]]:
    """A seeded shuffle's first `holdout` of each template is held out: unseen combinations of seen words."""
    train, held = [], []
    for specs in _all_specs():
        prompts = sorted(prompt_of(s) for s in specs)
        random.Random(seed).shuffle(prompts)
        k = round(len(prompts) * holdout)
        train, held = train + prompts[k:], held + prompts[:k]
    return train, held


TRAIN_PROMPTS, EVAL_PROMPTS = _split()
_SPECS = {prompt_of(s): s for specs in _all_specs() for s in specs}
VOCAB = ["<pad>"] + sorted({w for p in _SPECS for w in p.split()})


def parse(prompt: str) -> Spec:
    if (spec := _SPECS.get(" ".join(prompt.lower().split()))) is None:
        raise ValueError(f"prompt {prompt!r} is not in the toy grammar (counts a/two/three, colours {list(PALETTE)}, "
                         f"shapes {list(SHAPES)}, relations {list(RELATIONS)}); examples: {TRAIN_PROMPTS[:3]}")
    return spec


# ---- rendering -------------------------------------------------------------------------------------------------
def _layout(spec: Spec, rng: random.Random) -> list[tuple[str, str, float, float, float]]:
    """(colour, shape, cx, cy, size) of every object: jittered sizes and positions, no overlaps, relation held."""
    objs = [(o.colour, o.shape) for o in spec.objects for _ in range(o.count)]
    gap = lambda p, q, a: q[a] - p[a] - (p[2] + q[2]) / 2  # free pixels from p to q along axis a (0: x, 1: y)
    placed, axis = [], 0 if spec.relation == "left of" else 1  # image rows grow downwards: "above" is a smaller y
    while len(placed) < len(objs):  # place one object at a time; start over when one finds no room
        for _ in range(20):
            s = rng.uniform(*SIZE)
            new = (rng.uniform(s / 2, RES - s / 2), rng.uniform(s / 2, RES - s / 2), s)
            # keep a free pixel to every placed object (else two blobs merge into one), and obey the relation
            if all(max(gap(p, new, 0), gap(new, p, 0), gap(p, new, 1), gap(new, p, 1)) >= 1 for p in placed) and (
                    spec.relation is None or not placed or gap(placed[0], new, axis) >= 1):
                placed.append(new)
                break
        else:
            placed = []
    return [(c, sh, *p) for (c, sh), p in zip(objs, placed)]


def _masks(shape: torch.Tensor, cx: torch.Tensor, cy: torch.Tensor, size: torch.Tensor) -> torch.Tensor:
    """(N, RES*SUPERSAMPLE, RES*SUPERSAMPLE) coverage of N objects; shape indexes SHAPES."""
    g, r, shape = (torch.arange(RES * SUPERSAMPLE) + 0.5) / SUPERSAMPLE, (size / 2).view(-1, 1, 1), shape.view(-1, 1, 1)
    y, x = g.view(1, -1, 1) - cy.view(-1, 1, 1), g.view(1, 1, -1) - cx.view(-1, 1, 1)
    square, circle = (x.abs() <= r) & (y.abs() <= r), x ** 2 + y ** 2 <= r ** 2
    triangle = (y.abs() <= r) & (x.abs() <= (y + r) / 2)  # pointing up: half-width grows from 0 at the tip to r
    return torch.where(shape == 0, square, torch.where(shape == 1, circle, triangle)).float()


def render_batch(prompts: list[str], rng: random.Random) -> torch.Tensor:
    """(B, 3, RES, RES) images in [0, 1] drawing the prompts; object colours jitter by +-0.05 per channel."""
    b, colour, shape, cx, cy, size = zip(*[(b, *o) for b, p in enumerate(prompts) for o in _layout(parse(p), rng)])
    masks = _masks(torch.tensor([list(SHAPES).index(s) for s in shape]), *map(torch.tensor, (cx, cy, size)))
    rgb = torch.tensor([[v + rng.uniform(-0.05, 0.05) for v in PALETTE[c]] for c in colour])
    # objects never overlap (_layout keeps a free pixel between them), so painting is a sum over objects
    delta = masks[:, None] * (rgb.clamp(0, 1) - torch.tensor(BACKGROUND))[:, :, None, None]
    img = torch.tensor(BACKGROUND).view(1, 3, 1, 1).repeat(len(prompts), 1, RES * SUPERSAMPLE, RES * SUPERSAMPLE)
    return F.avg_pool2d(img.index_add(0, torch.tensor(b), delta), SUPERSAMPLE)


# ---- the GenEval-like detector (the reward) ----------------------------------------------------------------------
def colour_masks(images: torch.Tensor, tau: float = 0.12, outlier: float = 0.3) -> torch.Tensor:
    """(B, K, H, W) soft membership of pixels in the K palette colours: a softmax over palette, background and an
    "outlier" class at distance `outlier`, so a pixel halfway to the background is half red; a stray colour, nothing."""
    protos = torch.tensor([*PALETTE.values(), BACKGROUND], device=images.device)       # (K+1, 3)
    d2 = (images[:, None] - protos[None, :, :, None, None]).square().sum(2)           # (B, K+1, H, W)
    return (torch.cat([-d2, torch.full_like(d2[:, :1], -outlier ** 2)], 1) / (2 * tau ** 2)).softmax(1)[:, :-2]


def blobs(soft: torch.Tensor, lo: float = 0.3, hi: float = 0.7) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Mass, fill and skew of the 3 heaviest 4-connected blobs of N soft masks (N, H, W) -> (N, 3) each (0 if none).
    Blobs are the connected regions where soft > lo; a pixel weighs (soft - lo) / (hi - lo), clamped to [0, 1], so it
    joins a blob with weight 0 and every statistic moves continuously with the pixels (only merges and splits jump).
    fill = mass / (heaviest row x heaviest column): square 1, circle pi/4, triangle 1/2 (more, anti-aliased);
    skew = third moment of the mass over rows: 0 for symmetric shapes, < 0 for a triangle pointing up."""
    N, H, W = soft.shape
    mask, soft = soft > lo, ((soft - lo) / (hi - lo)).clamp(0, 1)
    ids = torch.arange(1, H * W + 1, device=soft.device).view(1, H, W)
    lab, m = torch.where(mask, ids, 0).float(), mask.float()  # float: faster than long, and ids <= H*W are exact
    while True:  # every pixel takes the largest label among its 4 neighbours until each blob shares one label
        p = F.pad(lab, (1, 1, 1, 1))
        new = torch.stack([lab, p[:, :-2, 1:-1], p[:, 2:, 1:-1], p[:, 1:-1, :-2], p[:, 1:-1, 2:]]).amax(0) * m
        if torch.equal(new, lab):
            break
        lab = new
    lab = lab.long().view(N, 1, H, W)
    mass = torch.zeros(N, H * W + 1, device=soft.device).scatter_add(1, lab.view(N, -1), soft.view(N, -1).float())
    top, idx = mass[:, 1:].topk(3, 1)  # label 0 is the background
    w = soft[:, None] * (lab == torch.where(top > 0, idx + 1, -1)[..., None, None])   # (N, 3, H, W): one blob each
    rows, y, eps = w.sum(3), torch.arange(H, device=soft.device), 1e-6                  # rows: mass per row (N, 3, H)
    d = y - (rows * y).sum(2, True) / (top[..., None] + eps)                             # row - the blob's mean row
    moment = lambda p: (rows * d ** p).sum(2) / (top + eps)
    # the skew's scale gets +1 px^2: a blob of one or two rows has no meaningful skew and scores ~0, not noise
    return top, top / (rows.amax(2) * w.sum(2).amax(2)).clamp(min=eps), moment(3) / (moment(2) + 1) ** 1.5


def _targets(prompts: list[str], device) -> dict[str, torch.Tensor]:
    """Per prompt, its (up to) two objects as tensors (B, 2); count 0 marks a missing second object."""
    specs = [parse(p) for p in prompts]
    rows = [list(s.objects) + [Obj("red", "square", 0)] * (2 - len(s.objects)) for s in specs]
    t = lambda f: torch.tensor([[f(o) for o in r] for r in rows], device=device)
    mean_size2 = (SIZE[0] ** 2 + SIZE[0] * SIZE[1] + SIZE[1] ** 2) / 3  # E[size^2] under the uniform size law
    return dict(colour=t(lambda o: list(PALETTE).index(o.colour)), count=t(lambda o: o.count),
                area=t(lambda o: SHAPES[o.shape][0] * mean_size2), fill=t(lambda o: SHAPES[o.shape][1]),
                skew=t(lambda o: SHAPES[o.shape][2]),  # relation: 0 none, 1 "left of", 2 "above"
                relation=torch.tensor([RELATIONS.index(s.relation) + 1 if s.relation else 0 for s in specs]).to(device))


def geneval_score(images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
    """(B,) float32 in [0, 1]: how well images (B, 3, H, W) in [0, 1] show their prompts, GenEval-like but soft:
    mean over the prompt's objects of colour x count x shape, times position and purity. Every factor is continuous
    in the pixels, so blurry Tweedie estimates get partial credit and samples of a group rarely tie."""
    tg, B, K = _targets(prompts, images.device), images.shape[0], len(PALETTE)
    soft = colour_masks(images.float())                                                 # (B, K, H, W)
    blob, fill, skew = (v.view(B, K, 3) for v in blobs(soft.flatten(0, 1)))
    pick = lambda v: v.gather(1, tg["colour"][..., None].expand(-1, -1, v.shape[-1]))  # rows of the prompt's colours
    mass = soft.sum((2, 3))                                                              # (B, K)
    n, present = tg["count"].float(), tg["count"] > 0                                  # (B, 2): asked objects
    # colour: the right amount of the colour, with a band for the size jitter (ratio 0.6 .. 1.6 scores 1)
    ratio = mass.gather(1, tg["colour"]) / (n * tg["area"]).clamp(min=1e-6)
    colour = torch.minimum(ratio / 0.6, 1.6 / ratio.clamp(min=1e-6)).clamp(max=1)
    # count: blobs of the colour versus the asked number, one factor e per miscounted object; a blob counts fully
    # from a mass of 7 (the lightest rendered object has 8) and not at all under 2, so specks fade in, not jump
    exist = ((pick(blob) - 2) / 5).clamp(0, 1)                                          # (B, 2, 3)
    count = torch.exp(-(exist.sum(-1) - n).abs())
    # shape: fill ratio and skew of the n largest blobs versus the shape's (a missing blob scores 0)
    band = lambda d, tol: torch.exp(-0.5 * ((d.abs() - tol).clamp(min=0) / tol) ** 2)  # 1 within tol, then decays
    like = band(pick(fill) - tg["fill"][..., None], 0.08) * band(pick(skew) - tg["skew"][..., None], 0.06)
    shape = (like * exist * (torch.arange(3, device=n.device) < n[..., None])).sum(-1) / n.clamp(min=1)
    # an object needs its colour and count; a wrong shape (detail, decided last) halves its credit; objects share
    objects = (colour * count * (0.5 + 0.5 * shape) * present).sum(1) / present.sum(1)
    # position: mass centroids of the two colours, a sigmoid of their separation in pixels
    grid = torch.arange(images.shape[-1], device=images.device, dtype=torch.float32)
    cy, cx = ((soft * g).sum((2, 3)) / (mass + 1e-6) for g in (grid.view(-1, 1), grid))  # (B, K) each
    centre = torch.where((tg["relation"] == 2)[:, None], cy, cx).gather(1, tg["colour"])  # (B, 2)
    position = torch.where(tg["relation"] > 0, torch.sigmoid(centre[:, 1] - centre[:, 0]), 1)
    # purity: coloured mass outside the prompt's colours (extra objects) costs in proportion
    asked = (F.one_hot(tg["colour"], K) * present[..., None]).amax(1) > 0                 # (B, K)
    purity = ((mass * asked).sum(1) + 1) / (mass.sum(1) + 1)
    return (objects * position * purity).float()


# ---- the base model: a tiny SD3 transformer and a token-embedding text encoder, pretrained by flow matching ----
MODEL = dict(sample_size=RES, patch_size=4, in_channels=3, out_channels=3, num_layers=4, attention_head_dim=16,
             num_attention_heads=4, joint_attention_dim=32, caption_projection_dim=64, pooled_projection_dim=32,
             pos_embed_max_size=RES // 4)
PRETRAIN = dict(batch=64, lr=2e-3, warmup=50, drop=0.1, version=1)  # drop: share of empty prompts (CFG's unconditional)


class TextEncoder(torch.nn.Module):
    """Token + position embeddings -> encoder_hidden_states (B, L, D); their mean over tokens is the pooled (B, D).
    Prompts are padded to MAX_TOKENS; the empty prompt is all padding (the unconditional input of CFG)."""

    def __init__(self, dim: int):
        super().__init__()
        self.tok, self.pos = torch.nn.Embedding(len(VOCAB), dim), torch.nn.Parameter(torch.zeros(MAX_TOKENS, dim))

    def forward(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        for p in filter(None, prompts):
            parse(p)  # a prompt outside the toy grammar fails here, by name
        ids = [[VOCAB.index(w) for w in p.lower().split()] for p in prompts]
        e = self.tok(torch.tensor([i + [0] * (MAX_TOKENS - len(i)) for i in ids], device=self.pos.device))  # (B, L, D)
        return e + self.pos, e.mean(1)


def flow_matching_loss(transformer, text, x0: torch.Tensor, prompts: list[str], gen: torch.Generator) -> torch.Tensor:
    """||v_theta(x_t, t, c) - (x1 - x0)||^2 at t ~ U(0, 1) (choice 1 of the docstring)."""
    x1, t = torch.randn(x0.shape, generator=gen, device=x0.device), torch.rand(len(x0), generator=gen, device=x0.device)
    xt = (1 - t.view(-1, 1, 1, 1)) * x0 + t.view(-1, 1, 1, 1) * x1
    return (transformer(xt, *text(prompts), 1000 * t).sample - (x1 - x0)).square().mean()


def pretrain(transformer, text, steps: int, seed: int, device) -> None:
    """Flow matching on freshly rendered (train prompt, image) pairs; PRETRAIN['drop'] of prompts emptied for CFG."""
    rng, gen = random.Random(seed), torch.Generator(device).manual_seed(seed)
    opt = torch.optim.AdamW([*transformer.parameters(), *text.parameters()], lr=PRETRAIN["lr"], weight_decay=0.0)
    # warmup, then cosine decay to 0: the last, small steps average out the noise of short training (like an EMA)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda i: min(1, (i + 1) / PRETRAIN["warmup"]) * 0.5 * (1 + math.cos(math.pi * i / steps)))
    for _ in (bar := tqdm(range(steps), desc="pretraining the toy base model", leave=False)):
        prompts = rng.choices(TRAIN_PROMPTS, k=PRETRAIN["batch"])
        x0 = render_batch(prompts, rng).to(device) * 2 - 1
        prompts = [p if rng.random() >= PRETRAIN["drop"] else "" for p in prompts]
        (loss := flow_matching_loss(transformer, text, x0, prompts, gen)).backward()
        opt.step(), sched.step()
        opt.zero_grad(set_to_none=True)  # after the step, so the frozen base keeps no stale .grad
        bar.set_postfix(loss=f"{loss.item():.4f}")


DEFAULT_CACHE = Path(__file__).resolve().parent / ".cache" / "toy"
DEFAULT_PRETRAIN_STEPS = 1200


class ToyWorld:
    """The World interface (worlds.py) for the toy task: frozen pretrained base, prompts, encode, velocity, decode."""

    default_guidance = 1.0
    latent_shape = (3, RES, RES)
    train_prompts, eval_prompts = TRAIN_PROMPTS, EVAL_PROMPTS

    def __init__(self, device="cpu", cache_dir=DEFAULT_CACHE, pretrain_steps=DEFAULT_PRETRAIN_STEPS, seed=0):
        self.device = torch.device(device)
        with torch.random.fork_rng(devices=[]):  # initialise from the seed without touching the caller's RNG
            torch.manual_seed(seed)
            self.transformer = SD3Transformer2DModel(**MODEL).to(self.device)
            self.text = TextEncoder(MODEL["joint_attention_dim"]).to(self.device)
        key = json.dumps(dict(model=MODEL, pretrain=PRETRAIN, steps=pretrain_steps, seed=seed, vocab=VOCAB,
                              train=TRAIN_PROMPTS, palette=PALETTE, size=SIZE), sort_keys=True)
        self.cache_path = Path(cache_dir) / f"toy_{hashlib.sha256(key.encode()).hexdigest()[:16]}.safetensors"
        both = torch.nn.ModuleDict(dict(transformer=self.transformer, text=self.text))  # one state dict, one file
        if self.cache_path.exists():
            both.load_state_dict(load_file(self.cache_path, device=str(self.device)))
        else:
            pretrain(self.transformer, self.text, pretrain_steps, seed, self.device)
            self.cache_path.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.cache_path.with_suffix(f".{id(self)}.tmp")  # write, then rename: no reader sees half a file
            save_file({k: v.contiguous().cpu() for k, v in both.state_dict().items()}, tmp)
            tmp.replace(self.cache_path)
        both.requires_grad_(False).eval()

    @torch.no_grad()
    def encode(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        (emb, pooled), (neg_emb, neg_pooled) = self.text(prompts), self.text([""] * len(prompts))
        return dict(prompt_embeds=emb, pooled=pooled, neg_prompt_embeds=neg_emb, neg_pooled=neg_pooled)

    def velocity(self, x: torch.Tensor, t: torch.Tensor, cond: dict, guidance: float) -> torch.Tensor:
        x = x.to(self.transformer.dtype)
        if guidance == 1:
            return self.transformer(x, cond["prompt_embeds"], cond["pooled"], 1000 * t).sample.float()
        # one doubled batch [unconditional; conditional], so the batch composition never depends on the caller
        emb, pooled = (torch.cat([cond[f"neg_{k}"], cond[k]]) for k in ("prompt_embeds", "pooled"))
        v_u, v_c = self.transformer(x.repeat(2, 1, 1, 1), emb, pooled, 1000 * t.repeat(2)).sample.float().chunk(2)
        return v_u + guidance * (v_c - v_u)

    def decode(self, x0: torch.Tensor) -> torch.Tensor:
        return ((x0.float() + 1) / 2).clamp(0, 1)
