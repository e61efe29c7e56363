"""Stepwise-Flow-GRPO (arXiv:2603.28718) and its baseline Flow-GRPO (arXiv:2505.05470): the training loop.

    python train.py                                        # toy world, Stepwise-Flow-GRPO, a few minutes on a CPU
    python train.py --advantage flow_grpo --sampler flow_grpo                       # the Flow-GRPO baseline
    python train.py --model stabilityai/stable-diffusion-3.5-medium --reward pickscore   # the paper's setup, 1 GPU

One iteration, in the paper's order (METHOD.md): sample G prompts x N trajectories, each group sharing x_T (§3)
-> rewards r_k of every state's Tweedie estimate (§3) -> gains and advantages (§4) -> clipped GRPO update with the
KL to the base model (§5) -> log -> checkpoint. A world (toy.ToyWorld, sd3.SD3World) hides the model: encode
prompts, velocity with guidance, decode; this loop adds the LoRA (peft) and never touches the model otherwise.

Choices beyond METHOD.md (also in the README):
1. One optimizer step per micro-batch of trajectories, accumulating over its trained steps (Flow-GRPO accumulates
   over timesteps too); training re-scores each micro-batch exactly as it was sampled, so the first ratio is 1.
2. The Flow-GRPO advantage computes no intermediate rewards: its wall-clock is honest.
3. Advantages of both methods are clipped to [-5, 5] (Flow-GRPO's adv_clip_max).
4. Steps of tiny std (into s = 0.009 at T = 10) are left out of the loss like the std-0 ones (--std-floor): their
   log-prob gradient ~ 1/std is ~100x a middle step's and would set the update's direction alone (snr.py).
"""
import argparse, dataclasses, json, math, os, signal, time
from dataclasses import dataclass
from functools import partial

import torch
from peft import LoraConfig, get_peft_model_state_dict, set_peft_model_state_dict
from tqdm import tqdm

import plots, rewards, sde, stepgrpo
from worlds import base_model, build_world, chunks, evaluate, rows, sample_groups, score, trajectory_pair, x0_estimates


@dataclass
class Config:
    model: str = "toy"  # "toy" or a diffusers SD3 pipeline: hub id or local folder
    reward: str = ""  # reward name in rewards.REWARDS ("" = the world's: toy_geneval / pickscore)
    prompts: str = ""  # training prompts FILE, one a line ("" = the world's built-in train split)
    advantage: str = "stepwise"  # stepwise (gains g_k, §4) | flow_grpo (final reward on every step)
    per_step_norm: bool = False  # normalise gains per step instead of jointly (the paper's slower ablation)
    sampler: str = "ddim"  # ddim (the paper's DDIM-inspired SDE) | flow_grpo (Flow-GRPO's SDE), §2
    eta: float = 0.9  # η, DDIM-SDE noise scale, 0 <= eta < 1 (0 = ODE); 0.9 chosen by measurement (README)
    noise_level: float = 0.7  # a, Flow-GRPO SDE noise level (Flow-GRPO: 0.7)
    std_floor: float = 0.1  # train only steps whose std >= std_floor x the largest step std (0: every random step)
    shared_noise: bool = True  # a group shares its initial noise x_T (§3); False: Flow-GRPO's independent noises
    num_steps: int = 10  # T, sampling steps in training
    shift: float = 3.0  # schedule shift (SD3.5: 3)
    tweedie_substeps: int = 5  # T', Euler substeps of x0_est (§3; 1 = plain Tweedie)
    guidance: float = 0.0  # CFG scale g >= 1 in rollout, training and x0_est (0 = the world's: toy 1, SD3 4.5)
    group_size: int = 8  # N, trajectories per prompt (>= 2)
    prompts_per_step: int = 8  # G, prompts per iteration
    steps: int = 60  # training iterations
    lr: float = 3e-4  # AdamW learning rate
    weight_decay: float = 1e-4  # AdamW weight decay
    max_grad_norm: float = 1.0  # gradient-norm clip
    clip_range: float = 1e-4  # ε of the ratio clip (tiny: log-probs are averaged over elements)
    adv_clip: float = 5.0  # advantages clipped to [-adv_clip, adv_clip]
    beta: float = 0.01  # β, weight of the KL to the base model (0 = no reference forward)
    lora_rank: int = 32  # LoRA rank r
    lora_alpha: int = 64  # LoRA alpha
    micro_batch: int = 8  # trajectories per forward pass and per optimizer step
    tweedie_batch: int = 0  # states per x0_est forward (0 = all states of the iteration in one batch)
    eval_every: int = 10  # iterations between held-out evaluations
    eval_steps: int = 40  # ODE steps of the evaluation sampler
    eval_repeats: int = 1  # held-out samples per held-out prompt, each from its own noise
    save_every: int = 10  # iterations between checkpoints
    seed: int = 0  # seeds prompts, noises and the LoRA init
    out: str = "runs/latest"  # output folder
    resume: bool = False  # continue from out/ckpt.pt
    pretrain_steps: int = 0  # toy only: base-model pretraining steps (0 = toy's default)
    cache_dir: str = ".cache/toy"  # toy only: where the pretrained base model is cached (keyed by its config)
    resolution: int = 512  # SD3 only: image side in pixels
    gradient_checkpointing: bool = False  # SD3 only: trade compute for memory in training


