"""Side-by-side benchmark on the toy world: {Flow-GRPO, Stepwise-Flow-GRPO} x {DDIM-SDE, Flow-GRPO SDE} x seeds.

    python bench.py                        # 4 methods x 3 seeds, the toy preset, 2 runs at a time (one core each)
    python bench.py --seeds 0 1 2 3 4 --steps 60 --jobs 1

Every run gets the same prompts, seeds and hyperparameters; only --advantage and --sampler change. Writes to --out:
bench.md (the table), bench_steps.png and bench_seconds.png (held-out reward against training iteration and against
training wall-clock seconds, mean over seeds with min-max bands) and bench.json (every run's curve).
"Steps to match" is the first evaluation at which a method's seed-mean held-out reward reaches Flow-GRPO's final one
(Flow-GRPO advantage, same sampler); training seconds exclude evaluation.
"""
import argparse
import dataclasses
import json
import os
import sys
from concurrent.futures import ProcessPoolExecutor

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

import train

METHODS = [("flow_grpo", "flow_grpo"), ("flow_grpo", "ddim"), ("stepwise", "flow_grpo"), ("stepwise", "ddim")]


def run(job):
    """One training run in its own process; returns its held-out curve and training seconds per iteration."""
    cfg, threads = job
    import torch
    torch.set_num_threads(threads)
    sys.stdout = open(os.path.join(cfg.out + ".log"), "w")  # keep the parallel runs' bars out of the terminal
    history = train.main(cfg)["history"]
    seconds, clock, curve = {}, 0.0, []
    for h in history:
        if "eval_reward" in h:
            curve.append((h["it"], clock, h["eval_reward"]))
        clock += h.get("t_rollout", 0) + h.get("t_reward", 0) + h.get("t_train", 0)
        seconds[h["it"]] = h.get("t_rollout", 0) + h.get("t_reward", 0) + h.get("t_train", 0)
    per_iter = [s for it, s in seconds.items() if it > 0 and s > 0]  # iteration 0 pays one-time warm-up
    return dict(advantage=cfg.advantage, sampler=cfg.sampler, seed=cfg.seed, curve=curve,
                sec_per_iter=sum(per_iter) / len(per_iter))


def mean_curve(runs):
    """Seed-mean (iteration, seconds, reward) at each evaluation; seeds share the evaluation iterations."""
    n = len(runs)
    return [(pts[0][0], sum(p[1] for p in pts) / n, sum(p[2] for p in pts) / n) for pts in zip(*(r["curve"] for r in runs))]


def first_reaching(curve, target):
    return next(((it, sec) for it, sec, r in curve if r >= target), (None, None))


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--steps", type=int, default=None, help="training iterations (default: the toy preset's)")
    p.add_argument("--jobs", type=int, default=2, help="runs at a time, one thread each")
    p.add_argument("--out", default="runs/bench")
    p.add_argument("--set", nargs="*", default=[], help="further Config overrides, e.g. --set eta=0.5 lr=3e-3")
    args = p.parse_args()
    base = train.parse_args([f"--{kv.split('=')[0].replace('_', '-')}={kv.split('=')[1]}" for kv in args.set])
    if args.steps:
        base = dataclasses.replace(base, steps=args.steps)
    os.makedirs(args.out, exist_ok=True)
    n_eval = len(train.build_world(base, "cpu").eval_prompts)  # pretrains (or loads) once, before the runs share it
    jobs = [(dataclasses.replace(base, advantage=a, sampler=s, seed=seed, out=f"{args.out}/{a}-{s}-{seed}"), 1 if args.jobs > 1 else 2)
            for a, s in METHODS for seed in args.seeds]
    with ProcessPoolExecutor(args.jobs) as pool:
        results = list(pool.map(run, jobs))
    json.dump(results, open(f"{args.out}/bench.json", "w"))
    report(results, base, args, n_eval)


def report(results, base, args, n_eval):
    """The table (markdown) and the two figures."""
    groups = {(a, s): [r for r in results if (r["advantage"], r["sampler"]) == (a, s)] for a, s in METHODS}
    curves = {k: mean_curve(v) for k, v in groups.items()}
    cost = {k: sum(r["sec_per_iter"] for r in v) / len(v) for k, v in groups.items()}
    lines = [f"Toy world, {len(args.seeds)} seeds, {base.steps} iterations, {base.prompts_per_step} prompts x "
             f"{base.group_size}, T = {base.num_steps}, T' = {base.tweedie_substeps}, eta = {base.eta}, a = "
             f"{base.noise_level}, lr = {base.lr}; held-out reward = mean over the {n_eval} held-out "
             f"prompts x {base.eval_repeats} noises, ODE sampling, seed-mean.", "",
             "| advantage | sampler | held-out start | held-out final | s / iteration | steps to Flow-GRPO's final "
             "| training s to it |", "|---|---|---|---|---|---|---|"]
    for (a, s), curve in curves.items():
        target = curves[("flow_grpo", s)][-1][2]
        it, sec = first_reaching(curve, target)
        ref_it, ref_sec = first_reaching(curves[("flow_grpo", s)], target)
        ratio = f" ({it / ref_it:.2f}x)" if it is not None and ref_it else ""
        lines.append(f"| {a} | {s} | {curve[0][2]:.3f} | {curve[-1][2]:.3f} | {cost[(a, s)]:.2f} | "
                     f"{it if it is not None else 'not reached'}{ratio} | "
                     f"{f'{sec:.0f} (vs {ref_sec:.0f})' if sec is not None else '-'} |")
    for s in ("ddim", "flow_grpo"):
        lines.append(f"\nStepwise / Flow-GRPO cost per iteration, {s} sampler: "
                     f"{cost[('stepwise', s)] / cost[('flow_grpo', s)]:.2f}x")
    text = "\n".join(lines)
    open(f"{args.out}/bench.md", "w").write(text + "\n")
    print(text)
    for axis, name, label in ((0, "steps", "training iteration"), (1, "seconds", "training wall-clock seconds")):
        fig, ax = plt.subplots(figsize=(6, 4))
        for (a, s), runs in groups.items():
            xs = [p[axis] for p in curves[(a, s)]]
            ys = [[p[2] for p in r["curve"]] for r in runs]
            line = ax.plot(xs, [sum(c) / len(c) for c in zip(*ys)], "-" if a == "stepwise" else "--",
                           label=f"{'Stepwise' if a == 'stepwise' else 'Flow-GRPO'} + {s} SDE")[0]
            ax.fill_between(xs, [min(c) for c in zip(*ys)], [max(c) for c in zip(*ys)], alpha=0.15,
                            color=line.get_color())
        ax.set_xlabel(label)
        ax.set_ylabel("held-out reward (toy GenEval)")
        ax.legend()
        ax.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(f"{args.out}/bench_{name}.png", dpi=120)
        plt.close(fig)


if __name__ == "__main__":
    main()
