"""The toy text-to-image world: a tiny SD3 base model, its text encoder, pretraining with caption noise, ToyWorld.

A miniature of SD3.5 Medium (METHOD.md §8: GenEval 0.28 at cfg 1): clean renders, imperfect prompt adherence. The
model is a small diffusers SD3Transformer2DModel and a token + position embedding text encoder, pretrained by flow
matching on freshly rendered (render.py) pairs whose captions are sometimes wrong, as real captions are. The base
ships in assets/toy_base.safetensors, made by `OMP_NUM_THREADS=1 python toy.py --pretrain` (bit for bit with one
thread; 16 minutes on one busy core); any other configuration is pretrained once and cached under cache_dir.
`python toy.py --measure` prints the base's held-out adherence (reward against the prompt asked) and render
quality (best reward over all prompts, render.render_quality), at guidance 1 with evaluate.held_out's ODE sampling.

Notation: x0 clean image in [-1, 1] (B, 3, H, W); x1 ~ N(0, I); x_t = (1 - t) x0 + t x1; v ~ x1 - x0;
timestep = 1000 t.

The paper has nothing to say here; the toy world's choices are METHOD.md's 25-30: t ~ U(0, 1) in pretraining
(choice 25), caption noise as the base's imperfection (choice 26), patch 4, 4 layers, 12,000 steps (choice 27), an
order-aware text encoder (choice 28), the soft GenEval-like reward of render.py (choice 29), the toy preset of
config.py (choice 30).
"""
import argparse
import hashlib
import json
import math
import random
import time
from pathlib import Path

import torch
from diffusers import SD3Transformer2DModel
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from tqdm import tqdm

import sde
from render import (ALL_PROMPTS, BACKGROUND, EVAL_PROMPTS, NUMBERS, PALETTE, RES, SHAPES, SIZE, SUPERSAMPLE,
                    TRAIN_PROMPTS, Spec, geneval_score, parse, prompt_of, render_batch, render_quality)
from world import guided

