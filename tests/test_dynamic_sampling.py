"""DAPO dynamic sampling keeps groups by correctness (the accuracy verifier), not by shaped reward."""

from __future__ import annotations

import pytest

from rlkit.config import ConfigError, load_config
from rlkit.loop.experience import Group, keep_informative


def _group(correct: list[float], rewards: list[float]) -> Group:
    return Group(row={}, prompt_ids=[1], completions=[], rewards=rewards, per_verifier={"math": correct})


def test_groups_all_wrong_or_all_right_are_dropped_even_when_a_shaper_separates_their_rewards():
    # a length shaper (or a format bonus) made the rewards of an all-wrong group differ: before the fix
    # the group was kept and trained on length alone
    all_wrong = _group([0.0, 0.0, 0.0, 0.0], [-0.1, -0.3, 0.0, -0.2])
    mixed = _group([1.0, 0.0, 0.0, 0.0], [0.9, -0.3, 0.0, -0.2])
    all_right = _group([1.0, 1.0, 1.0, 1.0], [1.0, 0.8, 0.9, 0.7])
    groups = [all_wrong, mixed, all_right]
    assert keep_informative(groups, "math") == [mixed]
    assert keep_informative(groups, "math", on="reward") == groups  # the old filter, now explicit
    # partial credit below 1 is not "correct"; no accuracy verifier: the reward decides
    assert keep_informative([_group([0.5, 0.0], [0.5, 0.0])], "math") == []
    assert len(keep_informative([_group([0.5, 0.0], [0.5, 0.0])], "other")) == 1


def test_config_option():
    cfg = load_config(None, ["algorithm.dynamic_sampling.enabled=true"])
    assert cfg.algorithm.dynamic_sampling.on == "accuracy"
    with pytest.raises(ConfigError, match="dynamic_sampling.on"):
        load_config(None, ["algorithm.dynamic_sampling.on=rewards"])
