"""Gradient parity (issue 13 §1): the learner's loss, full parameter gradient, clipped gradient and
AdamW steps, on 1 rank (fp32 on one rank is the plain module, no FSDP: rl/learner.py) and on 2
FSDP2 ranks (gloo, spawned processes), for three micro-batch budgets, against a reference written
here from the papers' equations on transformers' CwmForCausalLM: one sequence at a time, no
packing, nothing from rl/grpo.py or rl/packing.py (the learner's side builds its batch with
grpo.build_train_batch, as a run does).

The batch: four groups of uneven lengths (one all-equal-reward group, one with a truncated
trajectory at the max context, one with an env_error member), a two-turn trajectory with a tool
result in between, behaviour log-probs up to 0.5 nats off the current policy's (so ratios != 1 and
the clip binds on some tokens), sampling temperature 0.7."""

from __future__ import annotations

import dataclasses
import math
import socket
import statistics
import time

import pytest
import torch
import torch.multiprocessing as mp

from model.hf import hf_name
from model.loader import ModelSpec
from rl import grpo
from rl.grpo import LossConfig
from rl.learner import Learner, LearnerConfig, OptimConfig
from rl.types import Trajectory

TEMPERATURE = 0.7
MAX_CONTEXT = 32  # the longest trajectory (the truncated one): L of Dr.GRPO and CWM
TOOL_RESULT = 3  # tokens of a tool result between two sampled turns
STEPS = 2  # the second AdamW step starts from a non-zero optimizer state (betas matter)
BUDGETS = (10_000, 40, 1)  # one micro-batch; a few; one trajectory each (a bin of its own)
TWO_RANKS_TIMEOUT_S = 300

# (group, reward, status, prompt tokens, sampled turns)
SPECS = [
    ("a", 1.0, "ok", 4, [9]),
    ("a", 0.0, "ok", 6, [3]),
    ("a", 0.5, "ok", 3, [5, 4]),  # two turns, a tool result between them
    ("a", 0.0, "ok", 5, [12]),
    ("b", 1.0, "ok", 4, [7]),
    ("b", 0.0, "truncated", 5, [27]),  # hit the max context: trained on like any other
    ("b", 1.0, "ok", 3, [2]),
    ("c", 0.3, "ok", 4, [6]),  # all rewards equal: advantage exactly 0
    ("c", 0.3, "ok", 5, [10]),
    ("c", 0.3, "ok", 3, [4]),
    ("d", None, "env_error", 4, [8]),  # reward unavailable: left out of the loss and the mean
    ("d", 1.0, "ok", 6, [11]),
    ("d", 0.0, "ok", 4, [5]),
]

CASES = {  # name -> the learner's loss config (defaults: mean advantage, eps 0.2 / 0.25)
    "cwm-constant": LossConfig(aggregation="constant", norm_length=MAX_CONTEXT),
    "dapo-token-mean": LossConfig(aggregation="token-mean", eps_high=0.28),
    "grpo-seq-mean-std": LossConfig(advantage="std", aggregation="seq-mean-token-mean"),
    "drgrpo-seq-sum-norm": LossConfig(
        aggregation="seq-mean-token-sum-norm", norm_length=MAX_CONTEXT
    ),
    "gspo": LossConfig(  # the GSPO paper's clip range and its sequence mean
        advantage="std",
        ratio_level="sequence",
        aggregation="seq-mean-token-mean",
        eps_low=3e-4,
        eps_high=4e-4,
    ),
}


def learner_config(loss: LossConfig, budget: int) -> LearnerConfig:
    # the learner's default optimizer (CWM's recipe: lr 1e-6, betas 0.9 / 0.95, eps 1e-8, weight
    # decay 0.1, clip 1.0) with a larger lr, so one step moves weights by many fp32 ulps
    return LearnerConfig(
        optim=OptimConfig(lr=1e-4),
        loss=loss,
        micro_batch_tokens=budget,
        temperature=TEMPERATURE,
        logprob_chunk=16,  # several lm_head chunks per micro-batch
    )


