"""Context parallelism: one packed row split into contiguous chunks over the ranks of a CP group.

Rank r of a group of n holds positions [r*C, (r+1)*C) of the row (padded to n*C with a document of
its own, which no real token attends to). Queries stay where they are; keys and values move. A query
attends only to earlier keys of its own document (and, on a sliding layer, to the last `window`
of those), so rank r needs from its predecessors only the keys from

    lo_r = doc_start(r*C)                               on a full-attention layer,
    lo_r = max(doc_start(r*C), r*C - window + 1)        on a sliding-window layer,

up to its own chunk, and only for the queries of the document its chunk begins in (a document that
starts inside the chunk has all its keys there).

Sliding layers (`ExchangeKV`): the window's keys, at most window - 1 of them, come point to point
from the ranks that hold them (`kv_transfers` plans the suffixes), and attention runs over
[received keys, local keys], one SDPA call per document of the chunk, as the single-rank `docs`
backend.

Full layers (`RingAttention`): the keys a document needs can be the whole row, so they stream. Each
chunk's K/V is passed down a chain of ranks, r -> r+1 -> ..., as far as a later rank needs it (only
the suffix the next rank needs moves); at each step a rank attends its first document's queries
to the chunk it holds while the next one is in transit, and merges the partial results by their
log-sum-exp (the flash-attention / ring-attention merge), so a rank never holds more than two
received chunks, however long the document. Backward passes the chunks down the chain again,
recomputes each block's gradients from the saved output and log-sum-exp, and sends the gradients
of a chunk's keys and values straight back to its owner. The blocks run in fused kernels (on CPU,
ATen's flash attention, which returns the log-sum-exp; elsewhere exact math in query tiles).

The log-probs of the chunks are gathered (`gather_chunks`) so every rank of the group computes the
same, whole-row loss; its backward keeps this rank's slice, so the parameter gradients of the group's
ranks add up to the single-rank gradient (the learner's FSDP reduction sums them). The forward is
the single-rank forward up to summation order.

Not load balanced: with causal attention, a rank late in a long document attends to more keys than
an early one (zigzag chunking, two chunks per rank from both ends, would even it out).
The model never imports this module: the learner passes `ContextParallelAttention` to
`CWM.forward(attention=...)`.
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import accumulate

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
    attention within documents (+ sliding window) of this rank's queries over its own keys and the
    earlier ranks' keys they reach. `position_ids` is the whole padded row's [B, n*C].

    Sliding layers: the window's keys through `ExchangeKV`, then, as model.cwm.PackedAttention's
    `docs` backend, one SDPA call per document of the chunk (work and memory grow with the
    documents' lengths, not the row's): a document that starts in the chunk is plain causal (masked
    only when longer than the window); the one the chunk starts in also sees the received keys,
    through a [queries, queries + window - 1] mask. Full layers: `RingAttention`.
    `received` counts the key positions received per layer kind, `held` the most received key
    positions a full layer held at once (tests, logs)."""

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
        self.ring = Ring(key_starts(position_ids, self.cp_size, None), C, self.rank, group)
        self.received = {False: 0, True: 0}
        self.held = 0

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
        if not sliding:
            out = RingAttention.apply(q, k, v, self.ring, self.segments)
            self.received[False] += self.ring.received
            self.held = max(self.held, self.ring.held)
            return out
        transfers, lo = self.plan(sliding)
        k_all, v_all = ExchangeKV.apply(k, v, transfers, self.group)  # keys [lo, chunk end)
        self.received[True] += k_all.shape[2] - k.shape[2]
        gqa = q.shape[1] != k.shape[1]
        rows = []
        for b, segments in enumerate(self.segments):
            outs, start = [], 0  # start: the segment's first query, local
            for n, doc_start in segments:
                end = self.offset + start + n  # global, exclusive
                # global index of the first key any of these queries sees
                first = max(doc_start, self.offset + start - self.window + 1)
                qd = q[b : b + 1, :, start : start + n]
                kd, vd = (t[b : b + 1, :, first - lo : end - lo] for t in (k_all, v_all))
                num_keys = end - first
                mask = None
                if num_keys > n or n > self.window:
                    mask = self._window_mask(n, num_keys, q.device)
                o = F.scaled_dot_product_attention(
                    qd, kd, vd, attn_mask=mask, is_causal=mask is None, enable_gqa=gqa
                )
                outs.append(o)
                start += n
            rows.append(outs[0] if len(outs) == 1 else torch.cat(outs, dim=2))
        return rows[0] if len(rows) == 1 else torch.cat(rows, dim=0)


