"""Tests of the loop and its machinery: train.py end to end on the toy world, config.py's flags and checks, the
user's mistakes as one-line errors, lora.py's EMA, batching.py's update plan, and the extension points (a credit,
a world). Every run here is a tiny one (conftest.tiny_config): seconds on 2 CPU cores.
"""
import dataclasses
import importlib.util
import json
import math
import os
import signal
import subprocess
import sys

import pytest
import torch
from diffusers import SD3Transformer2DModel

import batching
import config
import files
import lora
import rewards
import runs
import stepgrpo
import toy
import train
from conftest import dead_ends, lora_state, tiny_config
from world import World


@pytest.mark.parametrize("advantage,sampler", [("stepwise", "ddim"), ("flow_grpo", "flow_grpo")])
def test_a_tiny_training_run_writes_its_outputs_and_changes_only_the_lora(tmp_path, advantage, sampler):
    """Both methods run end to end: finite losses, first ratio 1, every output file, LoRA changed, base untouched."""
    base = toy.ToyWorld("cpu", tmp_path.parent / "toy_cache", pretrain_steps=20).transformer.state_dict()
    cfg = tiny_config(tmp_path, advantage=advantage, sampler=sampler)
    result = train.main(cfg)
    for name in ("metrics.jsonl", "config.json", "ckpt.pt", "lora/pytorch_lora_weights.safetensors",
                 "reward_curve.png", "samples_start.png", "samples_end.png", "fig1_trajectories.png"):
        assert os.path.isfile(os.path.join(cfg.out, name)), f"{name} was not written"
    rows = [json.loads(line) for line in open(os.path.join(cfg.out, "metrics.jsonl"))]
    assert [r["it"] for r in rows] == [0, 1, 2] and all(math.isfinite(r["loss"]) for r in rows[:2])
    assert all(r["ratio_first"] == 1.0 for r in rows[:2]), "re-scoring before the first update must give ratio 1"
    assert len(result["eval_rewards"]) == 3
    init = toy.ToyWorld("cpu", tmp_path.parent / "toy_cache", pretrain_steps=20)  # fresh: the same base weights
    torch.manual_seed(cfg.seed)
    from peft import LoraConfig, get_peft_model_state_dict
    init.transformer.add_adapter(LoraConfig(r=cfg.lora_rank, lora_alpha=cfg.lora_alpha, init_lora_weights="gaussian",
                                            target_modules=lora.LORA_TARGETS))
    before, after = get_peft_model_state_dict(init.transformer), lora_state(cfg.out)
    assert before.keys() == after.keys()
    unchanged = [k for k in before if torch.equal(before[k].float(), after[k])]
    assert unchanged == dead_ends(init.transformer), f"LoRA parameters never updated: {unchanged[:3]}"
    assert all(torch.equal(base[k], v) for k, v in toy.ToyWorld("cpu", tmp_path.parent / "toy_cache",
                                                                pretrain_steps=20).transformer.state_dict().items())


def test_a_resumed_run_ends_bit_identical_to_one_that_never_stopped(tmp_path):
    """2 iterations + --resume to 4 gives exactly the LoRA and rewards of 4 iterations straight (CPU)."""
    straight = tiny_config(tmp_path / "a", steps=4, eval_every=10)
    train.main(straight)
    split = tiny_config(tmp_path / "b", steps=2, eval_every=10)
    train.main(split)
    train.main(dataclasses.replace(split, steps=4, resume=True))
    a, b = lora_state(straight.out), lora_state(split.out)
    assert all(torch.equal(a[k], b[k]) for k in a), "resume does not restore the RNG, optimizer or weights exactly"
    reward = lambda cfg: [json.loads(l).get("reward") for l in open(os.path.join(cfg.out, "metrics.jsonl"))]
    assert reward(straight) == reward(split)


