"""The native engine: continuous batching on the CWM module's KV cache (CPU and GPU).

One scheduler thread owns the model's cache and runs the batch: between two decode steps it admits
the requests that arrived (`submit`; their prompts right-padded for one prefill, identical prompts
prefilled once, their cache rows appended to the running batch's) and drops the rows that finished
(their futures resolve at once), so a short request that arrives during a long one finishes first
instead of waiting for the longest row of a batch. Each row decodes at its own position (the cache
slot is the position). Weight updates and pause() take effect between decode steps.

A request samples from its own generator, so a seeded request draws the same tokens whatever
shares its batch or joins it later. `generate` submits a list at once and waits for all of it:
called alone (sync mode), it runs exactly the batch it was given."""

from __future__ import annotations

import concurrent.futures
import contextlib
import threading
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import torch

from model.cwm import CWM
from model.hf import native_name
from rl.engines import cpu_kernels
from rl.engines.base import Completion, Engine, SamplingParams, per_prompt

TOP_P_CANDIDATES = 256  # top-p looks at this many most likely tokens first (exact; see below)


def process_logits(
    logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor
) -> torch.Tensor:
    """Log-probs of the distribution each row samples from: logits / T, then top-k, then top-p
    (the smallest set of most likely tokens whose mass reaches p), renormalised.

    logits [B, V] float; temperature, top_p [B] float (temperature > 0); top_k [B] long (0 = off)."""
    scaled = logits.float() / temperature[:, None]
    drop = truncation_mask(scaled, top_k, top_p)
    if drop is not None:
        scaled = scaled.masked_fill(drop, float("-inf"))
    return scaled.log_softmax(-1)


def truncation_mask(
    scaled: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor
) -> torch.Tensor | None:
    """Tokens outside each row's sampling set (top-k, then top-p of what remains), or None when
    neither is on. scaled [N, V] (logits / T); top_k [N] long (0 = off), top_p [N] float. The
    learner calls it too (rl/learner.py), so it trains on the log-probs of the distribution the
    engine sampled from."""
    drop = None
    if bool((top_k > 0).any()):
        V = scaled.shape[-1]
        k = torch.where(top_k > 0, top_k.clamp(max=V), torch.full_like(top_k, V))
        kth = scaled.topk(int(k.max()), dim=-1).values.gather(1, (k - 1)[:, None])
        drop = scaled < kth
        scaled = scaled.masked_fill(drop, float("-inf"))
    if bool((top_p < 1).any()):
        p_drop = top_p_drop(scaled, top_p)
        drop = p_drop if drop is None else drop | p_drop
    return drop