def toy(cfg):
    """CPU-sized: a 0.6M-parameter model, about a second per iteration; LoRA rank 8 is plenty for it. T' = 2 (the
    paper: robust for 2..8) halves the x0_est cost; 4 held-out samples a prompt make the evaluation's error ~0.012.
    lr 3e-3 rose where 1e-2 fell back; clip range and beta stay Flow-GRPO's (README, "How the toy defaults...")."""
    return dataclasses.replace(cfg, lora_rank=8, lora_alpha=16, lr=3e-3, micro_batch=32, prompts_per_step=8,
                               group_size=8, tweedie_substeps=2, eval_steps=20, eval_repeats=4, eval_every=10, steps=80)


def sd35(cfg):
    """The paper's setting on one GPU: Flow-GRPO's defaults (group 8), bounded memory for x0_est."""
    return dataclasses.replace(cfg, reward="pickscore", micro_batch=8, tweedie_batch=16, prompts_per_step=4)


def parse_args(argv=None):
    """Flags from Config's fields (--group-size); given flags override the preset of --model."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    for f in dataclasses.fields(Config):
        kind = (lambda s: s.lower() in ("1", "true", "yes")) if f.type is bool else f.type
        p.add_argument("--" + f.name.replace("_", "-"), type=kind, default=None, help=f"default {f.default!r}")
    given = {k: v for k, v in vars(p.parse_args(argv)).items() if v is not None}
    cfg = Config(model=given.get("model", "toy"))
    return dataclasses.replace((toy if cfg.model == "toy" else sd35)(cfg), **given)


def check(cfg):
    """Every flag checked before any work: a ValueError naming the flag and its valid range."""
    rules = [("group_size", cfg.group_size >= 2, ">= 2 (a group needs two trajectories to compare)"),
             ("prompts_per_step", cfg.prompts_per_step >= 1, ">= 1"), ("steps", cfg.steps >= 1, ">= 1"),
             ("lr", cfg.lr > 0, "> 0"), ("clip_range", cfg.clip_range > 0, "> 0"), ("beta", cfg.beta >= 0, ">= 0"),
             ("advantage", cfg.advantage in ("stepwise", "flow_grpo"), "stepwise or flow_grpo"),
             ("sampler", cfg.sampler in sde.SAMPLERS, " or ".join(sde.SAMPLERS)),
             ("eta", cfg.eta >= 0, ">= 0 (0 = the ODE)"),
             ("noise_level", cfg.noise_level >= 0, ">= 0"), ("std_floor", 0 <= cfg.std_floor <= 1, "in [0, 1]"),
             ("num_steps", cfg.num_steps >= 2, ">= 2"),
             ("tweedie_substeps", cfg.tweedie_substeps >= 1, ">= 1"), ("shift", cfg.shift > 0, "> 0"),
             ("guidance", cfg.guidance == 0 or cfg.guidance >= 1, ">= 1, or 0 for the world's default"),
             ("micro_batch", cfg.micro_batch >= 1, ">= 1"), ("tweedie_batch", cfg.tweedie_batch >= 0, ">= 0"),
             ("lora_rank", cfg.lora_rank >= 1, ">= 1"), ("eval_every", cfg.eval_every >= 1, ">= 1"),
             ("eval_steps", cfg.eval_steps >= 1, ">= 1"),
             ("eval_repeats", cfg.eval_repeats >= 1, ">= 1"), ("save_every", cfg.save_every >= 1, ">= 1"),
             ("reward", cfg.reward in rewards.REWARDS or cfg.reward == "", "one of " + ", ".join(rewards.REWARDS)),
             ("prompts", cfg.prompts == "" or os.path.isfile(cfg.prompts), "an existing file, one prompt a line"),
             ("resume", not cfg.resume or os.path.isfile(os.path.join(cfg.out, "ckpt.pt")), "a run in --out")]
    for name, ok, valid in rules:
        if not ok:
            raise ValueError(f"--{name.replace('_', '-')}={getattr(cfg, name)!r} is invalid: must be {valid}")
    if cfg.sampler == "ddim":
        levels = sde.sigmas(cfg.num_steps, cfg.shift)
        try:
            sde.ddim_sigma(levels[:-1], levels[1:], cfg.eta)
        except ValueError as e:
            raise ValueError(f"--eta: {e}") from None


def save(path_out, transformer, opt, gen, it, history):
    """Atomic checkpoint: write to a temporary file, then rename over the old one (an interrupt leaves one whole)."""
    from sd3 import save_lora
    state = dict(lora=get_peft_model_state_dict(transformer), opt=opt.state_dict(), gen=gen.get_state(), it=it,
                 history=history)
    torch.save(state, os.path.join(path_out, "ckpt.pt.tmp"))
    os.replace(os.path.join(path_out, "ckpt.pt.tmp"), os.path.join(path_out, "ckpt.pt"))
    save_lora(transformer, os.path.join(path_out, "lora.tmp"))  # diffusers format: pipe.load_lora_weights(out/lora)
    os.makedirs(os.path.join(path_out, "lora"), exist_ok=True)
    for f in os.listdir(os.path.join(path_out, "lora.tmp")):
        os.replace(os.path.join(path_out, "lora.tmp", f), os.path.join(path_out, "lora", f))
    os.rmdir(os.path.join(path_out, "lora.tmp"))


def policy(cfg):
    """The schedule (T+1 levels), the sampler's step with its noise bound, and the steps it trains (METHOD §2)."""
    levels = sde.sigmas(cfg.num_steps, cfg.shift)
    noise = cfg.eta if cfg.sampler == "ddim" else cfg.noise_level
    step_fn = partial(sde.SAMPLERS[cfg.sampler], **{"eta" if cfg.sampler == "ddim" else "noise_level": noise})
    # Steps with std 0 (the DDIM-SDE's first and last) are deterministic: no log-prob, left out of the loss; steps
    # of tiny std too (choice 4 of the docstring).
    stds = step_fn(torch.zeros(cfg.num_steps, 1), torch.zeros(cfg.num_steps, 1), levels[:-1], levels[1:])[3]
    return levels, step_fn, [k for k in range(cfg.num_steps) if stds[k] > 0 and stds[k] >= cfg.std_floor * stds.max()]