def test_ctrl_c_finishes_the_iteration_and_writes_a_checkpoint(tmp_path, monkeypatch):
    """A SIGINT mid-run stops after the current iteration with a checkpoint that --resume continues."""
    def interrupting(device):
        score, calls = rewards.build("toy_geneval", device), []
        def fn(images, prompts):
            calls.append(1)
            if len(calls) == 2:  # the first iteration's rewards, after its evaluation: as if the user hit Ctrl-C
                os.kill(os.getpid(), signal.SIGINT)
            return score(images, prompts)
        return fn
    monkeypatch.setitem(rewards.REWARDS, "interrupting", interrupting)
    cfg = tiny_config(tmp_path, reward="interrupting", steps=5, eval_every=10)
    train.main(cfg)
    assert torch.load(os.path.join(cfg.out, "ckpt.pt"), weights_only=False)["it"] == 1
    assert not os.path.exists(os.path.join(cfg.out, "samples_end.png")), "an interrupted run must not claim to end"


def test_non_finite_losses_skip_updates_then_stop_the_run_with_a_checkpoint(tmp_path, monkeypatch):
    """A NaN reward makes NaN advantages: updates are skipped, and 3 in a row stop the run with a clear error."""
    nan = lambda device: lambda images, prompts: torch.full((len(prompts),), math.nan)
    monkeypatch.setitem(rewards.REWARDS, "nan", nan)
    cfg = tiny_config(tmp_path, reward="nan", steps=5, eval_every=10, micro_batch=4, updates_per_iteration=1)
    with pytest.raises(RuntimeError, match="non-finite losses in a row"):
        train.main(cfg)
    assert torch.load(os.path.join(cfg.out, "ckpt.pt"), weights_only=False)["it"] == 3


@pytest.mark.parametrize("sign", [1, -1])
def test_a_fixed_seed_short_run_climbs_its_reward(tmp_path, monkeypatch, sign):
    """The loop ascends whatever reward it is given: with +-brightness (smooth, so 6 iterations show it) as the
    reward, a fixed-seed run's held-out reward rises by > 0.02 (measured: 0.111 and 0.062; the evaluation is
    deterministic, so a loop that does not learn moves it by 0). A sign error in the gains, advantages, ratio or
    loss fails one of the two directions."""
    brightness = lambda device: lambda images, prompts: sign * images.mean((1, 2, 3))
    monkeypatch.setitem(rewards.REWARDS, "brightness", brightness)
    cfg = tiny_config(tmp_path, reward="brightness", steps=6, eval_every=6, prompts_per_step=4, group_size=4,
                      micro_batch=8, num_steps=10)
    evals = train.main(cfg)["eval_rewards"]
    assert evals[-1] - evals[0] > 0.02, f"held-out reward {evals[0]:.3f} -> {evals[-1]:.3f}: the loop did not climb it"


