"""The World interface: what the training loop needs of a text-to-image model, and the batched work it does through it.

A world (toy.ToyWorld: the built-in toy; sd3.SD3World: Stable Diffusion 3 / 3.5) has
    transformer            an SD3Transformer2DModel, base weights frozen; train.py adds the peft LoRA adapter
    latent_shape           (C, H, W) of one sample
    train_prompts, eval_prompts, default_guidance
    encode(prompts)        -> dict of batch-first tensors (what velocity needs, CFG negatives included)
    velocity(x, t, cond, guidance, detach_uncond=False) -> v_theta(x_t, t, c) in float32, t (B,) in [0, 1],
                           CFG from one doubled batch, combined by `guided`
    decode(x0)             -> (B, 3, H, W) images in [0, 1]
    render_quality(images) -> (B,), optional (the toy's): the best reward of each image over every prompt
Here: the noise and the order of an iteration's trajectories, sampling in micro-batches (METHOD.md §2), the x0_est
of every distinct state (§3), rewards of decoded estimates (§3), the held-out evaluation, the data of Figure 1.
Notation: B trajectories, G groups, N trajectories a group, U updates an iteration, T sampling steps, K estimates
per trajectory, x0 -> x0_est, r -> r_k.

Choices:
1. Noise is drawn up front, per prompt group, from a generator seeded by (seed, iteration, the group's index in
   the iteration): a run samples the same whatever its micro-batches, devices or number of processes, and a
   resumed run needs no generator state.
2. Update u of an iteration trains members u N/U .. (u+1) N/U - 1 of every group, ordered member by member across the
   groups: every optimizer step sees every prompt, and every micro-batch of G or more trajectories too (Flow-GRPO
   shuffles for the same end). Sampling
   uses those very micro-batches, so re-scoring before the first update reproduces the log-probs: ratio 1.
"""
from contextlib import contextmanager
from functools import partial

import torch

import parallel
import sde
from files import LoadError, read_prompts


def build_world(cfg, device):
    """The model behind the loop: the built-in toy world or a diffusers SD3 pipeline (same interface)."""
    if cfg.model == "toy":
        import toy
        steps = {"pretrain_steps": cfg.pretrain_steps} if cfg.pretrain_steps else {}
        world = toy.ToyWorld(device, cfg.cache_dir, **steps)
    else:
        import sd3
        # the training prompts go in at load: how the text encoders are used depends on their number
        world = sd3.SD3World.load(cfg.model, device, resolution=cfg.resolution, text_encoders=cfg.text_encoders,
                                  gradient_checkpointing=cfg.gradient_checkpointing,
                                  train_prompts=read_prompts(cfg.prompts) if cfg.prompts else None)
    if cfg.prompts and cfg.model == "toy":
        world.train_prompts = read_prompts(cfg.prompts)
        for p in world.train_prompts:
            try:
                toy.parse(p)  # the toy reward reads only its own grammar
            except ValueError as e:
                raise LoadError(f"--prompts {cfg.prompts}: {e}") from None
    return world


def guided(v_u, v_c, guidance, detach_uncond=False):
    """Classifier-free guidance v_u + g (v_c - v_u). detach_uncond: no gradient through the unconditional branch,
    as Flow-GRPO trains; else the LoRA is also pushed to widen v_c - v_u, i.e. to amplify guidance."""
    if detach_uncond:
        v_u = v_u.detach()
    return v_u + guidance * (v_c - v_u)


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


def distinct_states(states, groups):
    """source (B, T): for each state, the trajectory whose same-step state it repeats, itself if none. A state
    that equals, bit for bit, the same step's state of its group's first trajectory has the same prompt, time and
    input, so the same x0_est: a group sharing x_T has one x_T, and under the DDIM SDE, whose first step is
    deterministic, one x^(1) too; each is estimated, decoded and scored once."""
    B = len(states)
    first = torch.stack([(groups == g).nonzero()[0, 0] for g in groups])  # (B,)
    same = (states == states[first]).flatten(2).all(2).cpu() & (torch.arange(B) != first)[:, None]
    return torch.where(same, first[:, None], torch.arange(B)[:, None])


