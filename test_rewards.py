"""Tests of rewards.py: the registry that picks --reward."""
import time

import pytest

import files
import render
import rewards


def test_a_reward_that_cannot_be_loaded_fails_within_seconds_naming_the_reward_flag():
    """build('pickscore') and build('clip') without the weights raise LoadError naming --reward, in < 10 s."""
    for name in ("pickscore", "clip"):
        start = time.perf_counter()
        with pytest.raises(files.LoadError, match=f"--reward {name}"):
            rewards.build(name, "cpu")
        assert time.perf_counter() - start < 10


def test_rewards_are_chosen_by_name():
    """build('toy_geneval') is render.geneval_score; an unknown name is a ValueError listing the valid ones."""
    assert rewards.build("toy_geneval", "cpu") is render.geneval_score
    with pytest.raises(ValueError, match="clip, pickscore, toy_geneval"):
        rewards.build("imagereward", "cpu")
