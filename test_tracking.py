"""Tests of tracking.py: --log-to tensorboard writes every logged key and the sample grids; a missing package is a
one-line error before any work."""
import importlib.util
import json
import os

import pytest

import config
import tracking
import train
from conftest import tiny_config


def test_metrics_become_scalars_with_one_per_entry_of_a_list():
    """Numbers stay, booleans and strings go, a list is one scalar an entry (gain_abs/0, gain_abs/1, ...)."""
    m = {"it": 3, "reward": 0.5, "gain_abs": [0.1, 0.2], "name": "x", "flag": True}
    assert tracking.scalars(m) == {"it": 3.0, "reward": 0.5, "gain_abs/0": 0.1, "gain_abs/1": 0.2}


@pytest.mark.skipif(importlib.util.find_spec("tensorboard") is None, reason="tensorboard is not installed (optional)")
def test_tensorboard_holds_every_logged_key_and_the_sample_grids(tmp_path):
    """A tiny run with --log-to tensorboard: the event files read back hold each iteration's keys at its step, the
    same values as metrics.jsonl, and the start and end sample grids."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cfg = tiny_config(tmp_path, log_to="tensorboard")
    train.main(cfg)
    events = EventAccumulator(os.path.join(cfg.out, "tensorboard"), size_guidance={"scalars": 0, "images": 0})
    events.Reload()
    rows = [json.loads(line) for line in open(os.path.join(cfg.out, "metrics.jsonl"))]
    for row in rows:
        for key, value in tracking.scalars(row).items():
            logged = {e.step: e.value for e in events.Scalars(key)}
            assert logged[row["it"]] == pytest.approx(value, rel=1e-6), f"{key} at {row['it']} differs"
    assert {"samples_start", "samples_end", "reward_curve", "fig1_trajectories"} <= set(events.Tags()["images"])


def test_a_tracker_that_is_not_installed_is_refused_before_any_work(tmp_path, monkeypatch):
    """--log-to wandb without wandb installed: a UsageError-style one-liner naming --log-to and `pip install wandb`,
    raised by the flag check, before a world is built or --out written."""
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    cfg = tiny_config(tmp_path, log_to="wandb")
    with pytest.raises(tracking.UserError, match="--log-to wandb: the wandb package is not installed.*pip install"):
        config.check(cfg)
    with pytest.raises(tracking.UserError):
        train.main(cfg)
    assert not os.path.exists(cfg.out), "work started before the missing package was reported"
