"""Tests of rewards.py: the registry that picks --reward, Flow-GRPO's weighted mixes, scoring in chunks."""
import time

import pytest
import torch

import config
import files
import render
import rewards

PAPER_REWARDS = ["pickscore", "clip", "hpsv2", "aesthetic", "imagereward", "unifiedreward", "ocr"]


@pytest.mark.parametrize("name", PAPER_REWARDS)
def test_a_reward_that_cannot_be_loaded_fails_within_seconds_naming_the_reward_flag(name):
    """build(name) without the weights (offline) raises LoadError naming --reward and the reward, in < 10 s."""
    start = time.perf_counter()
    with pytest.raises(files.LoadError, match=f"--reward {name} \\(needs "):
        rewards.build(name, "cpu")
    assert time.perf_counter() - start < 10, "a failed load must not retry the hub for a minute"


def test_rewards_are_chosen_by_name_and_help_lists_them_all(capsys):
    """build('toy_geneval') is render.geneval_score; an unknown name is a ValueError listing the valid ones;
    train.py --help names every reward."""
    assert rewards.build("toy_geneval", "cpu") is render.geneval_score
    with pytest.raises(ValueError, match="'hps' is unknown; valid rewards: aesthetic, clip, hpsv2, imagereward"):
        rewards.build("hps", "cpu")
    with pytest.raises(SystemExit):
        config.parse_args(["--help"])
    shown = " ".join(capsys.readouterr().out.split())
    assert all(name in shown for name in PAPER_REWARDS + ["toy_geneval"]), "--help must list every reward"


def fake(value):
    """A reward scoring every image `value` times its mean, and recording the batch sizes it was called with."""
    def builder(device):
        def score(images, prompts):
            builder.calls.append(len(images))
            return value * images.mean((1, 2, 3))
        return score
    builder.calls = []
    return builder


def test_a_mix_is_the_weighted_sum_of_its_parts(monkeypatch):
    """"a:0.8,b:0.2" scores 0.8 R_a + 0.2 R_b (Flow-GRPO's multi_score); a name alone weighs 1."""
    monkeypatch.setitem(rewards.REWARDS, "a", fake(1.0))
    monkeypatch.setitem(rewards.REWARDS, "b", fake(-3.0))
    images = torch.rand(5, 3, 4, 4)
    mean = images.mean((1, 2, 3))
    assert torch.allclose(rewards.build("a:0.8,b:0.2", "cpu")(images, ["p"] * 5), 0.8 * mean + 0.2 * -3.0 * mean)
    assert torch.allclose(rewards.build("a,b:0.5", "cpu")(images, ["p"] * 5), mean + 0.5 * -3.0 * mean)
    assert rewards.parse("ocr:0.8,pickscore:0.2") == [("ocr", 0.8), ("pickscore", 0.2)]


@pytest.mark.parametrize("spec, says", [("ocr:x", "the weight of ocr must be a number"),
                                        ("ocr:nan", "the weight of ocr must be a number"),
                                        ("ocr,ocr:2", "a reward is named twice"),
                                        ("ocr:0.8,pick", "'pick' is unknown")])
def test_a_malformed_mix_is_refused_naming_the_flag(spec, says):
    """A weight that is not a finite number, a reward named twice or an unknown one: a ValueError naming --reward."""
    with pytest.raises(ValueError, match=f"--reward '{spec}': .*{says}"):
        rewards.parse(spec)


def test_rewards_score_in_chunks_of_reward_batch_with_the_same_result(monkeypatch):
    """--reward-batch 4 scores 10 images in calls of 4, 4 and 2, and gives what one call gives."""
    builder = fake(1.0)
    monkeypatch.setitem(rewards.REWARDS, "a", builder)
    images = torch.rand(10, 3, 4, 4)
    whole = rewards.build("a", "cpu")(images, ["p"] * 10)
    chunked = rewards.build("a", "cpu", batch=4)(images, ["p"] * 10)
    assert builder.calls == [10, 4, 4, 2] and torch.equal(whole, chunked)


def test_a_prompt_a_reward_cannot_score_is_found_before_any_model_is_loaded():
    """The OCR reward needs a quoted text: check_prompts names the first prompt without one; others pass."""
    rewards.check_prompts("pickscore:0.2,ocr:0.8", ['a sign that says "Open"', 'a mug with "hello" on it'])
    with pytest.raises(ValueError, match="'two red squares'"):
        rewards.check_prompts("pickscore:0.2,ocr:0.8", ['a sign that says "Open"', "two red squares"])
    rewards.check_prompts("pickscore", ["two red squares"])


@pytest.mark.parametrize("name", PAPER_REWARDS)
def test_every_reward_counts_its_flops_per_image(name):
    """flops_per_image counts each reward's model at full size within seconds, without memory (meta tensors)."""
    start = time.perf_counter()
    assert rewards.flops_per_image(name) > 1e10, f"{name}: a full-size model costs more than 10 GFLOP an image"
    assert time.perf_counter() - start < 30
