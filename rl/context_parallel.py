"""Context parallelism: one packed row split into contiguous chunks over the ranks of a CP group.

Rank r of a group of n holds positions [r*C, (r+1)*C) of the row (padded to n*C with a document of
its own, which no real token attends to). Queries stay where they are; keys and values move. A query
attends only to earlier keys of its own document (and, on a sliding layer, to the last `window`
of those), so rank r needs from its predecessors only the keys from

    lo_r = doc_start(r*C)                               on a full-attention layer,
    lo_r = max(doc_start(r*C), r*C - window + 1)        on a sliding-window layer,

up to its own chunk: a suffix of rank r-1's chunk (and of earlier ranks' only when a document or
the window reaches that far back). `kv_transfers` plans those suffixes; `ExchangeKV` moves them with
point-to-point send/recv and sends their gradients back in backward. Attention then runs on the
local queries over [received keys, local keys] with a mask of global indices (same document,
causal, window), so the forward is the single-rank forward up to summation order.

The log-probs of the chunks are gathered (`gather_chunks`) so every rank of the group computes the
same, whole-row loss; its backward keeps this rank's slice, so the parameter gradients of the group's
ranks add up to the single-rank gradient (the learner's FSDP reduction sums them).

Not a streaming ring: a rank holds all the keys it needs at once (with one document spanning the
row, a global layer on rank r holds r+1 chunks of K/V), and the mask is [C, keys]. A ring that
rotates K/V chunks and merges partial softmaxes by log-sum-exp would bound that by two chunks.
The model never imports this module: the learner passes `ContextParallelAttention` to
`CWM.forward(attention=...)`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F

from model.cwm import document_ids
from rl.packing import MicroBatch


@dataclass(frozen=True)
class Transfer:
    """Rank `dst` receives keys/values [start, start + length) of rank `src`'s chunk (group ranks)."""

    src: int
    dst: int
    start: int
    length: int


