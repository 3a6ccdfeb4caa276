"""GRPO and its variants as pure functions on tensors, each named after the symbol of its paper.

Layout. Every per-token tensor given to one call has the same shape and is read through a boolean
`loss_mask` (1 where the policy sampled the token). Two layouts, one code path:
  padded  [B, T], one sequence per row: sequence membership is the row (`seq_ids=None`);
  packed  [T] or [1, T], several sequences back to back (rl/packing.py): `seq_ids` gives each
          token's sequence (any integers, e.g. trajectory indices).
Only the sequence-level terms (GRPO's per-sequence mean, the sequence counts of the normalisers,
GSPO's sequence ratio) read the sequence membership. A 1-D input without `seq_ids` is one sequence.

Symbols.
  pi_theta  `logprobs`            the learner's log-probs now (the only input with a gradient)
  mu        `behaviour_logprobs`  the sampler's log-probs (vLLM / native engine): behaviour policy
  pi_old    `old_logprobs`        the learner's log-probs before this step (optional). With TIS on
                                  the ratio is pi_theta / pi_old and each token is reweighted by
                                  min(pi_old / mu, C); with TIS off the ratio is pi_theta / mu (the
                                  clip then also bounds staleness) and pi_old only feeds the
                                  trainer/sampler mismatch metrics.
  pi_ref    `ref_logprobs`        a reference policy (KL penalty)
  r_t ratio, A_t advantage, eps_low / eps_high clip range, c dual clip, C TIS cap, beta KL coef.

Papers.
  GRPO       Shao et al. 2024, DeepSeekMath (arXiv:2402.03300)
  DAPO       Yu et al. 2025 (arXiv:2503.14476): clip-higher, token-mean, dynamic sampling, overlong
  Dr.GRPO    Liu et al. 2025, Understanding R1-Zero-Like Training (arXiv:2503.20783)
  CWM        Meta FAIR 2025, CWM: An Open-Weights LLM for Research on Code Generation with World
             Models (arXiv:2510.02387)
  GSPO       Zheng et al. 2025, Group Sequence Policy Optimization (arXiv:2507.18071)
  Dual-clip  Ye et al. 2020, Mastering Complex Control in MOBA Games with Deep RL (arXiv:1912.09729)
  k1 / k3    Schulman 2020, Approximating KL Divergence (blog post)
  TIS        Yao et al. 2025, Your Efficient RL Framework Secretly Brings You Off-Policy RL Training
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from rl.types import TrainBatch, Trajectory

ADVANTAGES = ("mean", "std")
REWARD_PLACEMENTS = ("broadcast", "final")
RATIO_LEVELS = ("token", "sequence")
KL_ESTIMATORS = ("off", "k1", "k3")
AGGREGATIONS = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm", "constant")


@dataclass
class LossConfig:
    """Every knob of advantage computation and of the loss. The defaults are CWM's recipe."""

    # advantages
    advantage: str = "mean"  # mean: r - mean (CWM, Dr.GRPO) | std: (r - mean) / (std + eps) (GRPO)
    std_eps: float = 1e-6
    reward_placement: str = "broadcast"  # broadcast | final (see token_advantages)
    filter_zero_advantage_groups: bool = False  # DAPO dynamic sampling
    overlong_max_len: int | None = None  # DAPO soft overlong punishment L_max (None = off)
    overlong_cache_len: int = 0  # DAPO L_cache
    # objective
    ratio_level: str = "token"  # token (PPO / GRPO) | sequence (GSPO; its paper: eps 3e-4 / 4e-4)
    eps_low: float = 0.2
    eps_high: float = 0.25  # > eps_low: DAPO clip-higher
    dual_clip: float | None = None  # c > 1: bound the loss of negative advantages (None = off)
    tis_cap: float | None = None  # C of truncated importance sampling (None = off)
    kl_estimator: str = "off"  # off | k1 | k3
    kl_coef: float = 0.0  # beta
    # aggregation
    aggregation: str = "constant"  # one of AGGREGATIONS
    norm_length: int = 131072  # the constant of "constant" and "seq-mean-token-sum-norm"

    def __post_init__(self) -> None:
        for name, allowed in (
            ("advantage", ADVANTAGES),
            ("reward_placement", REWARD_PLACEMENTS),
            ("ratio_level", RATIO_LEVELS),
            ("kl_estimator", KL_ESTIMATORS),
            ("aggregation", AGGREGATIONS),
        ):
            if getattr(self, name) not in allowed:
                raise ValueError(
                    f"loss.{name} must be one of {allowed}, got {getattr(self, name)!r}"
                )
        if not 0 <= self.eps_low < 1:
            raise ValueError(f"loss.eps_low must be in [0, 1), got {self.eps_low}")
        if self.eps_high < 0:
            raise ValueError(f"loss.eps_high must be >= 0, got {self.eps_high}")
        if self.dual_clip is not None and self.dual_clip <= 1:
            raise ValueError(f"loss.dual_clip must be > 1 (or None), got {self.dual_clip}")
        if self.tis_cap is not None and self.tis_cap <= 0:
            raise ValueError(f"loss.tis_cap must be > 0 (or None), got {self.tis_cap}")
        if self.kl_coef < 0:
            raise ValueError(f"loss.kl_coef must be >= 0, got {self.kl_coef}")
        if self.std_eps < 0:
            raise ValueError(f"loss.std_eps must be >= 0, got {self.std_eps}")
        if self.norm_length < 1:
            raise ValueError(f"loss.norm_length must be >= 1, got {self.norm_length}")
        if self.overlong_max_len is not None and not (
            0 < self.overlong_cache_len <= self.overlong_max_len
        ):
            raise ValueError(
                f"loss.overlong_cache_len must be in (0, overlong_max_len={self.overlong_max_len}]"
                f" when the overlong penalty is on, got {self.overlong_cache_len}"
            )


