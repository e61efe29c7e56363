"""Tests of parallel.py: train.py under torchrun (2 gloo ranks on the CPU) against one process.

Each rank's writes are recorded by this very file run as torchrun's script (its __main__ at the bottom): it wraps
open() to log every file a rank opens for writing, then runs train.py.
"""
import builtins
import dataclasses
import json
import os
import runpy
import shutil
import subprocess
import sys

import pytest
import torch

import config
import files
import parallel
import toy
import train
from conftest import lora_state, relative_error, tiny_config


def as_flags(cfg):
    return [f"--{k.replace('_', '-')}={v}" for k, v in dataclasses.asdict(cfg).items()]


def torchrun(cfg, tmp_path, name):
    """train.py under `torchrun --standalone --nproc_per_node 2` (gloo on the CPU), each rank's writes recorded by
    this file's own __main__ (below)."""
    root = os.path.dirname(os.path.abspath(__file__))
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=root, WRITES_LOG=str(tmp_path / f"writes_{name}"))
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           os.path.abspath(__file__)] + as_flags(cfg), env=env, cwd=root, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return [open(tmp_path / f"writes_{name}.{r}").read().split() for r in (0, 1)]


@pytest.fixture(scope="module")
def two_rank_runs(tmp_path_factory):
    """A tiny toy config run by one process, by two ranks (2 iterations), by two ranks straight to 3 iterations,
    and by two ranks resumed from the 2-iteration run to 3."""
    tmp = tmp_path_factory.mktemp("ranks")
    base = tiny_config(tmp, steps=2, eval_every=1, prompts_per_step=4, group_size=2, micro_batch=2,
                       cache_dir=str(tmp / "toy_cache"))
    toy.ToyWorld("cpu", base.cache_dir, pretrain_steps=base.pretrain_steps)  # one cache for every process
    runs = {"one": dataclasses.replace(base, out=str(tmp / "one"))}
    train.main(runs["one"])
    runs["two"] = dataclasses.replace(base, out=str(tmp / "two"))
    writes = torchrun(runs["two"], tmp, "two")
    runs["straight"] = dataclasses.replace(base, steps=3, out=str(tmp / "straight"))
    torchrun(runs["straight"], tmp, "straight")
    shutil.copytree(runs["two"].out, tmp / "resumed")
    runs["resumed"] = dataclasses.replace(base, steps=3, out=str(tmp / "resumed"), resume=True)
    torchrun(runs["resumed"], tmp, "resumed")
    return runs, writes


def test_two_ranks_train_the_lora_a_single_process_trains(two_rank_runs):
    """Same prompt groups, same noises, the gradient of the whole iteration's batch: after 2 iterations, 2 gloo
    ranks hold the LoRA of one process up to float rounding, and log the same held-out rewards."""
    runs, _ = two_rank_runs
    one, two = lora_state(runs["one"].out), lora_state(runs["two"].out)
    assert one.keys() == two.keys()
    worst = max(relative_error(two[k], one[k]) for k in one if one[k].abs().sum() > 0)
    assert worst < 1e-5, f"LoRA of 2 ranks differs from 1 process by {worst}: sharding, noise or all-reduce is off"
    assert all(torch.equal(one[k], two[k]) for k in one if one[k].abs().sum() == 0), "a dead end moved on 2 ranks"
    evals = lambda cfg: [json.loads(l).get("eval_reward") for l in open(os.path.join(cfg.out, "metrics.jsonl"))]
    assert all(abs(a - b) < 1e-4 for a, b in zip(evals(runs["one"]), evals(runs["two"]))), "held-out eval differs"


def test_only_rank_zero_writes_the_runs_outputs(two_rank_runs):
    """Checkpoints, metrics, config and figures come from rank 0 alone."""
    runs, (rank0, rank1) = two_rank_runs
    out = runs["two"].out
    assert any(p.startswith(out) for p in rank0), "rank 0 wrote nothing into --out"
    assert not [p for p in rank1 if p.startswith(out)], f"rank 1 wrote into --out: {rank1}"


def test_two_ranks_resume_bit_identical_and_refuse_another_rank_count(two_rank_runs):
    """2 iterations + --resume to 3 on 2 ranks gives exactly the LoRA and rewards of 3 straight; one process may
    not resume a 2-rank run."""
    runs, _ = two_rank_runs
    a, b = lora_state(runs["straight"].out), lora_state(runs["resumed"].out)
    assert all(torch.equal(a[k], b[k]) for k in a), "a 2-rank resume does not continue the run exactly"
    reward = lambda cfg: [json.loads(l).get("reward") for l in open(os.path.join(cfg.out, "metrics.jsonl"))]
    assert reward(runs["straight"]) == reward(runs["resumed"])
    with pytest.raises(files.UserError, match="2 rank"):
        train.main(dataclasses.replace(runs["resumed"], steps=4))


def test_a_prompt_count_that_does_not_divide_over_the_ranks_is_refused(monkeypatch, tmp_path):
    """--prompts-per-step is global: 3 prompts over 2 ranks is an error naming both numbers."""
    monkeypatch.setattr(parallel, "setup", lambda: (0, 2, torch.device("cpu")))
    with pytest.raises(config.UsageError, match="--prompts-per-step=3 does not divide over the 2 ranks"):
        train.main(tiny_config(tmp_path, prompts_per_step=3))


def record_writes_then_train():
    """train.py with its command line, every file this rank opens for writing logged to $WRITES_LOG.$RANK."""
    log = open(os.environ["WRITES_LOG"] + "." + os.environ["RANK"], "w")
    real_open = builtins.open

    def spying_open(file, mode="r", *args, **kwargs):
        if any(c in mode for c in "wax+"):
            log.write(f"{file}\n")
            log.flush()
        return real_open(file, mode, *args, **kwargs)

    builtins.open = spying_open
    sys.argv = ["train.py"] + sys.argv[1:]
    runpy.run_path("train.py", run_name="__main__")


if __name__ == "__main__":  # torchrun runs this file as each rank's script (torchrun above)
    record_writes_then_train()
