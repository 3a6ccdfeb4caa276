"""Context parallelism (rl/context_parallel.py): one packed row split over 2 and 4 gloo ranks gives
the single-rank log-probs, GRPO loss and parameter gradients (summed over the group); sliding
layers move only the keys their window reaches; full layers stream earlier chunks down the ring,
holding at most two at once; the config key is checked against num_learners.

The row: a tiny CWM with the 3:1 pattern (layers full, sliding, sliding, sliding), a window of 4,
and four documents of 3, 24, 4 and 8 tokens (39, padded to 40): on 4 ranks (chunks of 10) the
second document spans ranks 0-2, so rank 2's full-attention layer reaches two ranks back, and
document boundaries fall inside chunks; on 2 ranks (chunks of 20) it straddles the boundary."""

from __future__ import annotations

import socket
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from model.cwm import CWM, CWMConfig
from model.loader import ModelSpec
from rl import grpo
from rl.config import load_config
from rl.context_parallel import (
    ContextParallelAttention,
    Transfer,
    block_attention,
    block_attention_backward,
    kv_transfers,
    pad_positions,
    repeat_kv_heads,
    split_micro_batch,
    sum_kv_heads,
)
from rl.learner import (
    Learner,
    LearnerConfig,
    OptimConfig,
    context_parallel_logprobs,
    token_logprobs,
    trained_positions,
)
from rl.packing import build_micro_batch
from rl.schema import ConfigError
from rl.types import TrainBatch, Trajectory

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
DOCS = [3, 24, 4, 8]
WINDOW = 4
TEMPERATURE = 0.7
HEAD_CHUNK = 4  # lm_head in chunks, recomputed in backward: the learner's path
LOSSES = {
    "gspo": grpo.LossConfig(  # sequence-level ratio and mean: terms that span chunks
        advantage="std", ratio_level="sequence", aggregation="seq-mean-token-mean",
        eps_low=0.2, eps_high=0.2,
    ),
    "cwm-constant": grpo.LossConfig(aggregation="constant", norm_length=32),
}  # fmt: skip
TIMEOUT_S = 120
# fp32: the sharded side adds the same terms in another order (masked SDPA over the received and
# local keys vs per-document SDPA; gradients summed over ranks)
LOSS_ATOL = 1e-6
GRAD_ATOL, GRAD_RTOL = 1e-5, 1e-4


def tiny_config() -> CWMConfig:
    return CWMConfig.preset("tiny", sliding_window=WINDOW)


def model_and_row():
    """The same model and packed row in every process (fixed seeds)."""
    torch.manual_seed(0)
    model = CWM(tiny_config())
    model.init_weights(std=0.1)
    g = torch.Generator().manual_seed(1)
    tokens = [torch.randint(3, 256, (n,), generator=g).tolist() for n in DOCS]
    masks = [[int(i >= 1 and (i * 7 + d) % 3 != 0) for i in range(n)] for d, n in enumerate(DOCS)]
    advantages = [[a] * n for a, n in zip([1.0, -0.5, 0.25, -1.0], DOCS)]
    mb = build_micro_batch(list(range(len(DOCS))), tokens, masks, masks, advantages)
    # behaviour log-probs within 0.15 nats of the policy's: ratios near 1, so the clip binds on
    # some tokens only and every document has a gradient
    with torch.no_grad():
        lp, _ = token_logprobs(model, mb, TEMPERATURE, HEAD_CHUNK)
    mb.behaviour_logprobs = lp[None] + (torch.rand(lp.shape, generator=g) - 0.5) * 0.3
    return model, mb


def loss_and_grads(model, mb, lp, loss_config):
    loss, _ = grpo.packed_policy_loss(lp, mb, loss_config, normaliser=None)
    model.zero_grad(set_to_none=True)
    loss.backward()
    return loss.detach(), {k: p.grad.clone() for k, p in model.named_parameters()}


def received_keys(model, mb, group) -> tuple[dict[bool, int], int, torch.Tensor]:
    """Key positions one forward receives, summed over layers ({sliding?: count}), the most a
    full layer held at once, and this rank's chunk's log-probs."""
    part, positions = split_micro_batch(mb, dist.get_rank(group), dist.get_world_size(group))
    attention = ContextParallelAttention(positions, WINDOW, group)
    with torch.no_grad():
        lp, _ = token_logprobs(model, part, TEMPERATURE, HEAD_CHUNK, attention=attention)
    return attention.received, attention.held, lp


def one_document_row(model):
    """A row that is one document of 40 tokens: every chunk's full layers need all earlier ones."""
    tokens = torch.randint(3, 256, (40,), generator=torch.Generator().manual_seed(3)).tolist()
    return build_micro_batch([0], [tokens], [[1] * 40], [[1] * 40], [[1.0] * 40])