# -- advantages ------------------------------------------------------------------------------------


def group_advantages(
    rewards: torch.Tensor, group_ids: torch.Tensor, scale: str = "mean", eps: float = 1e-6
) -> torch.Tensor:
    """A_i = r_i - mean_g(r) (CWM; Dr.GRPO), or that / (std_g(r) + eps) (DeepSeekMath GRPO).

    Dr.GRPO and CWM share this advantage; they differ in aggregation: Dr.GRPO sums each sequence
    over tokens, divides by a constant length and averages sequences, CWM divides the sum over all
    tokens by one constant. std is the sample (n - 1) standard deviation, 0 for a group of one. A
    group whose rewards are all equal gets exactly 0 (no rounding residue)."""
    if scale not in ADVANTAGES:
        raise ValueError(f"scale must be one of {ADVANTAGES}, got {scale!r}")
    if rewards.shape != group_ids.shape or rewards.dim() != 1:
        raise ValueError(f"rewards {tuple(rewards.shape)} and group_ids must be equal 1-D shapes")
    _, g = torch.unique(group_ids, return_inverse=True)
    num_groups = int(g.max()) + 1 if g.numel() else 0
    zeros = torch.zeros(num_groups, dtype=rewards.dtype, device=rewards.device)
    count = zeros.index_add(0, g, torch.ones_like(rewards))
    mean = zeros.index_add(0, g, rewards) / count
    advantages = rewards - mean[g]
    if scale == "std":
        sum_sq = zeros.index_add(0, g, advantages**2)
        std = (sum_sq / (count - 1).clamp(min=1)).sqrt()
        advantages = advantages / (std[g] + eps)
    high = zeros.scatter_reduce(0, g, rewards, "amax", include_self=False)
    low = zeros.scatter_reduce(0, g, rewards, "amin", include_self=False)
    return torch.where((high == low)[g], torch.zeros_like(advantages), advantages)


def token_advantages(advantage: float, loss_mask: Sequence[int], placement: str) -> list[float]:
    """Place a sequence's advantage on its tokens: "broadcast" to every sampled token (the
    return-to-go of a final-token reward with gamma = 1 and no critic, as in GRPO and CWM) or
    "final": on the last sampled token only (0 elsewhere)."""
    if placement not in REWARD_PLACEMENTS:
        raise ValueError(f"placement must be one of {REWARD_PLACEMENTS}, got {placement!r}")
    out = [float(advantage) if m else 0.0 for m in loss_mask]
    if placement == "final":
        sampled = [i for i, m in enumerate(loss_mask) if m]
        out = [0.0] * len(loss_mask)
        if sampled:
            out[sampled[-1]] = float(advantage)
    return out