# -- full-attention layers: the ring --------------------------------------------------------------


def block_attention(q, k, v, causal: bool, fused: bool = True):
    """Softmax attention of q [B, H, n, D] over k, v [B, H, m, D] (causal: aligned at the first
    key, n == m) and each query's log-sum-exp of scores, [B, H, n] (fp32; fp64 for fp64 input).
    Fused on CPU (ATen's flash kernel returns the log-sum-exp); elsewhere, or `fused=False`, exact
    math in tiles of queries (scores of one tile held at a time)."""
    if fused and q.device.type == "cpu":
        return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, causal)
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    out, lse = torch.empty_like(q), q.new_empty(q.shape[:-1], dtype=acc)
    for i, s in _tiles(q, k, causal, acc):
        lse[..., i : i + s.shape[-2]] = s.logsumexp(-1)
        p = (s - lse[..., i : i + s.shape[-2], None]).exp()
        out[..., i : i + s.shape[-2], :] = (p @ v.to(acc)).to(q.dtype)
    return out, lse


def block_attention_backward(dout, q, k, v, out, lse, causal: bool, fused: bool = True):
    """The gradients (dq, dk, dv) of one block of a softmax attention whose whole output `out` and
    log-sum-exp `lse` (over every block) are given: summed over the blocks, those of the whole."""
    if fused and q.device.type == "cpu":
        return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
            dout, q, k, v, out, lse, 0.0, causal
        )
    acc = lse.dtype
    scale = q.shape[-1] ** -0.5
    delta = (dout.to(acc) * out.to(acc)).sum(-1)  # D_i = sum_j P_ij dP_ij = dO_i . O_i
    dq = torch.zeros_like(q, dtype=acc)
    dk, dv = torch.zeros_like(k, dtype=acc), torch.zeros_like(v, dtype=acc)
    for i, s in _tiles(q, k, causal, acc):
        rows = slice(i, i + s.shape[-2])
        p = (s - lse[..., rows, None]).exp()
        do = dout[..., rows, :].to(acc)
        dv += p.transpose(-1, -2) @ do
        ds = p * (do @ v.to(acc).transpose(-1, -2) - delta[..., rows, None])
        dq[..., rows, :] = ds @ k.to(acc) * scale
        dk += ds.transpose(-1, -2) @ q[..., rows, :].to(acc) * scale
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


def _tiles(q, k, causal: bool, acc, tile: int = 512):
    """(first query, scaled scores [B, H, tile, m] with the causal mask applied) per query tile."""
    scale = q.shape[-1] ** -0.5
    keys = torch.arange(k.shape[-2], device=q.device)
    for i in range(0, q.shape[-2], tile):
        s = q[..., i : i + tile, :].to(acc) @ k.to(acc).transpose(-1, -2) * scale
        if causal:
            queries = torch.arange(i, i + s.shape[-2], device=q.device)
            s = s.masked_fill(keys[None, :] > queries[:, None], float("-inf"))
        yield i, s