def add_lora(transformer, cfg):
    """peft's LoRA on the attention projections (Flow-GRPO's targets); returns its parameters, the trained ones."""
    transformer.add_adapter(LoraConfig(r=cfg.lora_rank, lora_alpha=cfg.lora_alpha, init_lora_weights="gaussian",
                                       target_modules=["to_k", "to_q", "to_v", "to_out.0"]))
    params = [p for p in transformer.parameters() if p.requires_grad]
    for p in params:
        p.data = p.data.float()  # LoRA weights in float32 even on a bf16 model: Adam's small updates survive
    return params


def backward(world, out, cond, adv, c, levels, step_fn, trained, guidance, cfg):
    """Gradient of the GRPO loss (§5) of micro-batch c (a slice of trajectories), accumulated in .grad step by step:
    PPO-clip over the trained transitions plus beta x the KL to the LoRA-free base. Returns policy stats, losses."""
    velocity = partial(world.velocity, cond=rows(cond, c), guidance=guidance)
    stats, losses = [], []
    for k in trained:
        x_t = out["states"][c, k]
        t = levels[k].expand(len(x_t)).to(x_t.device)
        _, log_prob, mean, std = step_fn(x_t, velocity(x_t, t), levels[k], levels[k + 1],
                                         prev_sample=out["states"][c, k + 1])
        # objective = mean over (i, k) of min(A rho, A clip(rho)) - beta KL; averaged over the micro-batch's
        # trajectories here and over its trained steps by the 1/len(trained) below; loss = -objective
        loss = stepgrpo.grpo_loss(log_prob, out["log_probs"][c, k], adv[c, k], cfg.clip_range)
        if cfg.beta > 0:
            with torch.no_grad(), base_model(world.transformer):  # prev_sample given: no noise drawn
                ref_mean = step_fn(x_t, velocity(x_t, t), levels[k], levels[k + 1], prev_sample=x_t)[2]
            loss = loss + cfg.beta * stepgrpo.kl_penalty(mean, ref_mean, std).mean()
        (loss / len(trained)).backward()
        losses.append(loss.item())
        stats.append(stepgrpo.policy_stats(log_prob, out["log_probs"][c, k], cfg.clip_range))
    return stats, losses