# -- the model and the batch -----------------------------------------------------------------------


def hf_model(path=None):
    """A tiny CwmForCausalLM (2 layers: full then sliding attention, window 6), random weights
    (norms too), or loaded from `path`."""
    from transformers import CwmConfig, CwmForCausalLM

    if path is not None:
        return CwmForCausalLM.from_pretrained(path, dtype=torch.float32)
    torch.manual_seed(0)
    cfg = CwmConfig(
        vocab_size=256,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        sliding_window=6,
        max_position_embeddings=256,
        rope_parameters={
            "rope_theta": 10000.0,
            "factor": 4.0,
            "high_freq_factor": 4.0,
            "low_freq_factor": 1.0,
            "original_max_position_embeddings": 16,
            "rope_type": "llama3",
        },
        bos_token_id=1,
        eos_token_id=2,
    )
    model = CwmForCausalLM(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    return model


def reference_logprobs(model, tokens: list[int], temperature: float = TEMPERATURE) -> torch.Tensor:
    """log pi(x_t | x_<t) for t = 1..n-1 of one sequence, of logits / temperature."""
    ids = torch.tensor([tokens])
    logits = model(ids).logits[0, :-1].float()
    return torch.log_softmax(logits / temperature, -1).gather(-1, ids[0, 1:, None])[:, 0]


def make_trajectories(model) -> list[Trajectory]:
    g = torch.Generator().manual_seed(1)
    trajs = []
    for group, reward, status, prompt, turns in SPECS:
        tokens = torch.randint(0, 256, (prompt,), generator=g).tolist()
        mask = [0] * prompt
        for j, n in enumerate(turns):
            if j:
                tokens += torch.randint(0, 256, (TOOL_RESULT,), generator=g).tolist()
                mask += [0] * TOOL_RESULT
            tokens += torch.randint(0, 256, (n,), generator=g).tolist()
            mask += [1] * n
        # behaviour log-probs: the current policy's moved by up to +-0.5 nats (a stale sampler)
        with torch.no_grad():
            current = [0.0] + reference_logprobs(model, tokens).tolist()
        shift = (torch.rand(len(tokens), generator=g) - 0.5).tolist()
        logprobs = [min(0.0, lp + d) if m else 0.0 for lp, d, m in zip(current, shift, mask)]
        trajs.append(
            Trajectory(
                task_id=group,
                env="synthetic",
                group_id=group,
                tokens=tokens,
                loss_mask=mask,
                logprobs=logprobs,
                versions=[0 if m else -1 for m in mask],
                prompt_len=prompt,
                reward=reward,
                status=status,
            ).validate()
        )
    assert max(len(t.tokens) for t in trajs) == MAX_CONTEXT
    return trajs


# -- the reference: textbook GRPO, one sequence at a time ------------------------------------------


def reference_advantages(trajs: list[Trajectory], cfg: LossConfig) -> list[float | None]:
    """A_i = r_i - mean of its group (CWM, Dr.GRPO), or that / (sample std + eps) (GRPO, GSPO);
    None for a trajectory without a reward (left out of the loss and of its group's mean)."""
    groups: dict[str, list[float]] = {}
    for t in trajs:
        if t.reward is not None:
            groups.setdefault(t.group_id, []).append(t.reward)
    out: list[float | None] = []
    for t in trajs:
        if t.reward is None:
            out.append(None)
            continue
        rewards = groups[t.group_id]
        a = t.reward - statistics.mean(rewards)
        if cfg.advantage == "std":
            a /= statistics.stdev(rewards) + cfg.std_eps
        out.append(a)
    return out


def reference_loss(
    model, trajs, advantages, cfg: LossConfig, temperature: float = TEMPERATURE
) -> tuple[torch.Tensor, dict[str, int]]:
    """The batch's loss (with a graph to the model's weights) and clip counts.

    Per token (GRPO / PPO, DAPO's asymmetric clip): l_t = -min(r_t A, clip(r_t, 1 - eps_low,
    1 + eps_high) A), r_t = pi(o_t) / mu(o_t). GSPO: every r_t is the sequence's
    s_i = exp(mean_t log(pi / mu)). Aggregation over the G sequences (o_i their sampled tokens, L
    the max context): token-mean sum_i sum_t l / sum_i |o_i| (DAPO); seq-mean-token-mean
    1/G sum_i 1/|o_i| sum_t l (GRPO, GSPO); seq-mean-token-sum-norm 1/G sum_i sum_t l / L
    (Dr.GRPO); constant sum_i sum_t l / L (CWM)."""
    per_seq, counts = [], {"tokens": 0, "clip_low": 0, "clip_high": 0, "free": 0}
    for t, a in zip(trajs, advantages):
        if a is None:
            continue
        sampled = torch.tensor(t.loss_mask[1:], dtype=torch.bool)
        logp = reference_logprobs(model, t.tokens, temperature)[sampled]
        mu = torch.tensor(t.logprobs[1:], dtype=torch.float32)[sampled]
        if cfg.ratio_level == "sequence":
            ratio = torch.exp((logp - mu).mean()).expand(len(logp))
        else:
            ratio = torch.exp(logp - mu)
        clipped = ratio.clamp(1 - cfg.eps_low, 1 + cfg.eps_high)
        per_seq.append(-torch.minimum(ratio * a, clipped * a))
        r = ratio.detach()
        low, high = (a < 0) & (r < 1 - cfg.eps_low), (a > 0) & (r > 1 + cfg.eps_high)
        counts["tokens"] += len(r)
        counts["clip_low"] += int(low.sum())
        counts["clip_high"] += int(high.sum())
        counts["free"] += int(((a != 0) & ~low & ~high).sum())  # tokens the gradient reaches
    G, L = len(per_seq), cfg.norm_length
    if cfg.aggregation == "token-mean":
        total = sum(x.sum() for x in per_seq) / sum(len(x) for x in per_seq)
    elif cfg.aggregation == "seq-mean-token-mean":
        total = sum(x.mean() for x in per_seq) / G
    elif cfg.aggregation == "seq-mean-token-sum-norm":
        total = sum(x.sum() / L for x in per_seq) / G
    else:
        assert cfg.aggregation == "constant"
        total = sum(x.sum() for x in per_seq) / L
    return total, counts


def clip_by_global_norm(grads: dict, max_norm: float) -> tuple[dict, float, float]:
    """g * min(1, max_norm / (||g|| + 1e-6)), ||g|| over every parameter together (the 1e-6 is
    torch.nn.utils.clip_grad_norm_'s)."""
    norm = math.sqrt(sum(float(g.double().pow(2).sum()) for g in grads.values()))
    coef = min(1.0, max_norm / (norm + 1e-6))
    return {k: g * coef for k, g in grads.items()}, norm, coef


class TextbookAdamW:
    """AdamW (Loshchilov & Hutter 2019) from its equations, decay decoupled as p <- p (1 - lr wd):
    m = b1 m + (1 - b1) g, v = b2 v + (1 - b2) g^2, p -= lr m^ / (sqrt(v^) + eps), with the
    bias corrections m^ = m / (1 - b1^t), v^ = v / (1 - b2^t)."""

    def __init__(self, weights: dict[str, torch.Tensor], optim: OptimConfig):
        self.w = {k: v.detach().clone() for k, v in weights.items()}
        self.m = {k: torch.zeros_like(v) for k, v in self.w.items()}
        self.v = {k: torch.zeros_like(v) for k, v in self.w.items()}
        self.o, self.t = optim, 0

    def step(self, grads: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        (b1, b2), lr = self.o.betas, self.o.lr
        self.t += 1
        for k, g in grads.items():
            self.m[k] = b1 * self.m[k] + (1 - b1) * g
            self.v[k] = b2 * self.v[k] + (1 - b2) * g * g
            m_hat, v_hat = self.m[k] / (1 - b1**self.t), self.v[k] / (1 - b2**self.t)
            self.w[k] = self.w[k] * (1 - lr * self.o.weight_decay)
            self.w[k] = self.w[k] - lr * m_hat / (v_hat.sqrt() + self.o.eps)
        return {k: v.clone() for k, v in self.w.items()}


def reference_run(
    path, trajs, cfg: LearnerConfig, steps: int = STEPS, temperature: float = TEMPERATURE
) -> list[dict]:
    """`steps` optimizer steps of the reference: loss, gradient, global-norm clip, AdamW."""
    model = hf_model(path)
    params = dict(model.named_parameters())
    optimizer = TextbookAdamW(params, cfg.optim)
    advantages = reference_advantages(trajs, cfg.loss)
    out = []
    for _ in range(steps):
        model.zero_grad(set_to_none=True)
        loss, counts = reference_loss(model, trajs, advantages, cfg.loss, temperature)
        loss.backward()
        grads = {k: p.grad.detach().clone() for k, p in params.items()}
        clipped, norm, coef = clip_by_global_norm(grads, cfg.optim.grad_clip)
        weights = optimizer.step(clipped)
        with torch.no_grad():
            for k, p in params.items():
                p.copy_(weights[k])
        out.append(dict(loss=loss.item(), grads=grads, clipped=clipped, grad_norm=norm,
                        clip_coef=coef, weights=weights, counts=counts))  # fmt: skip
    return out


# -- the learner, observed -------------------------------------------------------------------------


class ObservedLearner(Learner):
    """The learner unchanged, plus a record of the gradient it accumulated (before clipping) and
    of the one its optimizer consumed (after clipping, from an optimizer step pre-hook), full
    tensors under HF names (a collective on FSDP: every rank records)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.records: list[dict] = []
        self.optimizer.register_step_pre_hook(lambda opt, a, kw: self._record("clipped"))

    def _record(self, key: str) -> None:
        grads = {}
        for name, p in self.model.named_parameters():
            g = p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad
            grads[hf_name(name.replace("_checkpoint_wrapped_module.", ""))] = g.detach().clone()
        if key == "grads":
            self.records.append({})
        self.records[-1][key] = grads

    def _optimizer_step(self) -> torch.Tensor:
        self._record("grads")
        return super()._optimizer_step()


def learner_run(path, batch, cfg: LearnerConfig, rank=0, world_size=1, init=None) -> list[dict]:
    learner = ObservedLearner(cfg, ModelSpec(path), rank, world_size, init, num_threads=1)
    out = []
    for _ in range(STEPS):
        metrics = learner.train_step(batch)
        record = learner.records[-1]
        weights = {k: v.clone() for k, v in learner.hf_state_dict().items()}  # live on 1 rank
        out.append(dict(record, metrics=metrics, weights=weights))
    return out


def _free_address() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"tcp://127.0.0.1:{s.getsockname()[1]}"


def _two_ranks(rank: int, path: str, batches: dict, init: str, result_file: str) -> None:
    """One of two FSDP2 ranks (a spawned process): every case and budget in one process group;
    rank 0 saves the records."""
    results = {}
    for name, loss in CASES.items():
        for budget in BUDGETS:
            cfg = learner_config(loss, budget)
            results[name, budget] = learner_run(path, batches[name], cfg, rank, 2, init)
    if rank == 0:
        torch.save(results, result_file)
    torch.distributed.destroy_process_group()


# -- tolerances ------------------------------------------------------------------------------------
# fp32 (unit roundoff 6e-8). The two sides add the same terms in different orders (packed rows with
# per-document attention vs one sequence; lm_head in chunks; micro-batch accumulation; FSDP's
# reduce-scatter over ranks; HF's SDPA vs the native attention), each gradient element a sum over
# ~100 tokens x 64-256 features. Measured over every case, split and rank count: |loss diff|
# <= 8e-8, |grad diff| <= 7e-7 x the largest gradient element, grad norm 1.5e-7 relative: the
# bounds below leave > 10x. One detail wrong (temperature, clip range, a trajectory dropped) moves
# the gradient by > 0.5 x its largest element (test_tolerances_tell_a_wrong_loss).
LOSS_ATOL = 1e-6  # the losses here are 0.003-0.07
GRAD_RTOL = 1e-5
GRAD_ATOL = 1e-5  # x the largest element of the reference gradient (for sums that cancel near 0)
# AdamW divides each gradient element by its own magnitude: where |g| ~ eps (1e-8) a rounding
# difference of 1e-10 in g is ~1% of a step (measured max 0.26%). The end-to-end weights allow 5%
# of a step; the optimizer itself is checked to 0.1% of a step (measured 0.0075%) on the gradients
# it consumed.
STEP_ATOL_END_TO_END = 5e-2
STEP_ATOL_OPTIMIZER = 1e-3


def assert_grads_close(got: dict, want: dict, what: str) -> None:
    assert got.keys() == want.keys(), what
    atol = GRAD_ATOL * max(float(g.abs().max()) for g in want.values())
    for k in want:
        torch.testing.assert_close(
            got[k], want[k], rtol=GRAD_RTOL, atol=atol, msg=lambda m, k=k: f"{what} {k}: {m}"
        )


def max_abs_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).abs().max()) for k in a)


# -- fixtures --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """The tiny model's HF directory (both sides load it) and the batch's trajectories."""
    root = tmp_path_factory.mktemp("grad_parity")
    model = hf_model()
    model.save_pretrained(root / "hf")
    return str(root / "hf"), make_trajectories(model), root


@pytest.fixture(scope="module")
def references(setup):
    path, trajs, _ = setup
    return {
        name: reference_run(path, trajs, learner_config(loss, 1)) for name, loss in CASES.items()
    }


@pytest.fixture(scope="module")
def two_rank_runs(setup):
    """Every case and budget on two FSDP2 ranks (gloo), in one spawned pair of processes."""
    path, trajs, root = setup
    result_file = str(root / "two_ranks.pt")
    # each case's batch is built by the learner's own advantage code, as a run does
    batches = {name: grpo.build_train_batch(trajs, loss) for name, loss in CASES.items()}
    ranks = mp.start_processes(
        _two_ranks, args=(path, batches, _free_address(), result_file), nprocs=2, join=False,
        start_method="spawn",
    )  # fmt: skip
    deadline = time.monotonic() + TWO_RANKS_TIMEOUT_S
    while not ranks.join(timeout=1):  # raises if a rank failed
        if time.monotonic() > deadline:
            for process in ranks.processes:
                process.kill()
            pytest.fail(f"two FSDP ranks did not finish in {TWO_RANKS_TIMEOUT_S} s")
    return torch.load(result_file, weights_only=False)


# -- tests -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", CASES)
def test_batch_follows_the_documented_statuses_and_advantages(setup, case):
    """A truncated trajectory trains with its reward like any other; an env_error one is left out
    (and out of its group's mean); an all-equal group gets advantage exactly 0."""
    _, trajs, _ = setup
    loss = CASES[case]
    batch = grpo.build_train_batch(trajs, loss)
    assert batch.num_excluded == 1 and all(t.status != "env_error" for t in batch.trajectories)
    assert [t.status for t in batch.trajectories].count("truncated") == 1
    want = [a for a in reference_advantages(trajs, loss) if a is not None]
    assert len(want) == len(batch.trajectories) == len(SPECS) - 1
    for t, a, row in zip(batch.trajectories, want, batch.advantages):
        sampled = [x for x, m in zip(row, t.loss_mask) if m]
        assert sampled == pytest.approx([a] * len(sampled), rel=1e-12, abs=1e-12)
        assert all(x == 0.0 for x, m in zip(row, t.loss_mask) if not m)
        if t.group_id == "c":
            assert a == 0.0 and set(sampled) == {0.0}
        if t.status == "truncated":
            assert a != 0.0


@pytest.mark.parametrize("budget", BUDGETS)
@pytest.mark.parametrize("ranks", [1, 2])
@pytest.mark.parametrize("case", CASES)
def test_learner_equals_the_reference(setup, references, request, case, ranks, budget):
    path, trajs, _ = setup
    loss = CASES[case]
    cfg = learner_config(loss, budget)
    if ranks == 1:
        runs = learner_run(path, grpo.build_train_batch(trajs, loss), cfg)
    else:
        runs = request.getfixturevalue("two_rank_runs")[case, budget]
    ref = references[case]
    lr = cfg.optim.lr
    optimizer = TextbookAdamW(dict(hf_model(path).named_parameters()), cfg.optim)
    start = {k: v.detach() for k, v in hf_model(path).named_parameters()}
    num_bins = {10_000: 1, 40: None, 1: len(SPECS) - 1}[budget]
    for step, (got, want) in enumerate(zip(runs, ref), 1):
        what = f"{case} on {ranks} rank(s), budget {budget}, step {step}:"
        m = got["metrics"]
        if num_bins is not None:
            assert m["micro_batches"] == num_bins, what
        else:
            assert 2 < m["micro_batches"] < len(SPECS) - 1, what
        # the clip binds on some tokens, and the gradient reaches others; the learner counts alike
        c = want["counts"]
        assert c["clip_low"] > 0 and c["clip_high"] > 0 and c["free"] > 0, (what, c)
        assert m["tokens"] == c["tokens"] and m["sequences"] == len(SPECS) - 1, what
        assert round(m["clip_frac_low"] * c["tokens"]) == c["clip_low"], what
        assert round(m["clip_frac_high"] * c["tokens"]) == c["clip_high"], what
        # loss and the full gradient
        assert abs(m["loss"] - want["loss"]) <= LOSS_ATOL, (what, m["loss"], want["loss"])
        assert_grads_close(got["grads"], want["grads"], f"{what} gradient")
        # the clip: one global norm over every parameter, the same coefficient
        assert m["grad_norm"] == pytest.approx(want["grad_norm"], rel=GRAD_RTOL), what
        assert_grads_close(got["clipped"], want["clipped"], f"{what} clipped gradient")
        # AdamW: on the gradients the learner's optimizer consumed, then end to end
        expected = optimizer.step(got["clipped"])
        assert max_abs_diff(got["weights"], expected) <= STEP_ATOL_OPTIMIZER * lr, what
        assert max_abs_diff(got["weights"], want["weights"]) <= STEP_ATOL_END_TO_END * lr, what
        assert max_abs_diff(got["weights"], start) > 0.9 * lr, what  # the step moved them
        start = got["weights"]


def test_clip_binds_in_some_cases_only(references):
    """The clip is exercised both ways: coefficient < 1 (norm above 1.0) and 1."""
    coefs = {name: runs[0]["clip_coef"] for name, runs in references.items()}
    assert min(coefs.values()) < 0.8 and max(coefs.values()) == 1.0, coefs


def test_tolerances_tell_a_wrong_loss(setup, references):
    """The reference with one detail wrong is far outside the tolerances: the temperature left
    out, a symmetric clip, the truncated trajectory dropped."""
    path, trajs, _ = setup
    name = "cwm-constant"
    cfg = learner_config(CASES[name], 1)
    want = references[name][0]
    scale = max(float(g.abs().max()) for g in want["grads"].values())
    symmetric = dataclasses.replace(cfg, loss=dataclasses.replace(cfg.loss, eps_high=0.2))
    no_truncated = [t for t in trajs if t.status != "truncated"]
    wrong = {
        "temperature 1": reference_run(path, trajs, cfg, steps=1, temperature=1.0),
        "symmetric clip": reference_run(path, trajs, symmetric, steps=1),
        "truncated dropped": reference_run(path, no_truncated, cfg, steps=1),
    }
    for what, (run,) in wrong.items():
        grad_diff = max_abs_diff(run["grads"], want["grads"]) / scale
        assert grad_diff > 100 * GRAD_ATOL, (what, grad_diff)