@pytest.mark.parametrize("flags,match", [
    (dict(group_size=1), "--group-size=1 is invalid: must be >= 2"),
    (dict(eta=5.0), "--eta: eta=5.0 makes sigma reach s"),
    (dict(reward="hps"), "--reward 'hps': 'hps' is unknown; valid rewards: "),
    (dict(reward="pickscore:x"), "--reward 'pickscore:x': the weight of pickscore must be a number"),
    (dict(reward="pickscore,pickscore:2"), "--reward 'pickscore,pickscore:2': a reward is named twice"),
    (dict(reward_batch=-1), "--reward-batch=-1 is invalid: must be >= 0"),
    (dict(eval_prompts="/no/such/folder"), "--eval-prompts='/no/such/folder' is invalid"),
    (dict(lr=0.0), "--lr=0.0 is invalid: must be > 0"),
    (dict(prompts="/no/such/file.txt"), "--prompts='/no/such/file.txt' is invalid"),
    (dict(sampler="euler"), "--sampler='euler' is invalid"),
    (dict(advantage="ppo"), "--advantage='ppo' is invalid"),
    (dict(tweedie_substeps=0), "--tweedie-substeps=0 is invalid"),
    (dict(std_floor=1.5), "--std-floor=1.5 is invalid: must be in [0, 1]"),
    (dict(eval_repeats=0), "--eval-repeats=0 is invalid: must be >= 1"),
    (dict(text_encoders="cpu"), "--text-encoders='cpu' is invalid: must be auto or precompute or resident or offload"),
    (dict(sampler="flow_grpo", noise_level=0.0), "--noise-level=0.0 is invalid: the flow_grpo sampler is then"),
    (dict(sampler="ddim", eta=0.0), "--eta=0.0 is invalid: the ddim sampler is then the ODE"),
    (dict(sampler="ddim", num_steps=2), "--num-steps=2 is invalid: the ddim sampler's first and last steps"),
])
def test_each_bad_flag_is_rejected_before_any_work_with_its_name(tmp_path, flags, match):
    """check(cfg) names the flag and its valid range; nothing is built or written first. A sampler with no random
    step (its noise 0, or the DDIM SDE at T = 2) would leave nothing to train: refused by the flag at fault."""
    cfg = dataclasses.replace(tiny_config(tmp_path), **flags)
    with pytest.raises(ValueError, match=match.replace("[", r"\[").replace("(", r"\(")):
        train.main(cfg)
    assert not os.path.exists(cfg.out), "work started before the flags were checked"


def test_resume_without_a_checkpoint_starts_from_scratch_and_says_so(tmp_path, capsys):
    """--resume true before any checkpoint exists (a requeued job that died early) trains from iteration 0, with a
    one-line notice; the run then resumes from the checkpoint it wrote."""
    cfg = tiny_config(tmp_path, steps=1, eval_every=10, resume=True)
    rows = train.main(cfg)["history"]
    assert [r["it"] for r in rows] == [0, 1], "the run did not start from iteration 0"
    assert f"--resume: no checkpoint in {cfg.out} yet: starting from scratch" in capsys.readouterr().err
    rows = train.main(dataclasses.replace(cfg, steps=2))["history"]
    assert [r["it"] for r in rows] == [0, 1, 2], "a checkpoint, once written, must be resumed from"


def test_snr_script_measures_every_variant_on_one_set_of_rollouts(tmp_path, capsys):
    """snr.py runs through train.py's own pieces and prints a row per credit x steps-trained variant."""
    import snr
    snr.main(["--batches", "2", "--pretrain-steps", "20", "--cache-dir", str(tmp_path), "--prompts-per-step", "2",
              "--group-size", "2", "--num-steps", "4", "--tweedie-substeps", "1"])
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| stepwise") or
            line.startswith("| flow_grpo")]
    assert len(rows) == 4 and all(" +- " in r for r in rows), rows


def test_flags_override_the_preset_and_unknown_flags_are_named(capsys):
    """--group-size 4 overrides the toy preset; --group-sise is an argparse error naming it."""
    cfg = config.parse_args(["--group-size", "4", "--shared-noise", "false"])
    assert cfg.group_size == 4 and cfg.shared_noise is False and cfg.lora_rank == config.toy(config.Config()).lora_rank
    with pytest.raises(SystemExit):
        config.parse_args(["--group-sise", "4"])
    assert "--group-sise" in capsys.readouterr().err
    assert config.parse_args(["--model", "some/sd3"]).reward == "pickscore", "an SD3 model takes the sd35 preset"


def test_the_flow_grpo_advantage_runs_with_flow_grpos_own_settings_unless_told_otherwise():
    """--advantage flow_grpo: global std and a noise per trajectory (Flow-GRPO's SD3 configs); flags still win."""
    baseline = config.parse_args(["--advantage", "flow_grpo"])
    assert baseline.global_std is True and baseline.shared_noise is False, "the baseline must run as Flow-GRPO does"
    stepwise = config.parse_args([])
    assert stepwise.global_std is False and stepwise.shared_noise is True, "stepwise keeps METHOD §3-4's settings"
    told = config.parse_args(["--advantage", "flow_grpo", "--global-std", "false", "--shared-noise", "true"])
    assert told.global_std is False and told.shared_noise is True, "a given flag must override the method's preset"