def update(world, opt, out, cond, adv, levels, step_fn, trained, guidance, cfg):
    """The GRPO update: one optimizer step per micro-batch of trajectories. Returns per-transition policy stats,
    losses, and per micro-batch whether it stepped."""
    world.transformer.train()
    params = [p for group in opt.param_groups for p in group["params"]]
    stats, losses, finite = [], [], []
    for c in chunks(len(adv), cfg.micro_batch):
        s, l = backward(world, out, cond, adv, c, levels, step_fn, trained, guidance, cfg)
        stats, losses = stats + s, losses + l
        finite.append(all(map(math.isfinite, l)))
        if finite[-1]:  # a non-finite loss skips the step; main stops the run after 3 in a row
            torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
            opt.step()
        opt.zero_grad(set_to_none=True)
    return stats, losses, finite


def main(cfg):
    check(cfg)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(cfg.seed)  # the LoRA's gaussian init
    world = build_world(cfg, device)
    reward_fn = rewards.build(cfg.reward or ("toy_geneval" if cfg.model == "toy" else "pickscore"), device)
    guidance = cfg.guidance or world.default_guidance
    levels, step_fn, trained = policy(cfg)
    G, N = cfg.prompts_per_step, cfg.group_size
    B = G * N
    params = add_lora(world.transformer, cfg)
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    gen, history, start = torch.Generator().manual_seed(cfg.seed), [], 0
    os.makedirs(cfg.out, exist_ok=True)
    if cfg.resume:
        state = torch.load(os.path.join(cfg.out, "ckpt.pt"), weights_only=False)
        set_peft_model_state_dict(world.transformer, state["lora"])
        opt.load_state_dict(state["opt"]), gen.set_state(state["gen"])
        start, history = state["it"], state["history"]
    with open(os.path.join(cfg.out, "config.json"), "w") as f:
        json.dump(dataclasses.asdict(cfg), f, indent=1)
    print(json.dumps(dataclasses.asdict(cfg)))
    n_opt = math.ceil(B / cfg.micro_batch)
    print(f"device {device} | guidance {guidance} | {B} trajectories/iter ({G} prompts x {N}) | steps trained "
          f"{trained} -> {B * len(trained)} transitions/iter | {n_opt} optimizer steps/iter, {n_opt * cfg.steps} total")
    stop = []  # Ctrl-C sets it: the iteration finishes, a checkpoint is written, then the run ends
    previous_handler = signal.signal(signal.SIGINT, lambda *a: stop.append(1) if not stop else previous_handler(*a))
    bad, log = 0, open(os.path.join(cfg.out, "metrics.jsonl"), "w")
    log.writelines(json.dumps(h) + "\n" for h in history)  # a resumed run rewrites the log up to its checkpoint
    bar = tqdm(range(start, cfg.steps), initial=start, total=cfg.steps)
    for it in bar:
        m, tic = {"it": it}, time.perf_counter()
        if it % cfg.eval_every == 0:
            m["eval_reward"], images, eval_prompts = evaluate(world, reward_fn, cfg, guidance, device)
            if it == 0:
                plots.grid(images[:16], eval_prompts[:16], os.path.join(cfg.out, "samples_start.png"))
        m["t_eval"] = time.perf_counter() - tic
        # ---- sample G groups of N trajectories; a group shares its initial noise x_T (§3) ----
        tic = time.perf_counter()
        prompts, groups, cond, out = sample_groups(world, cfg, levels, step_fn, guidance, gen, device)
        m["t_rollout"], tic = time.perf_counter() - tic, time.perf_counter()
        # ---- rewards: final images, and for stepwise credit the Tweedie estimate of every state (§3) ----
        if cfg.advantage == "stepwise":
            x0 = x0_estimates(world, out, cond, levels, cfg.tweedie_substeps, cfg.tweedie_batch, guidance)
            r = score(world, reward_fn, x0, prompts)[0]  # (B, T+1)
            adv = stepgrpo.stepwise_advantages(r, groups, cfg.per_step_norm, cfg.adv_clip)  # (B, T)
            m["gain_abs"] = stepgrpo.gains(r).abs().mean(0).tolist()
            final = r[:, -1]
        else:
            final = score(world, reward_fn, out["states"][:, -1:], prompts)[0][:, 0]  # (B,)
            adv = stepgrpo.flow_grpo_advantages(final, groups, adv_clip=cfg.adv_clip)[:, None].expand(B, cfg.num_steps)
        m["t_reward"] = time.perf_counter() - tic
        m.update(reward=final.mean().item(), reward_std=final.std().item(),
                 zero_std_frac=sum(float(final[groups == g].std()) < 1e-6 for g in range(G)) / G)
        # ---- update: PPO-clip over the stochastic transitions, KL to the LoRA-free base model (§5) ----
        tic = time.perf_counter()
        stats, losses, finite = update(world, opt, out, cond, adv.to(device), levels, step_fn, trained, guidance, cfg)
        for ok in finite:
            bad = 0 if ok else bad + 1
            if not ok:
                tqdm.write(f"warning: non-finite loss at iteration {it}; update skipped ({bad} in a row)")
        m["t_train"] = time.perf_counter() - tic
        m.update({k: sum(s[k] for s in stats) / len(stats) for k in stats[0]}, loss=sum(losses) / len(losses),
                 ratio_first=sum(s["ratio"] for s in stats[:len(trained)]) / len(trained))  # before any update
        # ---- log and checkpoint ----
        history.append(m)
        log.write(json.dumps(m) + "\n"), log.flush()
        bar.set_postfix(reward=f"{m['reward']:.3f}", **({"eval": f"{m['eval_reward']:.3f}"} if "eval_reward" in m else {}))
        if bad >= 3 or stop or (it + 1) % cfg.save_every == 0 or it == cfg.steps - 1:
            save(cfg.out, world.transformer, opt, gen, it + 1, history)
        if bad >= 3:
            raise RuntimeError(f"{bad} non-finite losses in a row at iteration {it}: stopped, checkpoint in {cfg.out}; "
                               "lower --lr or --clip-range, or raise --beta")
        if stop:
            print(f"interrupted: checkpoint of iteration {it + 1} in {cfg.out}; continue with --resume true")
            break
    signal.signal(signal.SIGINT, previous_handler)
    if not stop:  # ---- final held-out evaluation and the figures ----
        m = {"it": cfg.steps}
        m["eval_reward"], images, eval_prompts = evaluate(world, reward_fn, cfg, guidance, device)
        history.append(m)
        log.write(json.dumps(m) + "\n")
        plots.grid(images[:16], eval_prompts[:16], os.path.join(cfg.out, "samples_end.png"))
        plots.curves(history, os.path.join(cfg.out, "reward_curve.png"))
        plots.gains(history, os.path.join(cfg.out, "fig2_gains.png"))
        images, r, prompt = trajectory_pair(world, reward_fn, cfg, guidance, levels, step_fn, device)
        plots.trajectories(images, r, levels, prompt, os.path.join(cfg.out, "fig1_trajectories.png"))
    log.close()
    evals = [h["eval_reward"] for h in history if "eval_reward" in h]
    print(f"held-out reward {evals[0]:.3f} -> {evals[-1]:.3f}; outputs in {cfg.out}/")
    return dict(history=history, eval_rewards=evals, out=cfg.out)


if __name__ == "__main__":
    main(parse_args())
