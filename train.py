"""Stepwise-Flow-GRPO (arXiv:2603.28718) and its baseline Flow-GRPO (arXiv:2505.05470): the training loop.

    python train.py                                        # toy world, Stepwise-Flow-GRPO, minutes on a CPU
    python train.py --advantage flow_grpo --sampler flow_grpo                       # the Flow-GRPO baseline
    python train.py --model stabilityai/stable-diffusion-3.5-medium --reward pickscore   # the paper's setup, 1 GPU
    torchrun --nproc_per_node 8 train.py --model stabilityai/stable-diffusion-3.5-medium --prompts-per-step 32

One iteration, in the paper's order (METHOD.md): sample G prompts x N trajectories, each group sharing x_T (§3)
-> rewards r_k of every state's Tweedie estimate (§3) -> gains and advantages (§4) -> clipped GRPO update with the
KL to the base model (§5), in U optimizer steps -> log -> checkpoint. config.py holds the flags, learner.py the
policy, its LoRA (peft) and the update; a world (worlds.py: toy.ToyWorld, sd3.SD3World) hides the model.

Choices beyond METHOD.md (also in the README):
1. Gradients accumulate over the trained steps and the micro-batches of an update: U = --updates-per-iteration
   optimizer steps an iteration (Flow-GRPO: 2), each over 1/U of every group (worlds.py, choice 2).
2. The Flow-GRPO advantage computes no intermediate rewards: its wall-clock is honest.
3. Advantages of both methods are clipped to [-5, 5] (Flow-GRPO's adv_clip_max).
4. Steps of tiny std (into s = 0.009 at T = 10) are left out of the loss like the std-0 ones (--std-floor): their
   log-prob gradient ~ 1/std is ~100x a middle step's and would set the update's direction alone (snr.py).
5. The LoRA sits on Flow-GRPO's targets: q, k, v and out of the image stream's attention and of the text stream's
   (add_*_proj, to_add_out); not on SD3.5's second attention, attn2, which Flow-GRPO leaves alone.
6. CFG's unconditional branch is detached in training, as in Flow-GRPO (--uncond-grad true: through both).
7. --ema-decay: Flow-GRPO's EMA of the LoRA, used to evaluate and to save; training goes on with the live weights.
8. --advantage flow_grpo runs the baseline as Flow-GRPO runs it: the batch's reward std, a noise per trajectory
   (config.flow_grpo_method). The KL is Flow-GRPO's |dt|-weighted one (stepgrpo.kl_penalty), logged as `kl`.
9. Under torchrun each rank samples whole prompt groups and the LoRA's gradients are all-reduced (parallel.py).
"""
import json
import os
import signal
import sys
import time
from dataclasses import asdict

import torch
from peft import get_peft_model_state_dict, set_peft_model_state_dict
from tqdm import tqdm

import parallel
import plots
import rewards
import stepgrpo
from config import UsageError, check, parse_args
from files import UserError, load_checkpoint, output_folder, save_checkpoint
from learner import EMA, add_lora, policy, update
from worlds import build_world, evaluate, is_source, sample_groups, score, trajectory_pair, x0_estimates

def checkpoint(cfg, transformer, opt, ema, it, history, ranks):
    """ckpt.pt holds the live LoRA (to resume); out/lora, the one to use, is the EMA's (choice 7)."""
    lora = {k: v.detach().clone() for k, v in get_peft_model_state_dict(transformer).items()}
    state = dict(lora=lora, opt=opt.state_dict(), ema=ema.state_dict(), it=it, history=history, world_size=ranks)
    with ema.swapped():
        save_checkpoint(cfg.out, state, transformer)


def resume(cfg, transformer, opt, ema, ranks):
    """The iteration and history of out/ckpt.pt, with its LoRA, optimizer and EMA restored (on every rank)."""
    state = load_checkpoint(cfg.out)
    if state["world_size"] != ranks:
        raise UserError(f"--resume: {cfg.out}/ckpt.pt was written by a run on {state['world_size']} rank(s), this one "
                        f"has {ranks}: resume with the same number of processes")
    try:
        set_peft_model_state_dict(transformer, state["lora"])
        opt.load_state_dict(state["opt"])
        ema.load_state_dict(state["ema"])
    except (RuntimeError, ValueError, KeyError) as e:
        raise UserError(f"--resume: {cfg.out}/ckpt.pt was written by a run of other flags ({type(e).__name__}); "
                        "resume with that run's flags (its config.json), or choose another --out") from e
    return state["it"], state["history"]


def clock(device):
    """perf_counter once the device's queued work is done: a GPU phase is timed, not just launched."""
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter()