def test_help_shows_each_flags_meaning_and_its_choices(capsys):
    """--help prints every Config field's comment, and the valid values of the enumerated ones."""
    with pytest.raises(SystemExit):
        config.parse_args(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "{stepwise,flow_grpo}" in text and "{ddim,flow_grpo}" in text, "enumerated flags must list their values"
    for comment in config._comments().values():
        assert " ".join(comment.split())[:30] in text, f"--help lacks the field comment {comment!r}"


def test_update_order_gives_every_update_a_share_of_every_group_and_mixed_micro_batches():
    """G = 3, N = 4, U = 2: each update holds 2 members of each group; micro-batches of 3 hold 3 prompts."""
    order = batching.update_order(3, 4, 2)
    groups = order // 4
    assert sorted(order.tolist()) == list(range(12)), "the order must be a permutation of the trajectories"
    plan = batching.micro_batches(12, 2, 3)
    assert [[(c.start, c.stop) for c in u] for u in plan] == [[(0, 3), (3, 6)], [(6, 9), (9, 12)]]
    for u in plan:
        held = torch.cat([groups[c] for c in u])
        assert torch.equal(held.bincount(minlength=3), torch.tensor([2, 2, 2])), "an update misses a group"
        assert all(len(set(groups[c].tolist())) == 3 for c in u), "a micro-batch holds a single prompt"


@pytest.mark.parametrize("updates", [1, 2, 4])
def test_one_optimizer_step_per_update_and_the_first_ratio_is_exactly_one(tmp_path, monkeypatch, updates):
    """--updates-per-iteration U: exactly U AdamW steps an iteration, and the first micro-batch, re-scored before
    any of them, has ratio exactly 1 (sampling and training cut the same micro-batches)."""
    steps = []
    adamw_step = torch.optim.AdamW.step
    monkeypatch.setattr(torch.optim.AdamW, "step", lambda self, *a, **k: steps.append(1) or adamw_step(self, *a, **k))
    cfg = tiny_config(tmp_path, steps=2, eval_every=10, group_size=4, micro_batch=2, updates_per_iteration=updates)
    rows = train.main(cfg)["history"][:2]
    assert len(steps) == 2 * updates, f"{len(steps)} optimizer steps in 2 iterations, want {2 * updates}"
    assert all(r["ratio_first"] == 1.0 for r in rows), "the first micro-batch must be re-scored on-policy"
    assert all("kl" in r and "policy_loss" in r for r in rows), "the KL must be logged on its own"


def test_ema_follows_flow_grpos_rule_and_only_lends_its_weights():
    """decay 0.9 every 2 steps: after steps n = 1 and 3 (0-based), d = min((1 + n) / (10 + n), 0.9); swapped()
    puts the average in place and restores the live weights after."""
    p = torch.nn.Parameter(torch.zeros(3))
    ema = lora.EMA([p], 0.9, 2)
    shadow = torch.zeros(3)
    for n, value in enumerate([1.0, 2.0, 3.0, 4.0]):
        p.data.fill_(value)
        ema.step()
        if (n + 1) % 2 == 0:
            d = min((1 + n) / (10 + n), 0.9)
            shadow = shadow + (1 - d) * (value - shadow)
    assert torch.allclose(ema.shadow[0], shadow), f"EMA {ema.shadow[0]} differs from Flow-GRPO's rule {shadow}"
    with ema.swapped():
        assert torch.allclose(p, shadow), "evaluation must see the averaged weights"
    assert torch.equal(p.data, torch.full((3,), 4.0)), "training must go on with the live weights"
    off = lora.EMA([p], 0.0, 8)
    off.step()
    with off.swapped():
        assert torch.equal(p.data, torch.full((3,), 4.0)), "decay 0 must leave the live weights in place"


def test_with_ema_the_saved_lora_is_the_average_and_the_checkpoint_the_live_weights(tmp_path):
    """--ema-decay: out/lora (what users load) holds the EMA's weights, ckpt.pt the live ones to resume from."""
    from safetensors.torch import load_file
    cfg = tiny_config(tmp_path, steps=2, eval_every=10, ema_decay=0.5, ema_every=1)
    train.main(cfg)
    state = torch.load(os.path.join(cfg.out, "ckpt.pt"), weights_only=False)
    saved = load_file(os.path.join(cfg.out, "lora", "pytorch_lora_weights.safetensors"))
    names = ["transformer." + k for k in state["lora"]]  # the parameters' order, as diffusers saves their names
    assert sorted(names) == sorted(saved) and len(names) == len(state["ema"]["shadow"])
    average = dict(zip(names, state["ema"]["shadow"]))
    live = dict(zip(names, state["lora"].values()))
    assert all(torch.equal(saved[k], average[k]) for k in names), "out/lora is not the EMA's LoRA"
    assert not all(torch.equal(saved[k], live[k]) for k in names), "out/lora is the live LoRA"


def cli(argv, capsys):
    """train.py's command line, run in this process: its exit code and everything it printed."""
    try:
        code = train.cli(argv)
    except SystemExit as e:  # argparse's own errors
        code = e.code
    except Exception as e:  # in a process of its own, a traceback
        pytest.fail(f"{argv}: a user's mistake raised {type(e).__name__}: {e}")
    printed = capsys.readouterr()
    return code, printed.out + printed.err


def test_every_user_mistake_ends_in_one_error_line_and_exit_code_2(tmp_path, capsys, monkeypatch):
    """Bad flags, prompt files, rewards, checkpoints, output folders, models and a missing tracking package: each
    ends in one line `train.py: error: ...` and exit code 2, with no traceback."""
    find_spec = importlib.util.find_spec  # wandb, installed or not here, is missing for this test
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else find_spec(name, *a))
    (tmp_path / "empty.txt").write_text("\n\n")
    (tmp_path / "foreign.txt").write_text("a photo of a cat\n")
    (tmp_path / "binary.txt").write_bytes(b"\xff\xfe\x00\x81")
    (tmp_path / "corrupt").mkdir()
    (tmp_path / "corrupt" / "ckpt.pt").write_text("12 not a checkpoint")
    (tmp_path / "other").mkdir()
    torch.save(dict(lora={}, opt={"state": {}, "param_groups": []}, ema={}, it=1, history=[], world_size=1),
               tmp_path / "other" / "ckpt.pt")
    (tmp_path / "a_file").write_text("")
    (tmp_path / "not_a_model").mkdir()
    (tmp_path / "no_dataset").mkdir()
    (tmp_path / "geneval").mkdir()
    (tmp_path / "geneval" / "train_metadata.jsonl").write_text('{"prompt": "two red squares"}\n{"prompt": two\n')
    world = ["--pretrain-steps", "2", "--cache-dir", str(tmp_path / "cache")]
    cases = [["--group-size", "1"], ["--shared-noise", "maybe"], ["--steps", "abc"], ["--group-sise", "4"],
             ["--eta", "5"], ["--advantage", "ppo"], ["--sampler", "euler"], ["--reward", "hps"], ["--lr", "0"],
             ["--std-floor", "1.5"], ["--tweedie-substeps", "0"], ["--ema-decay", "1"], ["--guidance", "0.5"],
             ["--text-encoders", "fast"], ["--micro-batch", "0"], ["--num-steps", "1"], ["--eval-repeats", "0"],
             ["--updates-per-iteration", "3"], ["--prompts", "/no/such/file.txt"],
             ["--sampler", "flow_grpo", "--noise-level", "0"], ["--eta", "0"], ["--num-steps", "2"],
             ["--prompts", str(tmp_path / "empty.txt")] + world, ["--prompts", str(tmp_path / "foreign.txt")] + world,
             ["--prompts", str(tmp_path / "binary.txt")] + world, ["--prompts", str(tmp_path / "no_dataset")] + world,
             ["--prompts", str(tmp_path / "geneval")] + world, ["--reward", "pickscore:x"],
             ["--reward", "toy_geneval,toy_geneval"], ["--eval-prompts", str(tmp_path / "empty.txt")] + world,
             ["--reward", "ocr:x"], ["--reward", "ocr:0.8,pickscore:0.2"] + world, ["--log-to", "wandb"],
             ["--reward", "imagereward"] + world, ["--reward", "toy_geneval:0.5,unifiedreward:0.5"] + world,
             ["--resume", "true", "--out", str(tmp_path / "corrupt")] + world,
             ["--resume", "true", "--out", str(tmp_path / "other")] + world,
             ["--out", str(tmp_path / "a_file")] + world, ["--prompts-per-step", "1000"] + world,
             ["--model", "nobody/no-such-sd3-model"], ["--model", "/no/such/folder"],
             ["--model", str(tmp_path / "not_a_model")]]
    for argv in cases:
        code, printed = cli(argv, capsys)
        lines = [line for line in printed.splitlines() if line.strip()]
        assert code == 2 and lines and lines[-1].startswith("train.py: error: "), f"{argv}: exit {code}, {lines[-3:]}"
        assert sum("error" in line for line in lines) == 1, f"{argv}: more than one error line: {lines}"