def is_source(source):
    """(B, K) True where a state is its own source: the distinct ones."""
    return source == torch.arange(len(source))[:, None]


@torch.no_grad()
def x0_estimates(world, out, cond, groups, levels, substeps, batch, guidance):
    """x0_est(x^(k)) for k = 0..T (§3): the distinct non-final states of all trajectories go through the model
    together. Returns x0 (B, T+1, ...), the last being the image, and source (B, T+1) (distinct_states)."""
    B, T = out["log_probs"].shape
    source = distinct_states(out["states"][:, :T], groups)
    b, k = is_source(source).nonzero(as_tuple=True)  # the distinct states, trajectory-major
    x, v, t = out["states"][b, k], out["velocities"][b, k], levels[k].to(out["states"].device)
    x0 = torch.empty_like(out["states"][:, :T])
    for c in chunks(len(b), batch):
        velocity = partial(world.velocity, cond=rows(cond, b[c]), guidance=guidance)
        x0[b[c], k[c]] = sde.ode_x0(velocity, x[c], t[c], substeps, v=v[c])
    x0 = x0[source, torch.arange(T)]  # a repeated state takes its source's estimate
    source = torch.cat([source, torch.arange(B)[:, None]], 1)  # every final image is its own
    return torch.cat([x0, out["states"][:, T:]], 1), source


@torch.no_grad()
def score(world, reward_fn, x0, prompts, source=None):
    """r_k = R(decode(x0_est(x^(k))), c) for x0 estimates (B, K, ...) -> (B, K) on the CPU, and the decoded images
    (trajectory-major). source (B, K), from x0_estimates: a repeated estimate is neither decoded nor scored."""
    B, K = x0.shape[:2]
    source = torch.arange(B)[:, None].expand(B, K) if source is None else source
    b, k = is_source(source).nonzero(as_tuple=True)
    images = torch.cat([world.decode(x0[b[c], k[c]]) for c in chunks(len(b), 64)])
    r = torch.empty(B, K)
    r[b, k] = reward_fn(images, [prompts[i] for i in b.tolist()]).float().cpu()
    return r[source, torch.arange(K)], images


def sample(world, cond, x1, noise, levels, step_fn, guidance, micro_batches):
    """Rollouts in the given micro-batches (slices); training re-scores the same ones, so batch composition matches.
    noise (B, T, ...) on the CPU, or None for the ODE."""
    outs = []
    for c in micro_batches:
        velocity = partial(world.velocity, cond=rows(cond, c), guidance=guidance)
        outs.append(sde.rollout(velocity, x1[c], levels, step_fn, None if noise is None else noise[c]))
    return {k: torch.cat([o[k] for o in outs]) for k in outs[0]}


def noise_seed(seed, it, group):
    """The seed of one prompt group's noises in iteration `it` (choice 1); group -1 seeds the prompt draw."""
    return (seed * 1_000_003 + it) * 1_000_003 + group + 1


def group_noise(world, cfg, it, g):
    """x_T (N, ...) and step noises (N, T, ...) of group g: one x_T for the group (§3) unless --shared-noise false."""
    N, T = cfg.group_size, cfg.num_steps
    gen = torch.Generator().manual_seed(noise_seed(cfg.seed, it, g))
    x1 = torch.randn(1 if cfg.shared_noise else N, *world.latent_shape, generator=gen).expand(N, *world.latent_shape)
    return x1, torch.randn(N, T, *world.latent_shape, generator=gen)


def update_order(G, N, U):
    """Trajectory order (B,) into the group-major layout (g N + j): update u's trajectories come u-th (choice 2)."""
    n = N // U
    return torch.tensor([g * N + u * n + j for u in range(U) for j in range(n) for g in range(G)])