def repeat_kv_heads(kv: torch.Tensor, heads: int) -> torch.Tensor:
    """GQA: key/value heads repeated to the query heads (the fused kernels want them equal)."""
    return kv if kv.shape[1] == heads else kv.repeat_interleave(heads // kv.shape[1], dim=1)


def sum_kv_heads(grad: torch.Tensor, kv_heads: int) -> torch.Tensor:
    """The gradient of `repeat_kv_heads`: the repeated heads' gradients summed."""
    B, H, L, D = grad.shape
    return grad if H == kv_heads else grad.view(B, kv_heads, H // kv_heads, L, D).sum(2)


class Ring:
    """The chain a full layer's chunks travel along, from every rank's first key (`lo`, global
    indices, `key_starts` with no window). Rank `dst` needs chunk `src` when src < dst and the
    chunk reaches lo[dst]; it holds the chunk's suffix from `start(dst, src)`. The ranks that need
    a chunk are the ones right after its owner (lo never decreases), so the chunk moves one rank
    per step and is dropped by the last rank that needs it; `steps` is the longest such path."""

    def __init__(self, lo: list[int], chunk: int, rank: int, group):
        self.lo, self.C, self.rank, self.group = lo, chunk, rank, group
        self.n = len(lo)
        self.steps = max([dst - src for dst in range(self.n) for src in range(dst)
                          if self.needs(dst, src)], default=0)  # fmt: skip
        self.received = self.held = 0  # key positions received / held at once, last forward

    def needs(self, dst: int, src: int) -> bool:
        return 0 <= src < dst < self.n and self.lo[dst] < (src + 1) * self.C

    def start(self, dst: int, src: int) -> int:
        """The first position of chunk `src` that rank `dst` holds (its own: all of it)."""
        return 0 if dst == src else max(self.lo[dst], src * self.C) - src * self.C

    def _peer(self, rank: int) -> int:
        return dist.get_global_rank(self.group, rank)

    def pass_on(self, s: int, held: torch.Tensor | None):
        """Step s of the chain: send the held chunk r+1-s to rank r+1 (the suffix it needs) and
        receive chunk r-s from rank r-1; returns (the posted works, the receive buffer or None)."""
        r, ops, buf = self.rank, [], None
        if self.needs(r + 1, r + 1 - s):
            cut = self.start(r + 1, r + 1 - s) - self.start(r, r + 1 - s)
            part = held[..., cut:, :].contiguous()
            ops.append(dist.P2POp(dist.isend, part, self._peer(r + 1), self.group))
        if self.needs(r, r - s):
            length = self.C - self.start(r, r - s)
            buf = held.new_empty((*held.shape[:-2], length, held.shape[-1]))
            ops.append(dist.P2POp(dist.irecv, buf, self._peer(r - 1), self.group))
        return (dist.batch_isend_irecv(ops) if ops else []), buf

    def return_grads(self, s: int, grad: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
        """Send the gradient of chunk r-s's held suffix to its owner, and receive (and return,
        padded to this rank's chunk at its offset) what rank r+s computed for this chunk's keys."""
        r, ops, got = self.rank, [], None
        if grad is not None:
            ops.append(dist.P2POp(dist.isend, grad.contiguous(), self._peer(r - s), self.group))
        if self.needs(r + s, r):
            shape = (*like.shape[:-2], self.C - self.start(r + s, r), like.shape[-1])
            got = like.new_empty(shape, dtype=torch.promote_types(like.dtype, torch.float32))
            ops.append(dist.P2POp(dist.irecv, got, self._peer(r + s), self.group))
        _wait(ops)
        return got


class RingAttention(torch.autograd.Function):
    """Full causal attention within documents over a CP group: q [B, H, C, D], k, v [B, Hkv, C, D]
    of this rank's chunk -> [B, H, C, D]. `segments` as ContextParallelAttention's: per row, the
    documents of the chunk (length, global start); only the first can reach earlier chunks."""

    @staticmethod
    def forward(ctx, q, k, v, ring: Ring, segments):
        H, acc = q.shape[1], torch.float64 if q.dtype == torch.float64 else torch.float32
        out, lse = torch.empty_like(q), q.new_empty(q.shape[:-1], dtype=acc)
        for b, start, n in _documents(segments):  # each document over its own keys
            o, l_ = block_attention(*_block(q, k, v, b, start, n, H), causal=True)
            out[b : b + 1, :, start : start + n], lse[b : b + 1, :, start : start + n] = o, l_
        # the first document of a row, where it began on an earlier rank: merged block by block
        firsts = _firsts(segments, ring)
        merged = {b: (out[b : b + 1, :, :n].to(acc), lse[b : b + 1, :, :n]) for b, n, _ in firsts}

        def attend(kv: torch.Tensor, src: int) -> None:
            held_from = src * ring.C + ring.start(ring.rank, src)  # global index of kv's first key
            for b, n, doc_start in firsts:
                first = max(doc_start, src * ring.C) - held_from
                if first >= kv.shape[-2]:
                    continue
                kb, vb = (repeat_kv_heads(t[b : b + 1, :, first:], H) for t in kv)
                o, l_ = block_attention(q[b : b + 1, :, :n], kb, vb, causal=False)
                o_acc, l_acc = merged[b]
                lse_new = torch.logaddexp(l_acc, l_)
                o_acc = o_acc * (l_acc - lse_new).exp()[..., None]
                merged[b] = o_acc + o.to(acc) * (l_ - lse_new).exp()[..., None], lse_new

        ring.received, ring.held = _stream(ring, torch.stack([k, v]), attend)
        for b, n, _ in firsts:
            o_acc, l_acc = merged[b]
            out[b : b + 1, :, :n], lse[b : b + 1, :, :n] = o_acc.to(q.dtype), l_acc
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.ring, ctx.segments = ring, segments
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse = ctx.saved_tensors
        ring, segments = ctx.ring, ctx.segments
        H, Hkv = q.shape[1], k.shape[1]
        dout = dout.contiguous()
        acc = lse.dtype
        dq = torch.zeros_like(q, dtype=acc)
        dkv = torch.zeros_like(torch.stack([k, v]), dtype=acc)
        for b, start, n in _documents(segments):
            rows = (slice(b, b + 1), slice(None), slice(start, start + n))
            dq_b, dk_b, dv_b = block_attention_backward(
                dout[rows], *_block(q, k, v, b, start, n, H), out[rows], lse[rows],
                causal=True,
            )  # fmt: skip
            dq[rows] += dq_b
            dkv[(0, *rows)] += sum_kv_heads(dk_b, Hkv)
            dkv[(1, *rows)] += sum_kv_heads(dv_b, Hkv)
        firsts = _firsts(segments, ring)

        def attend(kv: torch.Tensor, src: int) -> torch.Tensor:
            """The block's dq, and the gradient of the held keys and values (returned)."""
            held_from = src * ring.C + ring.start(ring.rank, src)
            grad = torch.zeros_like(kv, dtype=acc)
            for b, n, doc_start in firsts:
                first = max(doc_start, src * ring.C) - held_from
                if first >= kv.shape[-2]:
                    continue
                rows = (slice(b, b + 1), slice(None), slice(0, n))
                kb, vb = (repeat_kv_heads(t[b : b + 1, :, first:], H) for t in kv)
                dq_b, dk_b, dv_b = block_attention_backward(
                    dout[rows], q[rows], kb, vb, out[rows], lse[rows], causal=False
                )
                dq[rows] += dq_b
                grad[0, b : b + 1, :, first:] += sum_kv_heads(dk_b, Hkv)
                grad[1, b : b + 1, :, first:] += sum_kv_heads(dv_b, Hkv)
            return grad

        def returned(s: int, got: torch.Tensor | None) -> None:
            if got is not None:
                dkv[..., ring.start(ring.rank + s, ring.rank) :, :] += got

        _stream(ring, torch.stack([k, v]), attend, returned)
        dkv = dkv.to(k.dtype)
        return dq.to(q.dtype), dkv[0], dkv[1], None, None


def _stream(ring: Ring, own: torch.Tensor, attend, returned=None) -> tuple[int, int]:
    """Run `attend(kv, src)` on every earlier chunk this rank needs, each as it arrives down the
    chain, the next one in transit meanwhile. In backward (`returned` given), `attend` returns the
    gradient of the chunk it held, which goes back to the chunk's owner, and `returned(s, grad)`
    takes what came back for this rank's own chunk from rank r+s. Returns the key positions
    received and the most held at once (the chunk attended to and the one in transit)."""
    r, held, received, peak = ring.rank, own, 0, 0
    for s in range(1, ring.steps + 2):
        works, buf = ring.pass_on(s, held) if s <= ring.steps else ([], None)
        attending = held is not own and held is not None
        grad = attend(held, r - s + 1) if attending else None
        peak = max(
            peak, (held.shape[-2] if attending else 0) + (0 if buf is None else buf.shape[-2])
        )
        for work in works:
            work.wait()
        if returned is not None and s > 1:
            returned(s - 1, ring.return_grads(s - 1, grad, own))
        received += 0 if buf is None else buf.shape[-2]
        held = buf
    return received, peak


def _documents(segments):
    """(row, first local query, length) of every document of the chunk."""
    for b, segs in enumerate(segments):
        start = 0
        for n, _ in segs:
            yield b, start, n
            start += n


def _firsts(segments, ring: Ring) -> list[tuple[int, int, int]]:
    """(row, length, global start) of each row's first document, where it began before this
    chunk (only those queries attend to earlier chunks)."""
    offset = ring.rank * ring.C
    return [(b, segs[0][0], segs[0][1]) for b, segs in enumerate(segments) if segs[0][1] < offset]


def _block(q, k, v, b, start, n, heads):
    """Row b's queries, keys and values [start, start + n), the keys' heads repeated to the
    queries'."""
    span = (slice(b, b + 1), slice(None), slice(start, start + n))
    return q[span], repeat_kv_heads(k[span], heads), repeat_kv_heads(v[span], heads)


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