def test_python_train_py_ends_a_users_mistake_in_one_line_and_exit_code_2():
    """The script itself, in a process of its own: a sampler with nothing to train is one line, code 2."""
    root = os.path.dirname(os.path.abspath(__file__))
    done = subprocess.run([sys.executable, "train.py", "--sampler", "flow_grpo", "--noise-level", "0"], cwd=root,
                          capture_output=True, text=True, timeout=120)
    lines = [line for line in (done.stdout + done.stderr).splitlines() if line.strip()]
    assert done.returncode == 2 and len(lines) == 1, lines
    assert lines[0].startswith("train.py: error: --noise-level=0.0 is invalid"), lines


def test_a_new_credit_is_one_function_and_one_entry(tmp_path, monkeypatch):
    """A credit added to stepgrpo.CREDITS is a valid --advantage at once and trains: here the stepwise gains
    discounted towards the end (1 function of 3 lines, 1 entry)."""
    def discounted(rewards, groups, *, per_step=False, global_std=False, adv_clip=5.0):
        gains = stepgrpo.gains(rewards) * 0.9 ** torch.arange(rewards.shape[1] - 1)
        return stepgrpo.group_normalise(gains, groups, per_step, global_std).clamp(-adv_clip, adv_clip)

    monkeypatch.setitem(stepgrpo.CREDITS, "discounted", stepgrpo.Credit(discounted, intermediate=True))
    assert config.parse_args(["--advantage", "discounted"]).advantage == "discounted"
    rows = train.main(tiny_config(tmp_path, advantage="discounted", steps=1, eval_every=10))["history"]
    assert math.isfinite(rows[0]["loss"]) and "gain_abs" in rows[0]


