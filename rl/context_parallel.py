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
local queries over [received keys, local keys], one SDPA call per document of the chunk (as the
single-rank `docs` backend), so the forward is the single-rank forward up to summation order.

The log-probs of the chunks are gathered (`gather_chunks`) so every rank of the group computes the
same, whole-row loss; its backward keeps this rank's slice, so the parameter gradients of the group's
ranks add up to the single-rank gradient (the learner's FSDP reduction sums them).

Not a streaming ring: a rank holds all the keys it needs at once (with one document spanning the
row, a full-attention layer on rank r receives r chunks of K/V, as an all-gather would). A ring that
rotates K/V chunks and merges partial softmaxes by log-sum-exp would bound that by two chunks;
sliding layers never need more than window - 1 keys per rank.
The model never imports this module: the learner passes `ContextParallelAttention` to
`CWM.forward(attention=...)`.
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import accumulate

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.attention.bias import causal_lower_right

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
    attention within documents (+ sliding window) of this rank's queries over its own keys and the
    ones `kv_transfers` brings. `position_ids` is the whole padded row's [B, n*C].

    As model.cwm.PackedAttention's `docs` backend, one SDPA call per document of the chunk, so work
    and memory grow with the documents' lengths, not the row's: a document that starts in the chunk
    is plain causal (a sliding layer masks it only when longer than the window); the one the chunk
    starts in also sees its earlier keys, the received ones: causal aligned to the last key
    (`causal_lower_right`, no mask held) on a full layer, a [queries, queries + window - 1] mask on
    a sliding one. `received` counts the key positions received per layer kind (tests, logs)."""

    def __init__(self, position_ids: torch.Tensor, window: int | None, group):
        self.group = group
        self.cp_size, self.rank = dist.get_world_size(group), dist.get_rank(group)
        B, T = position_ids.shape
        if T % self.cp_size:
            raise ValueError(f"row of {T} positions does not split over {self.cp_size} ranks")
        self.position_ids, self.window = position_ids, window
        self.chunk = C = T // self.cp_size
        self.offset = self.rank * C  # global index of this chunk's first position
        doc = document_ids(position_ids).cpu()
        own = doc[:, self.offset : self.offset + C]
        # each row's documents in the chunk: (length, global index of the document's start)
        self.segments = []
        for b in range(B):
            lengths = torch.unique_consecutive(own[b], return_counts=True)[1].tolist()
            first_start = int((doc[b, : self.offset + 1] == own[b, 0]).int().argmax())
            starts = [first_start] + [self.offset + n for n in accumulate(lengths[:-1])]
            self.segments.append(list(zip(lengths, starts)))
        self._plans: dict[bool, tuple[list[Transfer], int]] = {}
        self._masks: dict[tuple[int, int], torch.Tensor] = {}
        self.received = {False: 0, True: 0}

    def plan(self, sliding: bool) -> tuple[list[Transfer], int]:
        """The transfers of a layer kind and the global index of this rank's first key."""
        if sliding not in self._plans:
            window = self.window if sliding else None
            transfers = kv_transfers(self.position_ids, self.cp_size, window)
            lo = key_starts(self.position_ids, self.cp_size, window)[self.rank]
            self._plans[sliding] = transfers, lo
        return self._plans[sliding]

    def _window_mask(self, n: int, num_keys: int, device) -> torch.Tensor:
        """[n, num_keys]: query i (the last n of the keys' span) sees keys within the window."""
        if (n, num_keys) not in self._masks:
            diff = torch.arange(n, device=device)[:, None] + (num_keys - n)
            diff = diff - torch.arange(num_keys, device=device)[None, :]
            self._masks[n, num_keys] = (diff >= 0) & (diff < self.window)
        return self._masks[n, num_keys]

    def __call__(self, q, k, v, sliding: bool, kv_cache=None):
        transfers, lo = self.plan(sliding)
        k_all, v_all = ExchangeKV.apply(k, v, transfers, self.group)  # keys [lo, chunk end)
        self.received[sliding] += k_all.shape[2] - k.shape[2]
        gqa = q.shape[1] != k.shape[1]
        rows = []
        for b, segments in enumerate(self.segments):
            outs, start = [], 0  # start: the segment's first query, local
            for n, doc_start in segments:
                end = self.offset + start + n  # global, exclusive
                first = doc_start  # global index of the first key any of these queries sees
                if sliding:
                    first = max(first, self.offset + start - self.window + 1)
                qd = q[b : b + 1, :, start : start + n]
                kd, vd = (t[b : b + 1, :, first - lo : end - lo] for t in (k_all, v_all))
                num_keys = end - first
                if sliding and (num_keys > n or n > self.window):
                    mask = self._window_mask(n, num_keys, q.device)
                elif num_keys > n:
                    mask = causal_lower_right(n, num_keys)
                else:
                    mask = None
                o = F.scaled_dot_product_attention(
                    qd, kd, vd, attn_mask=mask, is_causal=mask is None, enable_gqa=gqa
                )
                outs.append(o)
                start += n
            rows.append(outs[0] if len(outs) == 1 else torch.cat(outs, dim=2))
        return rows[0] if len(rows) == 1 else torch.cat(rows, dim=0)


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