MAX_TOKENS = 8
VOCAB = ["<pad>"] + sorted({w for p in ALL_PROMPTS for w in p.split()})
# patch 4 (16 image tokens), 4 layers: the cost of every RL iteration of every run (choice 27)
MODEL = dict(sample_size=RES, patch_size=4, in_channels=3, out_channels=3, num_layers=4, attention_head_dim=16,
             num_attention_heads=4, joint_attention_dim=32, caption_projection_dim=64, pooled_projection_dim=32,
             pos_embed_max_size=RES // 4)
# drop: share of empty prompts (CFG's unconditional); miscaption: share of captions wrong about one attribute
PRETRAIN = dict(batch=64, lr=2e-3, warmup=50, drop=0.1, miscaption=0.4, version=2)
DEFAULT_PRETRAIN_STEPS = 12000
DEFAULT_CACHE = Path(__file__).resolve().parent / ".cache" / "toy"
SHIPPED = Path(__file__).resolve().parent / "assets" / "toy_base.safetensors"


class TextEncoder(torch.nn.Module):
    """Token + position embeddings -> encoder_hidden_states (B, L, D); their mean over tokens is the pooled (B, D).
    Prompts are padded to MAX_TOKENS; the empty prompt is all padding (the unconditional input of CFG). Position
    embeddings make it order-aware: a relation and its swap differ (choice 28)."""

    def __init__(self, dim: int):
        super().__init__()
        self.tok = torch.nn.Embedding(len(VOCAB), dim)
        self.pos = torch.nn.Parameter(torch.zeros(MAX_TOKENS, dim))

    def forward(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        for p in filter(None, prompts):
            parse(p)  # a prompt outside the toy grammar fails here, by name
        ids = [[VOCAB.index(w) for w in p.lower().split()] for p in prompts]
        padded = torch.tensor([i + [0] * (MAX_TOKENS - len(i)) for i in ids], device=self.pos.device)
        e = self.tok(padded)  # (B, L, D)
        return e + self.pos, e.mean(1)


def miscaption(prompt: str, rng: random.Random) -> str:
    """The prompt with exactly one attribute wrong, still in the grammar: one object's colour, shape or count, or
    for a relation the order of its two objects ("a red square left of a blue circle" -> "a blue circle left of
    a red square"), each kind equally likely."""
    spec = parse(prompt)
    objs = list(spec.objects)
    if spec.relation is None:
        kind = rng.choice(["colour", "shape", "count"])
        i = 0
    else:
        kind = rng.choice(["colour", "shape", "swap"])
        if kind == "swap":
            return prompt_of(Spec((objs[1], objs[0]), spec.relation))
        i = rng.randrange(2)
    if kind == "colour":  # a relation joins two different colours, so the new one differs from both
        objs[i] = objs[i]._replace(colour=rng.choice([c for c in PALETTE if c not in {o.colour for o in objs}]))
    elif kind == "shape":
        objs[i] = objs[i]._replace(shape=rng.choice([s for s in SHAPES if s != objs[i].shape]))
    else:
        objs[i] = objs[i]._replace(count=rng.choice([n for n in NUMBERS if n != objs[i].count]))
    return prompt_of(Spec(tuple(objs), spec.relation))


def flow_matching_loss(transformer, text, x0: torch.Tensor, prompts: list[str], gen: torch.Generator) -> torch.Tensor:
    """||v_theta(x_t, t, c) - (x1 - x0)||^2 at t ~ U(0, 1) (choice 25)."""
    x1 = torch.randn(x0.shape, generator=gen, device=x0.device)
    t = torch.rand(len(x0), generator=gen, device=x0.device).view(-1, 1, 1, 1)
    xt = (1 - t) * x0 + t * x1
    return (transformer(xt, *text(prompts), 1000 * t.flatten()).sample - (x1 - x0)).square().mean()


def captions(prompts: list[str], rng: random.Random) -> list[str]:
    """What pretraining reads for images drawn from `prompts`: PRETRAIN['miscaption'] wrong about one attribute
    (choice 26), then PRETRAIN['drop'] emptied, so the same network also learns the unconditional velocity of CFG."""
    noisy = [miscaption(p, rng) if rng.random() < PRETRAIN["miscaption"] else p for p in prompts]
    return [p if rng.random() >= PRETRAIN["drop"] else "" for p in noisy]


def pretrain(transformer, text, steps: int, seed: int, device) -> None:
    """Flow matching on freshly rendered (train prompt, image) pairs, captioned by `captions`."""
    rng = random.Random(seed)
    gen = torch.Generator(device).manual_seed(seed)
    opt = torch.optim.AdamW([*transformer.parameters(), *text.parameters()], lr=PRETRAIN["lr"], weight_decay=0.0)
    # warmup, then cosine decay to 0: the last, small steps average out the noise of short training (like an EMA)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda i: min(1, (i + 1) / PRETRAIN["warmup"]) * 0.5 * (1 + math.cos(math.pi * i / steps)))
    bar = tqdm(range(steps), desc="pretraining the toy base model", leave=False)
    for _ in bar:
        prompts = rng.choices(TRAIN_PROMPTS, k=PRETRAIN["batch"])
        x0 = render_batch(prompts, rng).to(device) * 2 - 1  # drawn from the TRUE prompts
        loss = flow_matching_loss(transformer, text, x0, captions(prompts, rng), gen)
        loss.backward()
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)  # after the step, so the frozen base keeps no stale .grad
        bar.set_postfix(loss=f"{loss.item():.4f}")


def config_key(steps: int = DEFAULT_PRETRAIN_STEPS, seed: int = 0) -> str:
    """A hash of all the pretrained weights depend on: model, pretraining, vocabulary, split and renderer."""
    world = dict(palette=PALETTE, shapes=SHAPES, size=SIZE, background=BACKGROUND, res=RES, supersample=SUPERSAMPLE)
    key = json.dumps(dict(model=MODEL, pretrain=PRETRAIN, steps=steps, seed=seed, vocab=VOCAB, train=TRAIN_PROMPTS,
                          world=world), sort_keys=True)
    return hashlib.sha256(key.encode()).hexdigest()[:16]


def stored_key(path: Path) -> str | None:
    """The config key in a weights file's metadata (None if the file is missing or has none)."""
    if not path.exists():
        return None
    with safe_open(path, "pt") as f:
        return (f.metadata() or {}).get("config_key")


def initial_model(seed: int) -> torch.nn.ModuleDict:
    """The untrained transformer and text encoder, as one module: one state dict, one weights file."""
    with torch.random.fork_rng(devices=[]):  # initialise from the seed without touching the caller's RNG
        torch.manual_seed(seed)
        transformer = SD3Transformer2DModel(**MODEL)
        text = TextEncoder(MODEL["joint_attention_dim"])
    return torch.nn.ModuleDict(dict(transformer=transformer, text=text))


def save_weights(module: torch.nn.Module, path: Path, key: str) -> None:
    """Write, then rename: no reader sees half a file; the config key goes into the safetensors metadata."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{id(module)}.tmp")
    save_file({k: v.contiguous().cpu() for k, v in module.state_dict().items()}, tmp, metadata={"config_key": key})
    tmp.replace(path)


class ToyWorld:
    """world.World for the toy task: frozen pretrained base, prompts, encode, velocity, decode. Weights: the shipped
    file if its key matches this configuration, else the cache, else pretraining (cached). prompts: (training,
    held-out) lists replacing the built-in splits where not None (prompts of the toy grammar: the toy reward reads
    no other)."""

    default_guidance = 1.0
    latent_shape = (3, RES, RES)
    train_prompts = TRAIN_PROMPTS
    eval_prompts = EVAL_PROMPTS
    render_quality = staticmethod(render_quality)  # the evaluation logs it beside the held-out reward

    def __init__(self, device="cpu", cache_dir=DEFAULT_CACHE, pretrain_steps=DEFAULT_PRETRAIN_STEPS, seed=0,
                 prompts=(None, None)):
        self.device = torch.device(device)
        train, held_out = prompts
        if train is not None:
            self.train_prompts = list(train)
        if held_out is not None:
            self.eval_prompts = list(held_out)
        both = initial_model(seed).to(self.device)
        self.transformer = both["transformer"]
        self.text = both["text"]
        key = config_key(pretrain_steps, seed)
        cached = Path(cache_dir) / f"toy_{key}.safetensors"
        self.cache_path = SHIPPED if stored_key(SHIPPED) == key else cached
        if self.cache_path.exists():
            both.load_state_dict(load_file(self.cache_path, device=str(self.device)))
        else:
            pretrain(self.transformer, self.text, pretrain_steps, seed, self.device)
            save_weights(both, self.cache_path, key)
        both.requires_grad_(False).eval()

    @torch.no_grad()
    def encode(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        emb, pooled = self.text(prompts)
        neg_emb, neg_pooled = self.text([""] * len(prompts))
        return dict(prompt_embeds=emb, pooled=pooled, neg_prompt_embeds=neg_emb, neg_pooled=neg_pooled)

    def velocity(self, x: torch.Tensor, t: torch.Tensor, cond: dict, guidance: float,
                 detach_uncond: bool = False) -> torch.Tensor:
        x = x.to(self.transformer.dtype)
        if guidance == 1:
            return self.transformer(x, cond["prompt_embeds"], cond["pooled"], 1000 * t).sample.float()
        # one doubled batch [unconditional; conditional], so the batch composition never depends on the caller
        emb = torch.cat([cond["neg_prompt_embeds"], cond["prompt_embeds"]])
        pooled = torch.cat([cond["neg_pooled"], cond["pooled"]])
        v_u, v_c = self.transformer(x.repeat(2, 1, 1, 1), emb, pooled, 1000 * t.repeat(2)).sample.float().chunk(2)
        return guided(v_u, v_c, guidance, detach_uncond)

    def decode(self, x0: torch.Tensor) -> torch.Tensor:
        return ((x0.float() + 1) / 2).clamp(0, 1)


@torch.no_grad()
def base_scores(world: ToyWorld, prompts: list[str], steps: int = 20, seed: int = 1) -> tuple[torch.Tensor, ...]:
    """(adherence, render quality), each (B,), of the world's samples of `prompts` at guidance 1, ODE sampling as
    evaluate.held_out does it (ddim_step with eta 0 over sde.sigmas(steps, 3)), from noises seeded by `seed`."""
    x = torch.randn(len(prompts), *world.latent_shape, generator=torch.Generator().manual_seed(seed))
    x = x.to(world.device)
    cond = world.encode(prompts)
    levels = sde.sigmas(steps, 3.0)
    for k in range(steps):
        v = world.velocity(x, levels[k].expand(len(x)).to(x.device), cond, 1.0)
        x = sde.ddim_step(x, v, levels[k], levels[k + 1], eta=0.0)[0]
    images = world.decode(x)
    return geneval_score(images, prompts), render_quality(images)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description="The toy base model: pretrain and ship it, or measure it.")
    p.add_argument("--pretrain", action="store_true", help=f"pretrain the default base and write {SHIPPED.name}")
    p.add_argument("--measure", action="store_true", help="held-out adherence and render quality, 200 samples")
    args = p.parse_args(argv)
    if args.pretrain:
        start = time.perf_counter()
        both = initial_model(seed=0)
        pretrain(both["transformer"], both["text"], DEFAULT_PRETRAIN_STEPS, 0, torch.device("cpu"))
        save_weights(both, SHIPPED, config_key())
        print(f"pretrained in {time.perf_counter() - start:.0f} s -> {SHIPPED}")
    if args.measure or args.pretrain:
        adherence, quality = base_scores(ToyWorld("cpu"), EVAL_PROMPTS * 4)
        print(f"held-out, guidance 1, 20-step ODE, {len(adherence)} samples: adherence {adherence.mean():.3f}, "
              f"render quality {quality.mean():.3f}")


if __name__ == "__main__":
    main()