class PixelWorld:
    """A new world in one class of world.World: an 8x8 RGB SD3 transformer without a VAE, prompts encoded as fixed
    random embeddings. What a FLUX or SD3.5 Large world implements the same way, at full size."""

    default_guidance = 1.0
    latent_shape = (3, 8, 8)
    train_prompts = ["red", "green", "blue"]
    eval_prompts = ["white"]

    def __init__(self, device):
        self.device = torch.device(device)
        self.transformer = SD3Transformer2DModel(sample_size=8, patch_size=2, in_channels=3, out_channels=3,
                                                 num_layers=1, attention_head_dim=8, num_attention_heads=2,
                                                 joint_attention_dim=16, caption_projection_dim=16,
                                                 pooled_projection_dim=16).requires_grad_(False)

    def encode(self, prompts):
        seeds = [sum(map(ord, p)) for p in prompts]
        emb = torch.stack([torch.randn(4, 16, generator=torch.Generator().manual_seed(s)) for s in seeds])
        return dict(embeds=emb, pooled=emb.mean(1))

    def velocity(self, x, t, cond, guidance, detach_uncond=False):
        return self.transformer(x, cond["embeds"], cond["pooled"], 1000 * t).sample.float()

    def decode(self, x0):
        return ((x0 + 1) / 2).clamp(0, 1)