def iteration(world, reward_fn, opt, ema, pi, cfg, it, guidance, device):
    """One training iteration in the paper's order, timed phase by phase. Returns its metrics and, per optimizer
    step, whether it was taken (a non-finite loss skips it)."""
    m = {}
    B = cfg.prompts_per_step * cfg.group_size
    # ---- sample G groups of N trajectories, this rank's share of them; a group shares its x_T (§3) ----
    tic = clock(device)
    mine = range(cfg.prompts_per_step)[parallel.shard(cfg.prompts_per_step)]
    prompts, groups, cond, out, plan = sample_groups(world, cfg, pi, guidance, it, device, group_ids=mine)
    m["t_rollout"] = clock(device) - tic
    tic = clock(device)
    # ---- rewards: final images, and for stepwise credit the Tweedie estimate of every state (§3) ----
    # every rank computes the whole batch's advantages from the gathered rewards and keeps its rows (parallel.py)
    all_groups = parallel.gather(groups)  # (B,)
    if cfg.advantage == "stepwise":
        x0, source = x0_estimates(world, out, cond, groups, pi.levels, cfg.tweedie_substeps, cfg.tweedie_batch,
                                  guidance)
        m["x0_states"] = int(is_source(source[:, :-1]).sum())  # the distinct states estimated
        m["t_x0"] = clock(device) - tic
        tic = clock(device)
        r = parallel.gather(score(world, reward_fn, x0, prompts, source)[0])  # (B, T+1)
        adv = stepgrpo.stepwise_advantages(r, all_groups, cfg.per_step_norm, cfg.adv_clip, cfg.global_std)  # (B, T)
        m["gain_abs"] = stepgrpo.gains(r).abs().mean(0).tolist()
        final = r[:, -1]
    else:
        final = parallel.gather(score(world, reward_fn, out["states"][:, -1:], prompts)[0][:, 0])  # (B,)
        adv = stepgrpo.flow_grpo_advantages(final, all_groups, cfg.global_std, cfg.adv_clip)
        adv = adv[:, None].expand(B, cfg.num_steps)  # (B, T): the same credit for every step
    adv = adv[parallel.shard(B)]  # this rank's rows
    m["t_reward"] = clock(device) - tic
    m["reward"] = final.mean().item()
    m["reward_std"] = final.std().item()
    ties = [float(final[all_groups == g].std()) < 1e-6 for g in all_groups.unique()]
    m["zero_std_frac"] = sum(ties) / len(ties)
    # ---- update: PPO-clip over the stochastic transitions, KL to the LoRA-free base model (§5) ----
    tic = clock(device)
    batch = dict(states=out["states"], log_probs=out["log_probs"], cond=cond, adv=adv.to(device))
    stats, finite = update(world, opt, ema, pi, batch, plan, guidance, cfg)
    m["t_train"] = clock(device) - tic
    m.update({k: sum(s[k] for s in stats) / len(stats) for k in stats[0]})
    m["ratio_first"] = sum(s["ratio"] for s in stats[:len(pi.trained)]) / len(pi.trained)  # before any update
    return parallel.mean_metrics(m), finite