def _rank(rank: int, world: int, init: str, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    group = dist.group.WORLD
    result = {}
    for name, loss_config in LOSSES.items():
        model, mb = model_and_row()
        lp, _ = token_logprobs(model, mb, TEMPERATURE, HEAD_CHUNK, trained_positions(mb))
        want_loss, want_grads = loss_and_grads(model, mb, lp, loss_config)
        lp_cp, _ = context_parallel_logprobs(
            model, mb, group, WINDOW, TEMPERATURE, HEAD_CHUNK, trained_only=True
        )
        loss, grads = loss_and_grads(model, mb, lp_cp, loss_config)
        for g in grads.values():  # what the learner's FSDP reduction does (sum over the group)
            dist.all_reduce(g)
        result[name] = dict(
            received=received_keys(model, mb, group)[0],
            lp=(lp_cp.detach() - lp.detach()).abs().max().item(),
            loss=(loss - want_loss).abs().item(),
            want_loss=want_loss.item(),
            grads={k: (grads[k], want_grads[k]) for k in grads},
        )
    model, _ = model_and_row()
    row = one_document_row(model)
    with torch.no_grad():
        want, _ = token_logprobs(model, row, TEMPERATURE, HEAD_CHUNK)
    received, held, lp = received_keys(model, row, group)
    chunk = 40 // world
    want = want[rank * chunk : (rank + 1) * chunk]
    result["one_document"] = dict(received=received, held=held, lp=(lp - want).abs().max().item())
    torch.save(result, f"{out}/rank{rank}.pt")
    dist.destroy_process_group()


def _free_address() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"tcp://127.0.0.1:{s.getsockname()[1]}"


def _join(ranks, world: int) -> None:
    deadline = time.monotonic() + TIMEOUT_S
    while not ranks.join(timeout=0.5):  # raises if a rank failed
        if time.monotonic() > deadline:
            for process in ranks.processes:
                process.kill()
            pytest.fail(f"{world} ranks did not finish in {TIMEOUT_S} s")


def run_ranks(world: int, out: str) -> list[dict]:
    ranks = mp.start_processes(
        _rank, args=(world, _free_address(), out), nprocs=world, join=False, start_method="spawn"
    )
    _join(ranks, world)
    return [torch.load(f"{out}/rank{r}.pt", weights_only=False) for r in range(world)]


@pytest.mark.parametrize("world", [2, 4])
def test_sharded_row_gives_the_single_rank_loss_and_gradients(world, tmp_path):
    results = run_ranks(world, str(tmp_path))
    chunk = -(-sum(DOCS) // world)
    starts = [0, 3, 27, 31, 39]  # of the documents (the last one: the padding)
    for rank, result in enumerate(results):
        # a sliding layer (3 of 4) receives the window's 3 keys before the chunk, a full one
        # every key back to the start of the document the chunk begins in
        doc_start = max(s for s in starts if s <= rank * chunk)
        sliding = 3 * min(WINDOW - 1, rank * chunk - doc_start)
        assert result["gspo"]["received"] == {True: sliding, False: rank * chunk - doc_start}
        # one document across the row: a full layer streams every earlier chunk through, holding
        # at most two of them at once (the one attended to and the next), not all rank * chunk
        one = result.pop("one_document")
        assert one["received"] == {True: 3 * min(WINDOW - 1, rank * chunk), False: rank * chunk}
        assert one["held"] == min(rank, 2) * chunk, (rank, one["held"])
        assert one["lp"] < 1e-5, (rank, one["lp"])
        for name, r in result.items():
            what = f"{world} ranks, rank {rank}, {name}"
            assert r["lp"] < 1e-5, what
            assert r["loss"] < LOSS_ATOL, f"{what}: loss {r['want_loss']} off by {r['loss']}"
            grads = r["grads"]
            scale = max(float(want.abs().max()) for _, want in grads.values())
            assert scale > 0
            for k, (got, want) in grads.items():
                torch.testing.assert_close(
                    got, want, atol=GRAD_ATOL * scale, rtol=GRAD_RTOL, msg=f"{what} {k}"
                )


# -- the Learner: 4 FSDP2 ranks, 2 context-parallel groups of 2, against one plain rank ------------

SPEC = ModelSpec(path="preset:tiny", overrides={"sliding_window": WINDOW})
LR = 1e-4
LEARNER_DOCS = [30, 9, 24, 12]  # budget 40: two rows (30 + 9, 24 + 12), one per group


def learner_config(cp: int) -> LearnerConfig:
    return LearnerConfig(
        optim=OptimConfig(lr=LR), loss=LOSSES["gspo"], micro_batch_tokens=40,
        temperature=TEMPERATURE, logprob_chunk=HEAD_CHUNK, context_parallel_size=cp,
        activation_checkpointing=cp > 1,  # the exchange runs again in the backward's recompute
    )  # fmt: skip


def learner_batch(policy: Learner) -> TrainBatch:
    """Trajectories whose behaviour log-probs are within 0.15 nats of the initial policy's."""
    g = torch.Generator().manual_seed(2)
    trajs = []
    for i, n in enumerate(LEARNER_DOCS):
        mask = [int(t >= 4 and (t + i) % 4 != 0) for t in range(n)]
        tokens = torch.randint(3, 256, (n,), generator=g).tolist()
        trajs.append(Trajectory(
            task_id=str(i), env="test", group_id=str(i // 2), tokens=tokens, loss_mask=mask,
            logprobs=[0.0] * n, versions=[0 if m else -1 for m in mask], prompt_len=4, reward=0.0,
        ))  # fmt: skip
    for traj, lp in zip(trajs, policy.compute_logprobs(trajs)):
        noise = (torch.rand(len(lp), generator=g) - 0.5) * 0.3
        traj.logprobs = [x + float(e) if m else 0.0 for x, e, m in zip(lp, noise, traj.loss_mask)]
    advantages = [[a * m for m in t.loss_mask] for a, t in zip([1.0, -1.0, 0.5, -0.5], trajs)]
    return TrainBatch(trajs, advantages)


def learner_step(learner: Learner, batch: TrainBatch) -> dict:
    logprobs = learner.compute_logprobs(batch.trajectories)
    metrics = learner.train_step(batch)
    return dict(metrics=metrics, logprobs=logprobs, weights=learner.hf_state_dict())


def _learner_rank(rank: int, world: int, init: str, batch: TrainBatch, out: str) -> None:
    learner = Learner(learner_config(2), SPEC, rank, world, init, num_threads=1)
    result = learner_step(learner, batch)
    if rank == 0:
        torch.save(result, f"{out}/learner.pt")
    learner.shutdown()


@pytest.mark.slow  # ~25 s on 2 idle cores
def test_learner_with_context_parallel_groups_takes_the_single_rank_step(tmp_path):
    single = Learner(learner_config(1), SPEC)
    batch = learner_batch(single)
    want = learner_step(single, batch)
    ranks = mp.start_processes(
        _learner_rank, args=(4, _free_address(), batch, str(tmp_path)), nprocs=4, join=False,
        start_method="spawn",
    )  # fmt: skip
    _join(ranks, 4)
    got = torch.load(f"{tmp_path}/learner.pt", weights_only=False)
    for a, b in zip(got["logprobs"], want["logprobs"]):
        torch.testing.assert_close(torch.tensor(a), torch.tensor(b), atol=1e-5, rtol=0)
    m, w = got["metrics"], want["metrics"]
    assert m["micro_batches"] == w["micro_batches"] == 2
    for key in ("loss", "tokens", "sequences", "grad_norm", "ratio_mean"):
        assert m[key] == pytest.approx(w[key], rel=1e-5, abs=1e-7), key
    # one AdamW step moves each weight by about lr; rounding moves it by a few % of that where a
    # gradient element is near AdamW's eps (tests/test_grad_parity.py)
    for k, v in want["weights"].items():
        torch.testing.assert_close(got["weights"][k], v, atol=5e-2 * LR, rtol=0, msg=k)


@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_blocks_merged_by_log_sum_exp_are_the_whole_attention(fused, dtype):
    """What the ring does with its blocks, against SDPA over all keys: 7 queries over an earlier
    block of 5 keys (unmasked) and their own 7 (causal), GQA heads (4 query, 2 key/value). The
    outputs merged by log-sum-exp equal the whole attention, and each block's backward, given the
    whole output and log-sum-exp, gives gradients that add up to the whole's."""
    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, 4, 7, 8, generator=g, dtype=dtype, requires_grad=True)
    k, v = (torch.randn(1, 2, 12, 8, generator=g, dtype=dtype, requires_grad=True) for _ in "kv")
    mask = torch.ones(7, 12, dtype=torch.bool)
    mask[:, 5:] = torch.ones(7, 7, dtype=torch.bool).tril()
    want = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
    dout = torch.randn(want.shape, generator=g, dtype=dtype)
    want_grads = torch.autograd.grad(want, (q, k, v), dout)
    tol = dict(atol=1e-12, rtol=1e-10) if dtype == torch.float64 else dict(atol=2e-6, rtol=1e-5)
    with torch.no_grad():
        blocks = [(repeat_kv_heads(k[:, :, keys], 4), repeat_kv_heads(v[:, :, keys], 4), causal)
                  for keys, causal in ((slice(0, 5), False), (slice(5, 12), True))]  # fmt: skip
        (o1, l1), (o2, l2) = (block_attention(q, kb, vb, c, fused) for kb, vb, c in blocks)
        lse = torch.logaddexp(l1, l2)
        out = o1 * (l1 - lse).exp()[..., None] + o2 * (l2 - lse).exp()[..., None]
        torch.testing.assert_close(out, want, **tol)
        grads = [block_attention_backward(dout, q, kb, vb, out, lse, c, fused)
                 for kb, vb, c in blocks]  # fmt: skip
    torch.testing.assert_close(grads[0][0] + grads[1][0], want_grads[0], **tol)
    for i in (1, 2):  # keys, values: the blocks' parts, GQA heads summed
        got = sum_kv_heads(torch.cat([grads[0][i], grads[1][i]], dim=2), 2)
        torch.testing.assert_close(got, want_grads[i], **tol)


def test_the_tolerances_tell_a_window_one_key_short():
    """A window of 3 instead of 4 (what dropping one received key per sliding layer would do at
    chunk starts) moves the log-probs far beyond the parity tolerances."""
    model, mb = model_and_row()
    with torch.no_grad():
        lp, _ = token_logprobs(model, mb, TEMPERATURE, HEAD_CHUNK)
        narrower = CWM(tiny_config())
        narrower.load_state_dict(model.state_dict())
        narrower.config.sliding_window = WINDOW - 1
        lp_bad, _ = token_logprobs(narrower, mb, TEMPERATURE, HEAD_CHUNK)
    assert (lp - lp_bad).abs().max() > 1e-3


def test_sliding_layers_fetch_only_the_window_and_full_layers_the_document():
    positions = pad_positions(torch.cat([torch.arange(n) for n in DOCS])[None], 4)  # 40, C = 10
    # a window of 4 needs the previous 3 keys: a suffix of rank r-1's chunk
    assert kv_transfers(positions, 4, WINDOW) == [
        Transfer(src=0, dst=1, start=7, length=3),
        Transfer(src=1, dst=2, start=7, length=3),
        Transfer(src=2, dst=3, start=7, length=3),
    ]
    # full attention: back to the start of the document each chunk begins in (3, 3, 27)
    assert kv_transfers(positions, 4, None) == [
        Transfer(src=0, dst=1, start=3, length=7),
        Transfer(src=0, dst=2, start=3, length=7),
        Transfer(src=1, dst=2, start=0, length=10),
        Transfer(src=2, dst=3, start=7, length=3),
    ]
    # ... or less, where the document starts within the window (at 12 here)
    late_start = torch.cat([torch.arange(12), torch.arange(28)])[None]
    assert kv_transfers(late_start, 2, 10) == [Transfer(src=0, dst=1, start=12, length=8)]
    # a chunk that starts a document needs nothing
    aligned = torch.cat([torch.arange(10), torch.arange(10)])[None]
    assert kv_transfers(aligned, 2, WINDOW) == [] and kv_transfers(aligned, 2, None) == []
    # a window longer than a chunk reaches two ranks back, and no further
    one_doc = torch.arange(40)[None]
    assert kv_transfers(one_doc, 4, 15)[-2:] == [
        Transfer(src=1, dst=3, start=6, length=4),
        Transfer(src=2, dst=3, start=0, length=10),
    ]


def test_split_pads_with_a_document_of_its_own_and_no_loss():
    _, mb = model_and_row()
    parts = [split_micro_batch(mb, r, 4)[0] for r in range(4)]
    assert all(p.num_tokens == 10 for p in parts)
    whole = lambda name: torch.cat([getattr(p, name) for p in parts], dim=1)  # noqa: E731
    assert torch.equal(whole("input_ids")[:, :39], mb.input_ids)
    assert torch.equal(whole("loss_mask")[:, :39], mb.loss_mask)
    assert not whole("loss_mask")[0, 39] and whole("position_ids")[0, 39] == 0


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["num_learners=3", "learner.context_parallel_size=2"], "learner.context_parallel_size"),
        (["learner.context_parallel_size=0"], "learner.context_parallel_size"),
        (
            ["num_learners=2", "learner.context_parallel_size=2", "learner.backend=deepspeed"],
            "learner.context_parallel_size",
        ),
    ],
)
def test_context_parallel_size_is_checked_against_num_learners(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(CONFIGS / "tiny_math.yaml", overrides)


def test_context_parallel_size_dividing_num_learners_is_accepted():
    cfg = load_config(
        CONFIGS / "tiny_math.yaml", ["num_learners=4", "learner.context_parallel_size=2"]
    )
    assert cfg.learner.context_parallel_size == 2
    assert load_config(CONFIGS / "tiny_math.yaml").learner.context_parallel_size == 1