def overlong_penalty(length: int, max_len: int, cache_len: int) -> float:
    """DAPO soft overlong punishment: 0 up to L_max - L_cache, then linear down to -1 at L_max,
    -1 beyond."""
    if not 0 < cache_len <= max_len:
        raise ValueError(f"cache_len must be in (0, max_len={max_len}], got {cache_len}")
    if length <= max_len - cache_len:
        return 0.0
    if length <= max_len:
        return ((max_len - cache_len) - length) / cache_len
    return -1.0


def filter_zero_advantage_groups(
    advantages: torch.Tensor, group_ids: torch.Tensor
) -> tuple[torch.Tensor, int]:
    """DAPO dynamic sampling: keep mask [N] of members of groups with some non-zero advantage,
    and the number of groups dropped (all advantages 0: no learning signal)."""
    _, g = torch.unique(group_ids, return_inverse=True)
    num_groups = int(g.max()) + 1 if g.numel() else 0
    nonzero = torch.zeros(num_groups, dtype=torch.long, device=advantages.device)
    nonzero = nonzero.index_add(0, g, (advantages != 0).long())
    return nonzero[g] > 0, int((nonzero == 0).sum())


def build_train_batch(trajectories: Sequence[Trajectory], config: LossConfig) -> TrainBatch:
    """A step's trajectories -> TrainBatch: leave out (and count) excluded ones, add DAPO's overlong
    penalty, compute group advantages, drop all-zero groups if asked, place them on tokens.

    Groups are keyed by `group_id`; the group mean is over the trajectories with a reward. The
    overlong length is the completion's, len(tokens) - prompt_len (tool results included)."""
    for t in trajectories:
        t.validate()
    kept = [t for t in trajectories if not t.excluded]
    batch = TrainBatch([], [], num_excluded=len(trajectories) - len(kept))
    if not kept:
        return batch
    rewards = []
    for t in kept:
        r = float(t.reward)
        if config.overlong_max_len is not None:
            length = len(t.tokens) - t.prompt_len
            r += overlong_penalty(length, config.overlong_max_len, config.overlong_cache_len)
        rewards.append(r)
    index: dict[str, int] = {}
    group_ids = torch.tensor([index.setdefault(t.group_id, len(index)) for t in kept])
    advantages = group_advantages(
        torch.tensor(rewards, dtype=torch.float64), group_ids, config.advantage, config.std_eps
    )
    if config.filter_zero_advantage_groups:
        keep, batch.num_filtered_groups = filter_zero_advantage_groups(advantages, group_ids)
        batch.num_filtered_trajectories = int((~keep).sum())
        kept = [t for t, k in zip(kept, keep.tolist()) if k]
        advantages = advantages[keep]
    batch.trajectories = kept
    batch.advantages = [
        token_advantages(a, t.loss_mask, config.reward_placement)
        for a, t in zip(advantages.tolist(), kept)
    ]
    return batch


# -- per-token terms -------------------------------------------------------------------------------


def sequence_index(shape: torch.Size, seq_ids: torch.Tensor | None = None) -> torch.Tensor:
    """Each token's sequence as 0..S-1 (same shape): the row of a padded [B, T] tensor, or the
    compacted `seq_ids` of a packed one."""
    if seq_ids is not None:
        if seq_ids.shape != shape:
            raise ValueError(f"seq_ids has shape {tuple(seq_ids.shape)}, expected {tuple(shape)}")
        return torch.unique(seq_ids, return_inverse=True)[1].reshape(shape)
    if len(shape) == 1:
        return torch.zeros(shape, dtype=torch.long)
    if len(shape) == 2:
        return torch.arange(shape[0])[:, None].expand(shape)
    raise ValueError(f"give seq_ids for a tensor of shape {tuple(shape)} (expected [B, T] or [T])")


def _per_sequence_sum(x: torch.Tensor, seq: torch.Tensor) -> torch.Tensor:
    num = int(seq.max()) + 1 if seq.numel() else 0
    zeros = torch.zeros(num, dtype=x.dtype, device=x.device)
    return zeros.index_add(0, seq.reshape(-1), x.reshape(-1))