def main(cfg):
    check(cfg)
    rank, ranks, device = parallel.setup()
    if cfg.prompts_per_step % ranks:
        raise UsageError(f"--prompts-per-step={cfg.prompts_per_step} does not divide over the {ranks} ranks: each "
                         f"rank samples whole prompt groups; give a multiple of {ranks}")
    torch.manual_seed(cfg.seed)  # the LoRA's gaussian init, the same on every rank
    world = build_world(cfg, device)
    if cfg.prompts_per_step > len(world.train_prompts):
        raise UsageError(f"--prompts-per-step={cfg.prompts_per_step} is invalid: the training prompts number only "
                         f"{len(world.train_prompts)}")
    reward_fn = rewards.build(cfg.reward or ("toy_geneval" if cfg.model == "toy" else "pickscore"), device)
    guidance = cfg.guidance or world.default_guidance
    pi = policy(cfg)
    G, N, U = cfg.prompts_per_step, cfg.group_size, cfg.updates_per_iteration
    B = G * N
    params = add_lora(world.transformer, cfg)
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    ema = EMA(params, cfg.ema_decay, cfg.ema_every)
    lead = rank == 0  # the one rank that writes and prints (parallel.py)
    if lead:
        output_folder(cfg.out)
    start, history = resume(cfg, world.transformer, opt, ema, ranks) if cfg.resume else (0, [])
    if lead:
        with open(os.path.join(cfg.out, "config.json"), "w") as f:
            json.dump(asdict(cfg), f, indent=1)
        print(json.dumps(asdict(cfg)))
        print(f"device {device} x {ranks} rank(s) | guidance {guidance} | {B} trajectories/iter ({G} prompts x {N}, "
              f"{B // ranks} a rank) | steps trained {pi.trained} -> {B * len(pi.trained)} transitions/iter | {U} "
              f"optimizer steps/iter, each over {B // U} trajectories in micro-batches of <= {cfg.micro_batch}; "
              f"{U * cfg.steps} in all")
    stop = []  # Ctrl-C sets it: the iteration finishes, a checkpoint is written, then the run ends
    previous_handler = signal.signal(signal.SIGINT, lambda *a: stop.append(1) if not stop else previous_handler(*a))
    bad = 0
    stopping = False
    log = open(os.path.join(cfg.out, "metrics.jsonl"), "w") if lead else None
    if lead:
        log.writelines(json.dumps(h) + "\n" for h in history)  # a resumed run rewrites the log up to its checkpoint
    bar = tqdm(range(start, cfg.steps), initial=start, total=cfg.steps, disable=not lead)
    for it in bar:
        m = {"it": it}
        tic = clock(device)
        if it % cfg.eval_every == 0:
            with ema.swapped():
                held, images, eval_prompts = evaluate(world, reward_fn, cfg, guidance, device)
            m.update(held)
            if it == 0 and lead:
                plots.grid(images[:16], eval_prompts[:16], os.path.join(cfg.out, "samples_start.png"))
        m["t_eval"] = clock(device) - tic
        step, finite = iteration(world, reward_fn, opt, ema, pi, cfg, it, guidance, device)
        m.update(step)
        for ok in finite:
            bad = 0 if ok else bad + 1
            if not ok and lead:
                tqdm.write(f"warning: non-finite loss at iteration {it}; update skipped ({bad} in a row)")
        stopping = not parallel.all_true(not stop)  # every rank stops at the same iteration
        # ---- log and checkpoint ----
        history.append(m)
        if lead:
            log.write(json.dumps(m) + "\n")
            log.flush()
            shown = {"eval": f"{m['eval_reward']:.3f}"} if "eval_reward" in m else {}
            bar.set_postfix(reward=f"{m['reward']:.3f}", kl=f"{m['kl']:.2g}", **shown)
        if lead and (bad >= 3 or stopping or (it + 1) % cfg.save_every == 0 or it == cfg.steps - 1):
            checkpoint(cfg, world.transformer, opt, ema, it + 1, history, ranks)
        if bad >= 3:
            raise RuntimeError(f"{bad} non-finite losses in a row at iteration {it}: stopped, checkpoint in "
                               f"{cfg.out}; lower --lr or --clip-range, or raise --beta")
        if stopping:
            if lead:
                print(f"interrupted: checkpoint of iteration {it + 1} in {cfg.out}; continue with --resume true")
            break
    signal.signal(signal.SIGINT, previous_handler)
    if not stopping:  # ---- final held-out evaluation and the figures ----
        m = {"it": cfg.steps}
        with ema.swapped():
            held, images, eval_prompts = evaluate(world, reward_fn, cfg, guidance, device)
            if lead:
                images_fig1, r, prompt = trajectory_pair(world, reward_fn, cfg, guidance, pi, device)
        m.update(held)
        history.append(m)
        if lead:
            log.write(json.dumps(m) + "\n")
            plots.grid(images[:16], eval_prompts[:16], os.path.join(cfg.out, "samples_end.png"))
            plots.curves(history, os.path.join(cfg.out, "reward_curve.png"))
            plots.gains(history, os.path.join(cfg.out, "fig2_gains.png"))
            plots.trajectories(images_fig1, r, pi.levels, prompt, os.path.join(cfg.out, "fig1_trajectories.png"))
    evals = [h for h in history if "eval_reward" in h]
    if lead:
        log.close()
        summary = f"held-out adherence {evals[0]['eval_reward']:.3f} -> {evals[-1]['eval_reward']:.3f}"
        if "eval_quality" in evals[0]:
            summary += f", render quality {evals[0]['eval_quality']:.3f} -> {evals[-1]['eval_quality']:.3f}"
        print(f"{summary}; outputs in {cfg.out}/")
    return dict(history=history, eval_rewards=[h["eval_reward"] for h in evals], out=cfg.out)


if __name__ == "__main__":
    try:
        main(parse_args())
    except UserError as e:  # a user's mistake: one line, as argparse reports a bad flag; bugs keep their traceback
        if parallel.rank() == 0:  # every rank meets the same mistake: say it once
            print(f"train.py: error: {e}", file=sys.stderr)
        sys.exit(2)
    finally:
        parallel.finish()
