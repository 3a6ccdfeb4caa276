"""rl/types.py: the Trajectory contract (validate errors name the field) and JSON round trips."""

from __future__ import annotations

import json
import math

import pytest

from rl.types import EXCLUDED_STATUSES, STATUSES, TrainBatch, Trajectory


def trajectory(**overrides) -> Trajectory:
    """Prompt of 3 tokens, a sampled turn of 2 (version 4), a tool result of 2, a sampled turn of 1
    (version 5: the weights changed mid-trajectory)."""
    fields = dict(
        task_id="math/17", env="math", group_id="step3/math/17", tokens=[1, 2, 3, 10, 11, 20, 21, 30],
        loss_mask=[0, 0, 0, 1, 1, 0, 0, 1], logprobs=[0.0, 0.0, 0.0, -0.5, -1.25, 0.0, 0.0, -0.125],
        versions=[-1, -1, -1, 4, 4, -1, -1, 5], prompt_len=3, reward=1.0, status="ok",
        metrics={"turns": 2, "verdict": "correct"},
    )  # fmt: skip
    fields.update(overrides)
    return Trajectory(**fields)


def test_properties():
    t = trajectory().validate()
    assert (t.num_sampled_tokens, t.min_version, t.max_version) == (3, 4, 5)
    assert not t.excluded
    nothing = trajectory(tokens=[1, 2], loss_mask=[0, 0], logprobs=[0.0, 0.0], versions=[-1, -1])
    assert (nothing.num_sampled_tokens, nothing.min_version, nothing.max_version) == (0, None, None)
    assert STATUSES == ("ok", "truncated", "env_error", "timeout")
    for status in STATUSES:
        t = trajectory(status=status, reward=None if status in EXCLUDED_STATUSES else 0.0)
        assert t.validate().excluded == (status in ("env_error", "timeout"))


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(loss_mask=[0, 0, 0, 1]), "loss_mask has 4 entries but tokens has 8"),
        (dict(logprobs=[0.0] * 7), "logprobs has 7 entries but tokens has 8"),
        (dict(versions=[-1] * 9), "versions has 9 entries but tokens has 8"),
        (dict(loss_mask=[0, 0, 0, 2, 1, 0, 0, 1]), "loss_mask must hold only 0 and 1"),
        (dict(prompt_len=0), "prompt_len must be in"),
        (dict(prompt_len=9), "prompt_len must be in"),
        (dict(prompt_len=4), "loss_mask must be 0 over the prompt"),
        (dict(logprobs=[0.0, 0.0, 0.0, 0.5, -1.25, 0.0, 0.0, -0.1]), r"logprobs\[3\] = 0.5"),
        (dict(logprobs=[0.0, 0.0, 0.0, -0.5, math.nan, 0.0, 0.0, -0.1]), r"logprobs\[4\] = nan"),
        (
            dict(logprobs=[0.0, 0.0, 0.0, -0.5, -1.0, -0.3, 0.0, -0.1]),
            r"logprobs\[5\].*must be 0.0",
        ),
        (dict(versions=[-1, -1, -1, 4, -1, -1, -1, 5]), r"versions\[4\] = -1 must be >= 0"),
        (dict(versions=[0, -1, -1, 4, 4, -1, -1, 5]), r"versions\[0\] = 0 must be -1"),
        (dict(status="error"), "status must be one of"),
        (dict(reward=None), "reward is None but status is 'ok'"),
        (dict(reward=math.inf), "reward must be finite"),
        (dict(reward="1"), "reward must be a float"),
        (dict(reward=True), "reward must be a float"),
        (dict(group_id=3), "group_id must be a str"),
        (dict(metrics=[1]), "metrics must be a dict"),
    ],
)
def test_validate_names_the_field(overrides, message):
    with pytest.raises(ValueError, match=message):
        trajectory(**overrides).validate()


def test_excluded_trajectory_may_carry_no_reward():
    t = trajectory(status="env_error", reward=None).validate()
    assert t.excluded and t.reward is None


def test_round_trip_through_json():
    for t in (trajectory(), trajectory(status="timeout", reward=None, metrics={})):
        text = json.dumps(t.to_dict())
        back = Trajectory.from_dict(json.loads(text))
        assert back == t
        assert json.loads(text)["loss_mask"] == t.loss_mask
    # an int reward comes back as a float
    assert Trajectory.from_dict(trajectory(reward=1).to_dict()).reward == 1.0


def test_from_dict_rejects_unknown_missing_and_invalid():
    data = trajectory().to_dict()
    with pytest.raises(ValueError, match="unknown Trajectory field.*advantage"):
        Trajectory.from_dict(data | {"advantage": 1.0})
    del data["versions"]
    with pytest.raises(ValueError, match="missing Trajectory field.*versions"):
        Trajectory.from_dict(data)
    with pytest.raises(ValueError, match="reward is None"):
        Trajectory.from_dict(trajectory().to_dict() | {"reward": None})
    minimal = trajectory().to_dict()
    for key in ("reward", "status", "metrics"):
        del minimal[key]
    with pytest.raises(ValueError, match="reward is None"):  # the defaults still validate
        Trajectory.from_dict(minimal)


def test_train_batch_validate():
    t = trajectory()
    batch = TrainBatch([t, t], [[0.0] * 8, [0.5] * 8])
    assert len(batch.validate()) == 2 and batch.num_sampled_tokens == 6
    with pytest.raises(ValueError, match="advantages has 1 rows but there are 2 trajectories"):
        TrainBatch([t, t], [[0.0] * 8]).validate()
    with pytest.raises(ValueError, match=r"advantages\[1\] has 7 entries"):
        TrainBatch([t, t], [[0.0] * 8, [0.0] * 7]).validate()