def log_ratio(logprobs: torch.Tensor, anchor: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """log r_t = log pi_theta - log pi_old (PPO), 0 where not sampled."""
    return torch.where(mask, logprobs - anchor, torch.zeros_like(logprobs))


def gspo_ratio(
    logprobs: torch.Tensor, anchor: torch.Tensor, mask: torch.Tensor, seq: torch.Tensor
) -> torch.Tensor:
    """s_i = exp(mean_t log r_t) per sequence, given per token as GSPO-token's
    s_i,t = sg[s_i] * pi_theta / sg[pi_theta] (GSPO): value s_i, gradient s_i * grad log pi_t."""
    log_r = log_ratio(logprobs, anchor, mask)
    count = _per_sequence_sum(mask.to(logprobs.dtype), seq)
    s = torch.exp(_per_sequence_sum(log_r, seq) / count.clamp(min=1))
    own = log_ratio(logprobs, logprobs.detach(), mask)  # 0 in value, carries d log pi_t
    return s.detach()[seq] * torch.exp(own)


def clipped_surrogate(
    ratio: torch.Tensor,
    advantages: torch.Tensor,
    eps_low: float,
    eps_high: float,
    dual_clip: float | None = None,
) -> torch.Tensor:
    """Per-token loss -min(r A, clip(r, 1 - eps_low, 1 + eps_high) A) (PPO; DAPO clip-higher),
    and for A < 0 at most -c A when `dual_clip` = c (Dual-clip PPO)."""
    unclipped = ratio * advantages
    clipped = ratio.clamp(1 - eps_low, 1 + eps_high) * advantages
    loss = -torch.minimum(unclipped, clipped)
    if dual_clip is not None:
        loss = torch.where(advantages < 0, torch.minimum(loss, -dual_clip * advantages), loss)
    return loss


def kl_penalty(
    logprobs: torch.Tensor, ref_logprobs: torch.Tensor, estimator: str, mask: torch.Tensor
) -> torch.Tensor:
    """Per-token KL(pi_theta || pi_ref) estimate (Schulman): k1 = -log rho,
    k3 = rho - 1 - log rho, rho = pi_ref / pi_theta; 0 where not sampled."""
    log_rho = log_ratio(ref_logprobs, logprobs, mask)
    if estimator == "k1":
        return -log_rho
    if estimator == "k3":
        return torch.exp(log_rho) - 1 - log_rho
    raise ValueError(f"estimator must be k1 or k3, got {estimator!r}")


def tis_weights(
    old_logprobs: torch.Tensor, behaviour_logprobs: torch.Tensor, cap: float, mask: torch.Tensor
) -> torch.Tensor:
    """Truncated importance weight min(pi_old / mu, C) per token, no gradient (Yao et al., TIS)."""
    log_w = log_ratio(old_logprobs, behaviour_logprobs, mask).detach()
    return torch.exp(log_w).clamp(max=cap)


# -- aggregation -----------------------------------------------------------------------------------


def _normaliser(num_tokens: int, num_sequences: int, config: LossConfig) -> float:
    """The denominator of `aggregate` for a batch of this many sampled tokens / sequences."""
    value = {
        "token-mean": num_tokens,  # DAPO
        "seq-mean-token-mean": num_sequences,  # GRPO (each sequence first averaged over tokens)
        "seq-mean-token-sum-norm": num_sequences * config.norm_length,  # Dr.GRPO
        "constant": config.norm_length,  # CWM
    }[config.aggregation]
    return float(max(value, 1))  # an empty batch gives loss 0, not NaN


def loss_normaliser(loss_masks: Sequence[Sequence[int]], config: LossConfig) -> float:
    """The normaliser of a whole batch (one loss mask per trajectory). Pass it to every micro-batch's
    `policy_loss` so their losses and gradients add up to the batch's, however it is split."""
    num_tokens = sum(int(sum(m)) for m in loss_masks)
    num_sequences = sum(1 for m in loss_masks if any(m))
    return _normaliser(num_tokens, num_sequences, config)


def aggregate(
    per_token_loss: torch.Tensor,
    mask: torch.Tensor,
    seq: torch.Tensor,
    mode: str,
    normaliser: float,
) -> torch.Tensor:
    """Sum of the sampled tokens' losses / normaliser, each token first divided by its sequence's
    length in "seq-mean-token-mean" (GRPO). The other modes differ only in the normaliser:
    token-mean (DAPO) tokens, seq-mean-token-sum-norm (Dr.GRPO) sequences x L, constant (CWM) L."""
    if mode not in AGGREGATIONS:
        raise ValueError(f"mode must be one of {AGGREGATIONS}, got {mode!r}")
    x = torch.where(mask, per_token_loss, torch.zeros_like(per_token_loss))
    if mode == "seq-mean-token-mean":
        count = _per_sequence_sum(mask.to(x.dtype), seq)
        x = x / count.clamp(min=1)[seq]
    return x.sum() / normaliser


# -- the loss --------------------------------------------------------------------------------------


def policy_loss(
    logprobs: torch.Tensor,
    behaviour_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    loss_mask: torch.Tensor,
    config: LossConfig,
    *,
    old_logprobs: torch.Tensor | None = None,
    ref_logprobs: torch.Tensor | None = None,
    seq_ids: torch.Tensor | None = None,
    normaliser: float | None = None,
    entropy: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """The loss of one (micro-)batch and its metrics (layouts: see the module docstring).

    loss = sum_t w_t (TIS_t * clip-loss_t + beta * KL_t) / normaliser over sampled tokens, with
    w_t = 1 / |o_i| in seq-mean-token-mean and 1 otherwise. `normaliser` None computes it from
    this call's tokens; a whole-batch value (`loss_normaliser`) makes the losses and gradients of
    micro-batches that split the batch along sequences add up exactly to the batch's.
    The ratio is against `behaviour_logprobs`, or against `old_logprobs` when TIS is on (module
    docstring). `entropy` (per token, optional) is only reported."""
    shape = logprobs.shape
    named = {
        "behaviour_logprobs": behaviour_logprobs,
        "advantages": advantages,
        "loss_mask": loss_mask,
        "old_logprobs": old_logprobs,
        "ref_logprobs": ref_logprobs,
        "entropy": entropy,
    }
    for name, value in named.items():
        if value is not None and value.shape != shape:
            raise ValueError(f"{name} has shape {tuple(value.shape)}, logprobs {tuple(shape)}")
    if config.tis_cap is not None and old_logprobs is None:
        raise ValueError("loss.tis_cap is set: pass old_logprobs (the learner's, before the step)")
    if config.kl_estimator != "off" and ref_logprobs is None:
        raise ValueError(f"loss.kl_estimator is {config.kl_estimator!r}: pass ref_logprobs")
    dtype = logprobs.dtype
    mask = loss_mask.bool()
    behaviour = behaviour_logprobs.to(dtype)
    # padding may hold anything: zero it so no inf / nan reaches a product (or its gradient)
    advantages = torch.where(mask, advantages.to(dtype), torch.zeros_like(logprobs))
    seq = sequence_index(shape, seq_ids).to(logprobs.device)
    old = None if old_logprobs is None else old_logprobs.to(dtype).detach()
    anchor = behaviour if config.tis_cap is None else old

    if config.ratio_level == "sequence":
        ratio = gspo_ratio(logprobs, anchor, mask, seq)
    else:
        ratio = torch.exp(log_ratio(logprobs, anchor, mask))
    per_token = clipped_surrogate(
        ratio, advantages, config.eps_low, config.eps_high, config.dual_clip
    )
    tis = None
    if config.tis_cap is not None:
        tis = tis_weights(old, behaviour, config.tis_cap, mask)
        per_token = per_token * tis
    kl = None
    if config.kl_estimator != "off":
        kl = kl_penalty(logprobs, ref_logprobs.to(dtype), config.kl_estimator, mask)
        per_token = per_token + config.kl_coef * kl
    if normaliser is None:
        num_sequences = int((_per_sequence_sum(mask.to(dtype), seq) > 0).sum())
        normaliser = _normaliser(int(mask.sum()), num_sequences, config)
    loss = aggregate(per_token, mask, seq, config.aggregation, normaliser)
    metrics = _metrics(loss, ratio, advantages, logprobs, behaviour, mask, seq, config, kl, tis)
    if mask.any():
        if old is not None:  # the trainer/sampler mismatch proper (same weights, two engines)
            diff = (old - behaviour)[mask].abs()
            metrics["old_logprob_diff_mean"] = float(diff.double().mean())
            metrics["old_logprob_diff_max"] = float(diff.max())
        if entropy is not None:
            metrics["entropy"] = float(entropy.detach()[mask].double().mean())
    return loss, metrics


def _metrics(loss, ratio, advantages, logprobs, behaviour, mask, seq, config, kl, tis):
    """Per-call metrics as floats: token means, maxima, minima and the additive counts."""
    with torch.no_grad():
        n = mask.sum()
        out: dict[str, torch.Tensor] = {
            "loss": loss.detach(),
            "tokens": n.to(loss.dtype),
            "sequences": (_per_sequence_sum(mask.to(loss.dtype), seq) > 0).sum().to(loss.dtype),
        }
        if int(n) > 0:
            r, a = ratio.detach()[mask], advantages[mask]
            diff = (logprobs.detach() - behaviour)[mask].abs()
            out |= {
                "clip_frac_low": ((a < 0) & (r < 1 - config.eps_low)).double().mean(),
                "clip_frac_high": ((a > 0) & (r > 1 + config.eps_high)).double().mean(),
                "ratio_mean": r.mean(),
                "ratio_max": r.max(),
                "ratio_min": r.min(),
                "logprob_diff_mean": diff.mean(),
                "logprob_diff_max": diff.max(),
                "advantage_mean": a.mean(),
            }
            if config.dual_clip is not None:
                out["dual_clip_frac"] = ((a < 0) & (r > config.dual_clip)).double().mean()
            if kl is not None:
                out["kl"] = kl.detach()[mask].mean()
            if tis is not None:
                out["tis_weight_mean"] = tis[mask].mean()
                out["tis_clip_frac"] = (tis[mask] >= config.tis_cap).double().mean()
        values = torch.stack([v.to(torch.float64) for v in out.values()]).tolist()
    return dict(zip(out.keys(), values))


def packed_policy_loss(
    logprobs: torch.Tensor,
    micro_batch: Any,
    config: LossConfig,
    normaliser: float | None = None,
    entropy: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """`policy_loss` on a packed rl.packing.MicroBatch (per-position [1, T] tensors; `logprobs`
    [T] or [1, T]), with its `old_logprobs` / `ref_logprobs` when set."""
    flat = lambda x: None if x is None else x.reshape(-1)  # noqa: E731
    return policy_loss(
        flat(logprobs),
        flat(micro_batch.behaviour_logprobs),
        flat(micro_batch.advantages),
        flat(micro_batch.loss_mask),
        config,
        old_logprobs=flat(micro_batch.old_logprobs),
        ref_logprobs=flat(micro_batch.ref_logprobs),
        seq_ids=flat(micro_batch.seq_index),
        normaliser=normaliser,
        entropy=flat(entropy),
    )


class MetricSums:
    """Exact aggregation of `policy_loss` metrics over micro-batches and ranks: "loss", "tokens"
    and "sequences" add up, "*_max" / "*_min" take the max / min, the rest are token-weighted."""

    ADDITIVE = ("loss", "tokens", "sequences")

    def __init__(self) -> None:
        self.sums: dict[str, float] = {}
        self.maxima: dict[str, float] = {}
        self.minima: dict[str, float] = {}

    def add(self, metrics: dict[str, float]) -> None:
        tokens = metrics.get("tokens", 0.0)
        for key, value in metrics.items():
            if key.endswith("_max"):
                self.maxima[key] = max(self.maxima.get(key, value), value)
            elif key.endswith("_min"):
                self.minima[key] = min(self.minima.get(key, value), value)
            else:
                weight = 1.0 if key in self.ADDITIVE else tokens
                self.sums[key] = self.sums.get(key, 0.0) + value * weight

    def reduce(self, world_size: int = 1) -> dict[str, float]:
        """The aggregated metrics; with world_size > 1 (torch.distributed initialised), over all
        ranks (every rank must call it)."""
        parts = [(self.sums, self.maxima, self.minima)]
        if world_size > 1 and torch.distributed.is_initialized():
            parts = [None] * world_size
            torch.distributed.all_gather_object(parts, (self.sums, self.maxima, self.minima))
        total = MetricSums()
        for sums, maxima, minima in parts:
            for key, value in sums.items():
                total.sums[key] = total.sums.get(key, 0.0) + value
            for key, value in maxima.items():
                total.maxima[key] = max(total.maxima.get(key, value), value)
            for key, value in minima.items():
                total.minima[key] = min(total.minima.get(key, value), value)
        tokens = total.sums.get("tokens", 0.0)
        out = {k: v if k in self.ADDITIVE else v / max(tokens, 1.0) for k, v in total.sums.items()}
        return out | total.maxima | total.minima
