"""The bookkeeping of an iteration's batch, kept off the reading path: noise, order, micro-batches, repeated states.

Nothing here changes what the method computes (METHOD.md §2-5); it decides which random numbers, in which order,
through which forward passes:
    draw_prompts              the iteration's G prompts, the same on every rank
    noise_seed, group_noise   every prompt group's noises from a generator of its own (choice 7)
    update_order              which trajectories each optimizer step trains (choice 11)
    micro_batches             the forward passes of each optimizer step, in sampling and in training alike
    first_copies, distinct    which states repeat another bit for bit, so that x0_est runs once for them (choice 5)
Notation: B trajectories, G prompt groups, N trajectories a group, U optimizer steps an iteration, T steps.
"""
import torch


def chunks(n, size):
    """Slices cutting n rows into pieces of `size` (0: one piece)."""
    size = size or n
    return [slice(i, min(i + size, n)) for i in range(0, n, size)]


def noise_seed(seed, it, group):
    """The seed of one prompt group's noises in iteration `it` (choice 7); group -1 seeds the prompt draw."""
    return (seed * 1_000_003 + it) * 1_000_003 + group + 1


def draw_prompts(n, G, seed, it):
    """Indices of the G training prompts (of n) of iteration `it`: the same on every rank."""
    gen = torch.Generator().manual_seed(noise_seed(seed, it, -1))
    return torch.randperm(n, generator=gen)[:G].tolist()


def group_noise(cfg, latent_shape, it, g):
    """x_T (N, ...) and step noises (N, T, ...) of group g: one x_T for the group unless --shared-noise false
    (METHOD.md §3, choice 6)."""
    N = cfg.group_size
    gen = torch.Generator().manual_seed(noise_seed(cfg.seed, it, g))
    x1 = torch.randn(1 if cfg.shared_noise else N, *latent_shape, generator=gen).expand(N, *latent_shape)
    return x1, torch.randn(N, cfg.num_steps, *latent_shape, generator=gen)


def update_order(G, N, U):
    """Trajectory order (B,) into the group-major layout (g N + j): update u's trajectories come u-th (choice 11).

    Update u takes members u N/U .. (u+1) N/U - 1 of every group, ordered member by member across the groups, so
    every optimizer step sees every prompt, and every micro-batch of G or more trajectories mixes prompts."""
    n = N // U
    return torch.tensor([g * N + u * n + j for u in range(U) for j in range(n) for g in range(G)])


def micro_batches(B, U, size):
    """Per update, the slices of its trajectories forming its micro-batches of at most `size`."""
    n = B // U
    return [[slice(u * n + c.start, u * n + c.stop) for c in chunks(n, size)] for u in range(U)]


def first_copies(states, groups):
    """(B, K): for each state, the trajectory whose same-step state it repeats bit for bit, itself if none.

    Only states of one group (one prompt) are compared with its first trajectory's: the same prompt, time and input
    give the same x0_est (choice 5). A group sharing x_T has one x_T, and under the DDIM SDE, whose first step is
    deterministic, one x^(1) too."""
    B = len(states)
    first = torch.stack([(groups == g).nonzero()[0, 0] for g in groups])  # (B,) each group's first trajectory
    same = (states == states[first]).flatten(2).all(2).cpu() & (torch.arange(B) != first)[:, None]
    return torch.where(same, first[:, None], torch.arange(B)[:, None])


def distinct(source):
    """(b, k), each (R,): the trajectory and step of every state that is its own source (the distinct ones, and every
    state when source is the identity), trajectory-major."""
    return (source == torch.arange(len(source))[:, None]).nonzero(as_tuple=True)