def micro_batches(B, U, size):
    """Per update, the slices of its trajectories forming its micro-batches of at most `size`."""
    n = B // U
    return [[slice(u * n + c.start, u * n + c.stop) for c in chunks(n, size)] for u in range(U)]


def sample_groups(world, cfg, policy, guidance, it, device, group_ids=None):
    """This iteration's G random training prompts x N trajectories, in update order (choice 2), sampled from
    group_noise. group_ids: the groups this process samples (default all G). Returns prompts, group ids (B,),
    the encoding, the rollouts and the micro-batches per update."""
    G, N, U = cfg.prompts_per_step, cfg.group_size, cfg.updates_per_iteration
    gen = torch.Generator().manual_seed(noise_seed(cfg.seed, it, -1))
    drawn = torch.randperm(len(world.train_prompts), generator=gen)[:G].tolist()
    group_ids = list(range(G)) if group_ids is None else list(group_ids)
    noises = [group_noise(world, cfg, it, g) for g in group_ids]
    order = update_order(len(group_ids), N, U)
    x1 = torch.cat([x for x, _ in noises])[order].to(device)
    noise = torch.cat([n for _, n in noises])[order]
    groups = torch.tensor(group_ids).repeat_interleave(N)[order]
    prompts = [world.train_prompts[drawn[g]] for g in groups.tolist()]
    cond = world.encode(prompts)
    plan = micro_batches(len(groups), U, cfg.micro_batch)
    out = sample(world, cond, x1, noise, policy.levels, policy.step_fn, guidance, [c for u in plan for c in u])
    return prompts, groups, cond, out, plan


@torch.no_grad()
def evaluate(world, reward_fn, cfg, guidance, device):
    """Held-out reward with ODE sampling (eta = 0) from the same noises at every evaluation, eval_repeats a prompt;
    sharded over ranks, the rewards gathered. Returns the metrics, and this rank's images and their prompts."""
    world.transformer.eval()
    gen = torch.Generator().manual_seed(cfg.seed + 1)
    prompts = world.eval_prompts * cfg.eval_repeats
    x1 = torch.randn(len(prompts), *world.latent_shape, generator=gen)  # for the whole list, whatever the ranks
    mine = parallel.shard(len(prompts))
    prompts = prompts[mine]
    out = sample(world, world.encode(prompts), x1[mine].to(device), None, sde.sigmas(cfg.eval_steps, cfg.shift),
                 partial(sde.ddim_step, eta=0.0), guidance, chunks(len(prompts), max(cfg.micro_batch, 16)))
    r, images = score(world, reward_fn, out["states"][:, -1:], prompts)
    m = {"eval_reward": parallel.gather_uneven(r).mean().item()}
    if hasattr(world, "render_quality"):  # the toy's: is each image a clean render of some prompt?
        m["eval_quality"] = parallel.gather_uneven(world.render_quality(images).cpu()).mean().item()
    return m, images.cpu(), prompts


@torch.no_grad()
def trajectory_pair(world, reward_fn, cfg, guidance, policy, device):
    """The paper's Figure 1 data: two trajectories of one held-out prompt from one noise, x0_est and r_k per state."""
    prompt = world.eval_prompts[0]
    gen = torch.Generator().manual_seed(cfg.seed + 2)
    x1 = torch.randn(1, *world.latent_shape, generator=gen).expand(2, *world.latent_shape).to(device)
    noise = torch.randn(2, cfg.num_steps, *world.latent_shape, generator=gen)
    cond = world.encode([prompt] * 2)
    out = sample(world, cond, x1, noise, policy.levels, policy.step_fn, guidance, [slice(0, 2)])
    x0 = x0_estimates(world, out, cond, torch.tensor([0, 1]), policy.levels, cfg.tweedie_substeps,
                      cfg.tweedie_batch, guidance)[0]  # two groups of one: every state's own estimate for the figure
    r, images = score(world, reward_fn, x0, [prompt] * 2)
    return images.view(2, -1, *images.shape[1:]).cpu(), r, prompt