def test_a_new_world_is_one_class_of_the_world_protocol(tmp_path, monkeypatch):
    """PixelWorld (above: one class, no other change but the build) is a world.World, and train.py trains its LoRA
    with either credit."""
    assert isinstance(PixelWorld("cpu"), World)
    monkeypatch.setattr(runs, "build_world", lambda cfg, device: PixelWorld(device))
    brightness = lambda device: lambda images, prompts: images.mean((1, 2, 3))
    monkeypatch.setitem(rewards.REWARDS, "brightness", brightness)
    for advantage in ("stepwise", "flow_grpo"):
        cfg = tiny_config(tmp_path / advantage, advantage=advantage, reward="brightness", eval_every=10)
        rows = train.main(cfg)["history"]
        assert all(math.isfinite(r["loss"]) for r in rows[:2]), f"{advantage}: non-finite loss on a new world"
        assert any(v.abs().sum() > 0 for k, v in lora_state(cfg.out).items() if "lora_B" in k), "the LoRA never moved"


def test_prompts_read_both_flow_grpo_dataset_layouts_and_the_test_split_is_held_out(tmp_path):
    """--prompts takes Flow-GRPO's folders: train.txt/test.txt, or GenEval's train/test_metadata.jsonl (each line's
    "prompt"); the folder's test split becomes the held-out set unless --eval-prompts names another."""
    text = tmp_path / "pickscore"
    text.mkdir()
    (text / "train.txt").write_text("two red squares\n\na blue circle\n")
    (text / "test.txt").write_text("three green triangles\n")
    geneval = tmp_path / "geneval"
    geneval.mkdir()
    row = lambda p: json.dumps({"tag": "counting", "include": [{"class": "square", "count": 2}], "prompt": p})
    (geneval / "train_metadata.jsonl").write_text(row("two red squares") + "\n" + row("a blue circle") + "\n")
    (geneval / "test_metadata.jsonl").write_text(row("three green triangles") + "\n")
    for folder in (text, geneval):
        cfg = tiny_config(tmp_path, prompts=str(folder))
        assert runs.prompt_sets(cfg) == (["two red squares", "a blue circle"], ["three green triangles"])
        world = runs.build_world(cfg, "cpu")
        assert world.eval_prompts == ["three green triangles"], "the folder's test split must be held out"
    (tmp_path / "held.txt").write_text("a yellow square\n")
    cfg = tiny_config(tmp_path, prompts=str(geneval), eval_prompts=str(tmp_path / "held.txt"))
    assert runs.prompt_sets(cfg)[1] == ["a yellow square"], "--eval-prompts must override the folder's test split"


def test_a_malformed_metadata_line_is_an_error_naming_the_file_and_the_line(tmp_path):
    """A GenEval metadata line that is not JSON, or has no "prompt", is refused with its file and line number."""
    path = tmp_path / "train_metadata.jsonl"
    for bad in ('{"prompt": "a cat"}\n{"tag": "x"}\n', '{"prompt": "a cat"}\n\n{"prompt": "a dog"\n'):
        path.write_text(bad)
        with pytest.raises(files.LoadError, match=f"--prompts {path}: line [23] is not a JSON object"):
            files.read_prompts(str(path))
