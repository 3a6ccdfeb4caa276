"""Sequence packing: trajectories -> token-budget micro-batches, one packed row each, no padding.

A row holds whole trajectories back to back; positions restart at 0 for each, so the model attends
within a trajectory only (model/cwm.py). Position t of a row predicts the token at t + 1 of the same
trajectory; the per-position tensors below are aligned to those predictions."""

from __future__ import annotations

from dataclasses import dataclass

import torch


def pack(lengths: list[int], token_budget: int) -> list[list[int]]:
    """Group sequence indices into bins of at most `token_budget` tokens (first-fit decreasing).

    A sequence longer than the budget gets a bin of its own. The result is deterministic and
    orders bins by their first (longest) sequence."""
    if token_budget < 1:
        raise ValueError(f"token_budget must be >= 1, got {token_budget}")
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    bins: list[list[int]] = []
    room: list[int] = []
    for i in order:
        n = lengths[i]
        for b, free in enumerate(room):
            if n <= free:
                bins[b].append(i)
                room[b] -= n
                break
        else:
            bins.append([i])
            room.append(token_budget - n)
    return bins


@dataclass
class MicroBatch:
    """One packed row. All tensors are [1, T] except `seq_index` users may view as [T]."""

    input_ids: torch.Tensor
    position_ids: torch.Tensor
    target_ids: torch.Tensor  # token predicted at each position (0 where none)
    loss_mask: torch.Tensor  # bool: the predicted token was sampled by the policy
    behaviour_logprobs: torch.Tensor  # sampler's log-prob of the predicted token
    advantages: torch.Tensor  # per predicted token
    seq_index: torch.Tensor  # long: index (into the step's trajectory list) of each position's doc
    indices: list[int]  # which trajectories this micro-batch holds
    # set by the learner: its log-probs before the step (truncated importance sampling) and a
    # frozen reference policy's (KL penalty), [1, T] like the rest; None when not used
    old_logprobs: torch.Tensor | None = None
    ref_logprobs: torch.Tensor | None = None

    @property
    def num_tokens(self) -> int:
        return self.input_ids.shape[1]

    def to(self, device) -> MicroBatch:
        fields = {k: v.to(device) if torch.is_tensor(v) else v for k, v in vars(self).items()}
        return MicroBatch(**fields)


def build_micro_batch(
    indices: list[int],
    tokens: list[list[int]],
    loss_mask: list[list[int]],
    behaviour_logprobs: list[list[float]],
    advantages: list[list[float]],
) -> MicroBatch:
    """Concatenate trajectories `indices` into one row (per-token lists are indexed by trajectory)."""
    ids, pos, tgt, mask, blp, adv, seq = [], [], [], [], [], [], []
    for i in indices:
        toks = tokens[i]
        n = len(toks)
        ids += toks
        pos += range(n)
        tgt += toks[1:] + [0]
        mask += [bool(m) for m in loss_mask[i][1:]] + [False]
        blp += list(behaviour_logprobs[i][1:]) + [0.0]
        adv += list(advantages[i][1:]) + [0.0]
        seq += [i] * n
    row = lambda xs, dtype: torch.tensor([xs], dtype=dtype)  # noqa: E731
    return MicroBatch(
        input_ids=row(ids, torch.long),
        position_ids=row(pos, torch.long),
        target_ids=row(tgt, torch.long),
        loss_mask=row(mask, torch.bool),
        behaviour_logprobs=row(blp, torch.float32),
        advantages=row(adv, torch.float32),
        seq_index=row(seq, torch.long),
        indices=list(indices),
    )