def top_p_drop(scaled: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """Mask of the tokens outside each row's top-p set. A token stays when the mass of the tokens
    more likely than it is < p. Sorting the whole vocabulary is the slow part of sampling on CPU;
    when the TOP_P_CANDIDATES most likely tokens already hold mass >= p in every row (the common
    case), the set lies among them and only they are sorted (top-k): the same set either way."""
    V = scaled.shape[-1]
    k = min(V, TOP_P_CANDIDATES)
    lse = scaled.logsumexp(-1, keepdim=True)
    values, order = scaled.topk(k, dim=-1)  # sorted, most likely first
    probs = (values - lse).exp()
    cumulative = probs.cumsum(-1)
    if k < V and not bool((cumulative[:, -1] >= top_p).all()):
        values, order = scaled.sort(dim=-1, descending=True)
        probs = (values - lse).exp()  # the same numbers as above on the shared prefix
        cumulative = probs.cumsum(-1)
    # top_p >= 1 keeps everything (float rounding may push the cumulative mass past 1)
    drop_sorted = ((cumulative - probs) >= top_p[:, None]) & (top_p < 1)[:, None]
    drop = torch.ones_like(scaled, dtype=torch.bool)
    return drop.scatter(1, order, drop_sorted)


def sample(logprobs: torch.Tensor, generators: list[torch.Generator]) -> torch.Tensor:
    """One token per row by inverse-CDF sampling with one uniform draw from the row's own
    generator, so a seeded request samples the same tokens whatever else shares its batch."""
    u = torch.cat([torch.rand(1, generator=g, device=logprobs.device) for g in generators])
    cdf = logprobs.exp().cumsum(-1)
    tokens = torch.searchsorted(cdf, (u * cdf[:, -1])[:, None], right=True)[:, 0]
    return tokens.clamp(max=logprobs.shape[-1] - 1)


@dataclass
class _Request:
    prompt: list[int]
    params: SamplingParams
    generator: torch.Generator
    future: concurrent.futures.Future  # -> (Completion, the monotonic time it was admitted)
    out: Completion = field(default_factory=Completion)
    admitted: float = 0.0


class NativeEngine(Engine):
    """Owns `model`: on CPU its linear layers are switched to oneDNN-prepacked weights
    (rl/engines/cpu_kernels.py; `prepack=False` keeps the plain kernels). At most `max_batch`
    rows decode together (None: no limit); later requests wait in order."""

    def __init__(
        self,
        model: CWM,
        version: int = 0,
        seed: int = 0,
        prepack: bool = True,
        max_batch: int | None = None,
    ):
        self.model = model.eval()
        self._packers = []
        if prepack and next(model.parameters()).device.type == "cpu" and cpu_kernels.available():
            self._packers = cpu_kernels.prepack_linears(model)
        self.version = version
        self.max_batch = max_batch
        self.device = next(model.parameters()).device
        self._step_lock = threading.Lock()  # a decode step, or a weight update, at a time
        self._running = threading.Event()
        self._running.set()
        self._intact = threading.Event()  # cleared while a streamed update is incomplete
        self._intact.set()
        self._seeds = torch.Generator().manual_seed(seed)  # for requests without a seed
        self.decode_steps = 0
        self.prefill_tokens = 0  # prompt tokens run through the model (padding included)
        self.share_prompts = True  # identical prompts admitted together are prefilled once
        # the scheduler: requests waiting (under _wake), and the running batch (its thread only)
        self._wake = threading.Condition()
        self._waiting: list[_Request] = []
        self._thread: threading.Thread | None = None
        self._closed = False
        self._rows: list[_Request] = []
        self._batch: dict[str, torch.Tensor] = {}  # per row: logits, pos, sampling settings
        self._row_version: list[int] = []  # the policy version of each row's current logits

    @classmethod
    def from_pretrained(cls, path, dtype=torch.float32, device="cpu", **kwargs) -> NativeEngine:
        from model.hf import load_pretrained

        model, _ = load_pretrained(path, dtype=dtype, device=device)
        return cls(model, **kwargs)

    # -- weights ----------------------------------------------------------------------------------

    @torch.no_grad()
    def update_weights(
        self, weights: Mapping[str, torch.Tensor] | Iterable[tuple[str, torch.Tensor]], version: int
    ) -> None:
        """All of an update or nothing: every tensor is checked before any is copied; then, between
        two decode steps, the copies, the refresh of the packed weights and the new version."""
        items = list(weights.items() if isinstance(weights, Mapping) else weights)
        params = self._parameters([(hf, tuple(t.shape)) for hf, t in items])
        targets = [(params[hf], t) for hf, t in items if hf in params]
        with self._step_lock:
            for param, tensor in targets:
                param.copy_(tensor)
            cpu_kernels.repack(self._packers)
            self.version = version
            self._intact.set()

    @torch.no_grad()
    def load_streaming(
        self,
        names_shapes: list[tuple[str, tuple[int, ...]]],
        buckets: Iterable[Iterable[tuple[str, int, torch.Tensor]]],
        version: int,
    ) -> None:
        """One update that arrives bucket by bucket (rl/weights.recv_weights_streaming: pieces
        of flat values, a large tensor split over buckets), each piece copied into its parameter
        as it arrives, so no whole copy of the model is ever held. Every name and shape is
        checked against the model before anything changes; then decoding waits for the whole
        update (the step lock is held from the first copy to the new version), so no token is
        sampled on part of it. A transport that fails midway leaves the weights torn: the
        engine then samples nothing (requests wait) until a complete update arrives, and the
        error is raised."""
        targets = {hf: p.view(-1) for hf, p in self._parameters(names_shapes).items()}
        with self._step_lock:
            self._intact.clear()
            for bucket in buckets:
                for hf, start, values in bucket:
                    if hf in targets:
                        targets[hf][start : start + values.numel()].copy_(values)
            cpu_kernels.repack(self._packers)
            self.version = version
            self._intact.set()

    def _parameters(self, names_shapes) -> dict[str, torch.nn.Parameter]:
        """HF name -> the parameter it updates, every name and shape checked first (names HF
        stores but the model has no parameter for, such as rotary inv_freq, are left out)."""
        params = dict(self.model.named_parameters())
        out = {}
        for hf, shape in names_shapes:
            name = native_name(hf)
            if name is None:
                continue
            if name not in params:
                raise KeyError(f"update_weights: unknown parameter {hf!r}")
            if tuple(params[name].shape) != tuple(shape):
                raise ValueError(
                    f"update_weights: {hf!r} has shape {tuple(shape)}, "
                    f"expected {tuple(params[name].shape)}"
                )
            out[hf] = params[name]
        return out

    def pause(self) -> None:
        self._running.clear()

    def resume(self) -> None:
        self._running.set()

    def close(self) -> None:
        """Stop the scheduler thread once the requests it holds are done."""
        with self._wake:
            self._closed = True
            self._wake.notify()

    # -- requests ---------------------------------------------------------------------------------

    def generate(
        self, prompts: list[list[int]], params: SamplingParams | list[SamplingParams]
    ) -> list[Completion]:
        return [f.result()[0] for f in self.submit(prompts, params)]

    def submit(
        self, prompts: list[list[int]], params: SamplingParams | list[SamplingParams]
    ) -> list[concurrent.futures.Future]:
        """Queue `prompts` (all at once: they are admitted together, between two decode steps, as
        far as `max_batch` allows) and return at once; each future gives (Completion, the
        monotonic time the request joined the batch). A bad request raises here and queues
        nothing."""
        params = per_prompt(params, len(prompts))
        vocab = self.model.config.vocab_size
        for i, p in enumerate(prompts):
            if not p:
                raise ValueError(f"prompt {i} is empty")
            if min(p) < 0 or max(p) >= vocab:
                raise ValueError(f"prompt {i} has a token id outside [0, {vocab})")
        requests = [
            _Request(list(p), sp, self._generator(sp.seed), concurrent.futures.Future())
            for p, sp in zip(prompts, params)
        ]
        for r in requests:
            r.out.prompt_len = len(r.prompt)
        with self._wake:
            if self._closed:
                raise RuntimeError("the engine is closed")
            self._waiting.extend(requests)
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(
                    target=self._serve, name="native-engine", daemon=True
                )
                self._thread.start()
            self._wake.notify()
        return [r.future for r in requests]

    # -- the scheduler ----------------------------------------------------------------------------

    def _serve(self) -> None:
        while True:
            with self._wake:
                while not self._waiting and not self._rows:
                    if self._closed:
                        return
                    self._wake.wait()
                room = len(self._waiting)
                if self.max_batch is not None:
                    room = min(room, max(0, self.max_batch - len(self._rows)))
                admit, self._waiting = self._waiting[:room], self._waiting[room:]
            try:
                with torch.inference_mode():
                    if admit:
                        self._admit(admit)
                    self._decode()
            except BaseException as e:  # noqa: BLE001 - every request in the batch learns of it
                for r in self._rows + admit:
                    if not r.future.done():
                        r.future.set_exception(e)
                self._clear()

    def _admit(self, requests: list[_Request]) -> None:
        """Prefill `requests` on a cache of their own (each distinct prompt once), then append
        their rows, logits and settings to the running batch's."""
        dev, now = self.device, time.monotonic()
        if self.share_prompts:
            distinct: dict[tuple[int, ...], int] = {}
            source = [distinct.setdefault(tuple(r.prompt), len(distinct)) for r in requests]
            unique = [list(p) for p in distinct]
        else:
            source, unique = list(range(len(requests))), [r.prompt for r in requests]
        U = len(unique)
        running = self.model.take_cache() if self._rows else None
        max_len = max(len(r.prompt) + r.params.max_new_tokens for r in requests)
        self.model.setup_cache(U, max_len)
        lengths = torch.tensor([len(p) for p in unique], device=dev)
        padded = torch.zeros(U, int(lengths.max()), dtype=torch.long, device=dev)
        for i, p in enumerate(unique):
            padded[i, : len(p)] = torch.tensor(p, device=dev)
        positions = torch.arange(padded.shape[1], device=dev).expand(U, -1)
        try:
            with self._step():
                logits = self.model(
                    padded, positions, use_cache=True, logits_index=(lengths - 1)[:, None]
                )[:, 0]
                version = self.version
        except BaseException:
            if running is not None:
                self.model.set_cache(running)
            raise
        self.prefill_tokens += padded.numel()
        if U < len(requests):
            rows_of = torch.tensor(source, device=dev)
            self.model.keep_cache_rows(rows_of)
            logits = logits.index_select(0, rows_of)
        if running is not None:
            joining = self.model.take_cache()
            for cache, new in zip(running, joining):
                cache.append_rows(new)
            self.model.set_cache(running)
        temperature = torch.tensor([r.params.temperature for r in requests], device=dev)
        new = {
            "logits": logits,
            "pos": torch.tensor([len(r.prompt) for r in requests], device=dev),
            "greedy": temperature == 0,
            "temperature": torch.where(temperature == 0, 1.0, temperature),
            "top_k": torch.tensor([r.params.top_k for r in requests], device=dev),
            "top_p": torch.tensor([r.params.top_p for r in requests], device=dev),
        }
        for r in requests:
            r.admitted = now
        if self._rows:
            new = {k: torch.cat([self._batch[k], v]) for k, v in new.items()}
        self._batch = new
        self._rows += requests
        self._row_version += [version] * len(requests)

    def _decode(self) -> None:
        """Sample one token for every row; finished rows leave (their futures resolve); one
        forward of the rest gives their next logits."""
        b = self._batch
        tokens, token_logprobs = self._next_tokens(
            b["logits"], b["greedy"], b["temperature"], b["top_k"], b["top_p"],
            [r.generator for r in self._rows],
        )  # fmt: skip
        keep = []
        for j, (tok, lp) in enumerate(zip(tokens.tolist(), token_logprobs.tolist())):
            r = self._rows[j]
            c = r.out
            c.token_ids.append(tok)
            c.logprobs.append(lp)
            c.versions.append(self._row_version[j])
            if tok in r.params.stop_token_ids:
                c.finish_reason = "stop"
            elif len(c.token_ids) >= r.params.max_new_tokens:
                c.finish_reason = "length"
            else:
                keep.append(j)
                continue
            r.future.set_result((c, r.admitted))
        if not keep:
            self._clear()
            return
        if len(keep) < len(self._rows):  # drop finished rows from the batch and the cache
            idx = torch.tensor(keep, device=self.device)
            self.model.keep_cache_rows(idx)
            self._rows = [self._rows[j] for j in keep]
            b = {k: v.index_select(0, idx) for k, v in b.items()}
            tokens = tokens.index_select(0, idx)
        with self._step():
            b["logits"] = self.model(tokens[:, None], b["pos"][:, None], use_cache=True)[:, 0]
            version = self.version
            self.decode_steps += 1
        b["pos"] = b["pos"] + 1
        self._batch = b
        self._row_version = [version] * len(self._rows)

    def _clear(self) -> None:
        self._rows, self._batch, self._row_version = [], {}, []
        self.model.free_cache()

    @staticmethod
    def _next_tokens(logits, greedy, temperature, top_k, top_p, gens):
        """Sampled (or greedy) tokens and their log-probs; the sampling work is skipped when every
        row is greedy."""
        if bool(greedy.all()):
            logprobs = logits.float().log_softmax(-1)
            tokens = logprobs.argmax(-1)
        else:
            logprobs = process_logits(logits, temperature, top_k, top_p)
            tokens = sample(logprobs, gens)
            if bool(greedy.any()):
                raw = logits.float().log_softmax(-1)
                tokens = torch.where(greedy, raw.argmax(-1), tokens)
                logprobs = torch.where(greedy[:, None], raw, logprobs)
        return tokens, logprobs.gather(1, tokens[:, None])[:, 0]

    def _generator(self, seed: int | None) -> torch.Generator:
        """A request's own random stream. torch's CPU generator keeps only a seed's low 32 bits,
        so the seed's 64 bits are folded into 32 first: seeds that differ only above bit 32
        still draw different streams."""
        if seed is None:
            seed = int(torch.randint(0, 2**62, (1,), generator=self._seeds))
        s = seed % 2**64
        return torch.Generator(self.device).manual_seed((s ^ (s >> 32)) & 0xFFFFFFFF)

    @contextlib.contextmanager
    def _step(self):
        """Wait while paused (or while a failed streamed update left the weights torn), then
        hold the step lock for one forward (the weights are checked intact under the lock)."""
        while True:
            self._running.wait()
            self._intact.wait()
            self._step_lock.acquire()
            if self._intact.is_set():
                break
            self._step_lock.release()
        try:
            yield
        finally:
            self._step_lock.release()
