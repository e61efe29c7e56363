"""The World interface: what the training loop needs of a text-to-image model, and the batched work it does through it.

A world (toy.ToyWorld: the built-in toy; sd3.SD3World: Stable Diffusion 3 / 3.5) has
    transformer            an SD3Transformer2DModel, base weights frozen; train.py adds the peft LoRA adapter
    latent_shape           (C, H, W) of one sample
    train_prompts, eval_prompts, default_guidance
    encode(prompts)        -> dict of batch-first tensors (what velocity needs, CFG negatives included)
    velocity(x, t, cond, guidance) -> v_theta(x_t, t, c) in float32, t (B,) in [0, 1], CFG from one doubled batch
    decode(x0)             -> (B, 3, H, W) images in [0, 1]
Here: sampling in micro-batches (METHOD.md §2), the x0_est of every state of every trajectory (§3), rewards of
decoded estimates (§3), the held-out evaluation, and the data of the paper's Figure 1.
Notation: B trajectories, T sampling steps, K estimates per trajectory, x0 -> x0_est, r -> r_k.
"""
from contextlib import contextmanager
from functools import partial

import torch

import sde


def build_world(cfg, device):
    """The model behind the loop: the built-in toy world or a diffusers SD3 pipeline (same interface)."""
    if cfg.model == "toy":
        import toy
        world = toy.ToyWorld(device, cfg.cache_dir, **({"pretrain_steps": cfg.pretrain_steps} if cfg.pretrain_steps else {}))
    else:
        import sd3
        world = sd3.SD3World.load(cfg.model, device, resolution=cfg.resolution,
                                  gradient_checkpointing=cfg.gradient_checkpointing)
    if cfg.prompts:
        from sd3 import read_prompts
        world.train_prompts = read_prompts(cfg.prompts)
        if cfg.model == "toy":
            [toy.parse(p) for p in world.train_prompts]  # the toy reward only reads its own grammar
    return world


@contextmanager
def base_model(transformer):
    """The reference policy of the KL: the same network with its LoRA switched off (no second copy held)."""
    transformer.disable_adapters()
    try:
        yield
    finally:
        transformer.enable_adapters()


def chunks(n, size):
    """Slices cutting n rows into pieces of `size` (0: one piece)."""
    size = size or n
    return [slice(i, min(i + size, n)) for i in range(0, n, size)]


def rows(cond, idx):
    """The rows idx of every tensor of an encoding."""
    return {k: v[idx] for k, v in cond.items()}


@torch.no_grad()
def x0_estimates(world, out, cond, levels, substeps, batch, guidance):
    """x0_est(x^(k)) for k = 0..T (§3): the T non-final states of all trajectories go through the model together."""
    B, T = out["log_probs"].shape
    x = out["states"][:, :T].flatten(0, 1)  # (B*T, ...), trajectory-major
    t = levels[:T].repeat(B).to(x.device)
    v, rep = out["velocities"].flatten(0, 1), torch.arange(B).repeat_interleave(T)
    x0 = torch.cat([sde.ode_x0(partial(world.velocity, cond=rows(cond, rep[c]), guidance=guidance), x[c], t[c],
                               substeps, v=v[c]) for c in chunks(len(x), batch)])
    return torch.cat([x0.view(B, T, *x.shape[1:]), out["states"][:, T:]], 1)  # (B, T+1, ...): the last is the image


@torch.no_grad()
def score(world, reward_fn, x0, prompts):
    """r_k = R(decode(x0_est(x^(k))), c) for x0 estimates (B, K, ...) -> (B, K) on the CPU."""
    B, K = x0.shape[:2]
    images = torch.cat([world.decode(x0.flatten(0, 1)[c]) for c in chunks(B * K, 64)])
    return reward_fn(images, [p for p in prompts for _ in range(K)]).float().cpu().view(B, K), images


def sample(world, cond, x1, levels, step_fn, guidance, micro_batch, gen):
    """Rollouts in micro-batches; training re-scores the same micro-batches, so batch composition matches."""
    outs = [sde.rollout(partial(world.velocity, cond=rows(cond, c), guidance=guidance), x1[c], levels, step_fn, gen)
            for c in chunks(len(x1), micro_batch)]
    return {k: torch.cat([o[k] for o in outs]) for k in outs[0]}


def group_noise(world, cfg, gen, device):
    """x_T of G prompts x N trajectories: a group shares its initial noise (§3) unless --shared-noise false."""
    G, N = cfg.prompts_per_step, cfg.group_size
    x1 = torch.randn(G if cfg.shared_noise else G * N, *world.latent_shape, generator=gen)
    return (x1.repeat_interleave(N, 0) if cfg.shared_noise else x1).to(device)


def sample_groups(world, cfg, levels, step_fn, guidance, gen, device):
    """G random training prompts x N trajectories each, sampled from group_noise."""
    G, N = cfg.prompts_per_step, cfg.group_size
    idx = torch.randperm(len(world.train_prompts), generator=gen)[:G].repeat_interleave(N)
    prompts, groups = [world.train_prompts[i] for i in idx.tolist()], torch.arange(G).repeat_interleave(N)
    x1, cond = group_noise(world, cfg, gen, device), world.encode(prompts)
    return prompts, groups, cond, sample(world, cond, x1, levels, step_fn, guidance, cfg.micro_batch, gen)


@torch.no_grad()
def evaluate(world, reward_fn, cfg, guidance, device):
    """Held-out reward with ODE sampling (eta = 0) from the same noises at every evaluation, eval_repeats a prompt."""
    world.transformer.eval()
    gen = torch.Generator().manual_seed(cfg.seed + 1)
    prompts = world.eval_prompts * cfg.eval_repeats
    x1 = torch.randn(len(prompts), *world.latent_shape, generator=gen).to(device)
    out = sample(world, world.encode(prompts), x1, sde.sigmas(cfg.eval_steps, cfg.shift),
                 partial(sde.ddim_step, eta=0.0), guidance, max(cfg.micro_batch, 16), gen)
    r, images = score(world, reward_fn, out["states"][:, -1:], prompts)
    return r.mean().item(), images.cpu(), prompts


@torch.no_grad()
def trajectory_pair(world, reward_fn, cfg, guidance, levels, step_fn, device):
    """The paper's Figure 1 data: two trajectories of one held-out prompt from one noise, x0_est and r_k per state."""
    prompt, gen = world.eval_prompts[0], torch.Generator().manual_seed(cfg.seed + 2)
    x1 = torch.randn(1, *world.latent_shape, generator=gen).expand(2, *world.latent_shape).to(device)
    cond = world.encode([prompt] * 2)
    out = sample(world, cond, x1, levels, step_fn, guidance, 2, gen)
    x0 = x0_estimates(world, out, cond, levels, cfg.tweedie_substeps, cfg.tweedie_batch, guidance)
    r, images = score(world, reward_fn, x0, [prompt] * 2)
    return images.view(2, -1, *images.shape[1:]).cpu(), r, prompt