def chunk_length(num_tokens: int, cp_size: int) -> int:
    return -(-num_tokens // cp_size)


def pad_positions(position_ids: torch.Tensor, cp_size: int) -> torch.Tensor:
    """position_ids [B, T] padded at the end to a multiple of cp_size with a document of its own
    (positions 0, 1, ...: never a continuation of the last one, which is >= 0)."""
    B, T = position_ids.shape
    pad = chunk_length(T, cp_size) * cp_size - T
    tail = torch.arange(pad, device=position_ids.device).expand(B, pad)
    return torch.cat([position_ids, tail], dim=1)


def key_starts(position_ids: torch.Tensor, cp_size: int, window: int | None) -> list[int]:
    """For each rank of the group, the global index of the first key its queries may attend to,
    given the padded row's position_ids [B, n*C] (the least over rows)."""
    B, T = position_ids.shape
    C = T // cp_size
    doc = document_ids(position_ids)
    idx = torch.arange(T, device=position_ids.device).expand(B, T)
    start_of = torch.where(doc != F.pad(doc, (1, 0), value=-1)[:, :-1], idx, 0).cummax(-1).values
    out = []
    for r in range(cp_size):
        lo = start_of[:, r * C]
        if window is not None:
            lo = lo.clamp(min=r * C - window + 1)
        out.append(int(lo.min()))
    return out


def kv_transfers(position_ids: torch.Tensor, cp_size: int, window: int | None) -> list[Transfer]:
    """What every rank sends to every later rank: the suffixes of chunks that reach back to each
    rank's `key_starts`. A sliding layer's window of W keys takes at most W - 1 keys from before a
    chunk, i.e. from rank r-1 alone while W - 1 <= C."""
    C = position_ids.shape[1] // cp_size
    transfers = []
    for dst, lo in enumerate(key_starts(position_ids, cp_size, window)):
        for src in range(lo // C, dst):
            start = max(lo, src * C) - src * C
            transfers.append(Transfer(src, dst, start, C - start))
    return transfers


class ExchangeKV(torch.autograd.Function):
    """keys, values [B, H, C, D] of this rank -> [B, H, received + C, D]: the suffixes of earlier
    ranks' chunks this rank needs (in rank order), then its own. Backward sends the gradients of
    the received parts back to their owners and adds those of its sent parts to its own."""

    @staticmethod
    def forward(ctx, k, v, transfers: list[Transfer], group):
        rank = dist.get_rank(group)
        kv = torch.stack([k, v])  # one message per transfer
        ops, received = [], {}
        for t in transfers:
            if t.src == rank:
                part = kv[..., t.start : t.start + t.length, :].contiguous()
                ops.append(dist.P2POp(dist.isend, part, dist.get_global_rank(group, t.dst), group))
            elif t.dst == rank:
                shape = (*kv.shape[:3], t.length, kv.shape[-1])
                received[t.src] = kv.new_empty(shape)
                ops.append(
                    dist.P2POp(
                        dist.irecv, received[t.src], dist.get_global_rank(group, t.src), group
                    )
                )
        _wait(ops)
        ctx.transfers, ctx.group, ctx.rank = transfers, group, rank
        out = torch.cat([received[s] for s in sorted(received)] + [kv], dim=3)
        return out[0], out[1]

    @staticmethod
    def backward(ctx, grad_k, grad_v):
        rank, group = ctx.rank, ctx.group
        grad = torch.stack([grad_k, grad_v])
        ops, returned, offset = [], [], 0
        for t in sorted(ctx.transfers, key=lambda t: t.src):  # the forward's order of parts
            if t.dst == rank:
                part = grad[..., offset : offset + t.length, :].contiguous()
                ops.append(dist.P2POp(dist.isend, part, dist.get_global_rank(group, t.src), group))
                offset += t.length
        for t in ctx.transfers:
            if t.src == rank:
                buf = grad.new_empty((*grad.shape[:3], t.length, grad.shape[-1]))
                returned.append((t, buf))
                ops.append(dist.P2POp(dist.irecv, buf, dist.get_global_rank(group, t.dst), group))
        _wait(ops)
        own = grad[..., offset:, :].clone()
        for t, buf in returned:
            own[..., t.start : t.start + t.length, :] += buf
        return own[0], own[1], None, None


def _wait(ops: list) -> None:
    if ops:
        for work in dist.batch_isend_irecv(ops):
            work.wait()


class ContextParallelAttention:
    """The attention callable of `CWM.forward(attention=...)` on one rank of a CP group: causal
    attention within documents (+ sliding window) of this rank's queries over the keys it holds
    and the ones `kv_transfers` brings. `position_ids` is the whole padded row's [B, n*C].
    `received` counts the key/value positions received per layer kind (for tests and logs)."""

    def __init__(self, position_ids: torch.Tensor, window: int | None, group):
        self.group = group
        self.cp_size, self.rank = dist.get_world_size(group), dist.get_rank(group)
        B, T = position_ids.shape
        if T % self.cp_size:
            raise ValueError(f"row of {T} positions does not split over {self.cp_size} ranks")
        self.position_ids, self.window = position_ids, window
        self.chunk = T // self.cp_size
        self._plans: dict[bool, tuple[list[Transfer], torch.Tensor]] = {}
        self.received = {False: 0, True: 0}

    def plan(self, sliding: bool) -> tuple[list[Transfer], torch.Tensor]:
        """The transfers of a layer kind and the mask [B, 1, C, keys] of global indices."""
        if sliding not in self._plans:
            window = self.window if sliding else None
            transfers = kv_transfers(self.position_ids, self.cp_size, window)
            lo = key_starts(self.position_ids, self.cp_size, window)[self.rank]
            C, r, device = self.chunk, self.rank, self.position_ids.device
            q = torch.arange(r * C, (r + 1) * C, device=device)
            k = torch.arange(lo, (r + 1) * C, device=device)
            doc = document_ids(self.position_ids)
            m = (k[None, :] <= q[:, None])[None] & (doc[:, q, None] == doc[:, None, k])
            if sliding:
                m = m & (q[:, None] - k[None, :] < self.window)[None]
            self._plans[sliding] = transfers, m[:, None]
        return self._plans[sliding]

    def __call__(self, q, k, v, sliding: bool, kv_cache=None):
        transfers, mask = self.plan(sliding)
        k_all, v_all = ExchangeKV.apply(k, v, transfers, self.group)
        self.received[sliding] += k_all.shape[2] - k.shape[2]
        return F.scaled_dot_product_attention(
            q, k_all, v_all, attn_mask=mask, enable_gqa=q.shape[1] != k.shape[1]
        )


class _GatherChunks(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.rank, ctx.n = dist.get_rank(group), x.shape[-1]
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size(group))]
        dist.all_gather(parts, x.contiguous(), group=group)
        return torch.cat(parts, dim=-1)

    @staticmethod
    def backward(ctx, grad):
        return grad[..., ctx.rank * ctx.n : (ctx.rank + 1) * ctx.n], None


def gather_chunks(x: torch.Tensor, group) -> torch.Tensor:
    """The whole row [..., n*C] from every rank's chunk [..., C]. Every rank must compute the same
    function of the result: the gradient keeps this rank's slice, so the group's parameter
    gradients add up to the single-rank one (no reduction in backward)."""
    return _GatherChunks.apply(x, group)


def split_micro_batch(mb: MicroBatch, rank: int, cp_size: int) -> tuple[MicroBatch, torch.Tensor]:
    """This rank's chunk of a packed row (padded to cp_size chunks: pad token 0, its own document,
    no loss) and the padded row's position_ids, which `ContextParallelAttention` takes."""
    T = mb.num_tokens
    C = chunk_length(T, cp_size)
    pad = C * cp_size - T
    positions = pad_positions(mb.position_ids, cp_size)
    part = slice(rank * C, (rank + 1) * C)

    def chunk(x):
        if x is None:
            return None
        if x is mb.position_ids:
            return positions[:, part]
        return torch.cat([x, x.new_zeros(x.shape[0], pad)], dim=1)[:, part]

    fields = {k: chunk(v) if torch.is_tensor(v) or v is None else v for k, v in vars(mb).items()}
    return MicroBatch(**fields), positions
