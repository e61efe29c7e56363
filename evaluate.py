"""What a run measures beside training: the held-out reward, and the data of the paper's Figure 1.

    held_out   the mean reward of ODE samples of the held-out prompts, from the same noises at every evaluation
    figure1    two trajectories of one held-out prompt from one x_T: every state's x0_est and its reward r_k (§3)
Under torchrun the held-out prompts are sharded over ranks and their rewards gathered (parallel.py).
"""
import torch

import batching
import parallel
import sde
import stepgrpo


@torch.no_grad()
def held_out(world, reward_fn, cfg):
    """Held-out reward of ODE sampling (the DDIM step at eta 0, --eval-steps), eval_repeats samples a prompt, each
    from its own fixed noise. Returns the metrics, and this rank's images and their prompts."""
    world.transformer.eval()
    gen = torch.Generator().manual_seed(cfg.seed + 1)
    prompts = world.eval_prompts * cfg.eval_repeats
    x1 = torch.randn(len(prompts), *world.latent_shape, generator=gen)  # for the whole list, whatever the ranks
    mine = parallel.shard(len(prompts))
    prompts = prompts[mine]
    ode = sde.policy("ddim", sde.sigmas(cfg.eval_steps, cfg.shift), 0.0, cfg.guidance)
    micro_batches = batching.chunks(len(prompts), max(cfg.micro_batch, 16))
    out = stepgrpo.sample(world, ode, world.encode(prompts), x1[mine].to(world.device), None, micro_batches)
    r, images = stepgrpo.rewards(world, reward_fn, out["states"][:, -1:], prompts)
    m = {"eval_reward": parallel.gather_uneven(r).mean().item()}
    if hasattr(world, "render_quality"):  # the toy's: is each image a clean render of some prompt?
        m["eval_quality"] = parallel.gather_uneven(world.render_quality(images).cpu()).mean().item()
    return m, images.cpu(), prompts


@torch.no_grad()
def figure1(world, reward_fn, policy, cfg):
    """Two trajectories of the first held-out prompt from one x_T: images (2, T+1, 3, H, W) of every state's x0_est,
    their rewards (2, T+1) and the prompt."""
    prompt = world.eval_prompts[0]
    gen = torch.Generator().manual_seed(cfg.seed + 2)
    x1 = torch.randn(1, *world.latent_shape, generator=gen).expand(2, *world.latent_shape).to(world.device)
    noise = torch.randn(2, cfg.num_steps, *world.latent_shape, generator=gen)
    cond = world.encode([prompt] * 2)
    out = stepgrpo.sample(world, policy, cond, x1, noise, [slice(0, 2)])
    # two groups of one: no state is shared, so every state has its own estimate to show
    pair = stepgrpo.Batch([prompt] * 2, torch.tensor([0, 1]), cond, out["states"], out["log_probs"],
                          out["velocities"], plan=[[slice(0, 2)]])
    x0, _ = stepgrpo.x0_estimates(world, pair, policy, cfg.tweedie_substeps, cfg.tweedie_batch)
    r, images = stepgrpo.rewards(world, reward_fn, x0, pair.prompts)
    return images.view(2, -1, *images.shape[1:]).cpu(), r, prompt
