"""The native engine: batched generation on the CWM module's KV cache (CPU and GPU).

Prompts of different lengths are right-padded for one prefill; each row then decodes at its own
position (the cache slot is the position). Finished rows are dropped from the batch and the cache,
so they stop costing compute. Weight updates and pause() take effect between decode steps."""

from __future__ import annotations

import threading
from collections.abc import Iterable, Mapping

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


class NativeEngine(Engine):
    """Owns `model`: on CPU its linear layers are switched to oneDNN-prepacked weights
    (rl/engines/cpu_kernels.py; `prepack=False` keeps the plain kernels)."""

    def __init__(self, model: CWM, version: int = 0, seed: int = 0, prepack: bool = True):
        self.model = model.eval()
        self._packers = []
        if prepack and next(model.parameters()).device.type == "cpu" and cpu_kernels.available():
            self._packers = cpu_kernels.prepack_linears(model)
        self.version = version
        self.device = next(model.parameters()).device
        self._step_lock = threading.Lock()  # a decode step, or a weight update, at a time
        self._generate_lock = threading.Lock()  # the KV cache serves one generate() at a time
        self._running = threading.Event()
        self._running.set()
        self._seeds = torch.Generator().manual_seed(seed)  # for requests without a seed
        self.decode_steps = 0
        self.prefill_tokens = 0  # prompt tokens run through the model (padding included)
        self.share_prompts = True  # identical prompts in a batch are prefilled once

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
        params = dict(self.model.named_parameters())
        targets = []
        for hf, tensor in items:
            name = native_name(hf)
            if name is None:
                continue
            if name not in params:
                raise KeyError(f"update_weights: unknown parameter {hf!r}")
            if params[name].shape != tensor.shape:
                raise ValueError(
                    f"update_weights: {hf!r} has shape {tuple(tensor.shape)}, "
                    f"expected {tuple(params[name].shape)}"
                )
            targets.append((params[name], tensor))
        with self._step_lock:
            for param, tensor in targets:
                param.copy_(tensor)
            cpu_kernels.repack(self._packers)
            self.version = version

    def pause(self) -> None:
        self._running.clear()

    def resume(self) -> None:
        self._running.set()

    # -- generation -------------------------------------------------------------------------------

    @torch.inference_mode()
    def generate(
        self, prompts: list[list[int]], params: SamplingParams | list[SamplingParams]
    ) -> list[Completion]:
        params = per_prompt(params, len(prompts))
        vocab = self.model.config.vocab_size
        for i, p in enumerate(prompts):
            if not p:
                raise ValueError(f"prompt {i} is empty")
            if min(p) < 0 or max(p) >= vocab:
                raise ValueError(f"prompt {i} has a token id outside [0, {vocab})")
        if not prompts:
            return []
        with self._generate_lock:
            try:
                return self._generate(prompts, params)
            finally:
                self.model.free_cache()

    def _generate(self, prompts: list[list[int]], params: list[SamplingParams]) -> list[Completion]:
        dev, B = self.device, len(prompts)
        out = [Completion(prompt_len=len(p)) for p in prompts]
        lengths = torch.tensor([len(p) for p in prompts], device=dev)
        max_len = max(len(p) + sp.max_new_tokens for p, sp in zip(prompts, params))

        rows = list(range(B))  # request index of each live batch row
        temperature = torch.tensor([sp.temperature for sp in params], device=dev)
        greedy = temperature == 0
        temperature = torch.where(greedy, torch.ones_like(temperature), temperature)
        top_k = torch.tensor([sp.top_k for sp in params], device=dev)
        top_p = torch.tensor([sp.top_p for sp in params], device=dev)
        gens = [self._generator(sp.seed) for sp in params]

        # prefill each distinct prompt once (the G samples of a GRPO group share theirs), then
        # copy its KV cache and last logits to every row that asked for it
        if self.share_prompts:
            distinct: dict[tuple[int, ...], int] = {}
            source = [distinct.setdefault(tuple(p), len(distinct)) for p in prompts]
            unique = [list(p) for p in distinct]
        else:
            source, unique = list(range(B)), prompts
        U = len(unique)
        unique_lengths = torch.tensor([len(p) for p in unique], device=dev)
        self.model.setup_cache(U, max_len)
        padded = torch.zeros(U, int(unique_lengths.max()), dtype=torch.long, device=dev)
        for i, p in enumerate(unique):
            padded[i, : len(p)] = torch.tensor(p, device=dev)
        positions = torch.arange(padded.shape[1], device=dev).expand(U, -1)
        with self._step():
            logits = self.model(
                padded, positions, use_cache=True, logits_index=(unique_lengths - 1)[:, None]
            )
            version = self.version
        self.prefill_tokens += padded.numel()
        logits, pos = logits[:, 0], lengths.clone()
        if U < B:
            rows_of = torch.tensor(source, device=dev)
            self.model.keep_cache_rows(rows_of)
            logits = logits.index_select(0, rows_of)

        while rows:
            tokens, token_logprobs = self._next_tokens(
                logits, greedy, temperature, top_k, top_p, gens
            )
            keep = []
            for j, (tok, lp) in enumerate(zip(tokens.tolist(), token_logprobs.tolist())):
                req, sp = rows[j], params[rows[j]]
                c = out[req]
                c.token_ids.append(tok)
                c.logprobs.append(lp)
                c.versions.append(version)
                if tok in sp.stop_token_ids:
                    c.finish_reason = "stop"
                elif len(c.token_ids) >= sp.max_new_tokens:
                    c.finish_reason = "length"
                else:
                    keep.append(j)
            if not keep:
                break
            if len(keep) < len(rows):  # drop finished rows from the batch and the cache
                idx = torch.tensor(keep, device=dev)
                self.model.keep_cache_rows(idx)
                rows = [rows[j] for j in keep]
                gens = [gens[j] for j in keep]
                tokens, pos = tokens[idx], pos[idx]
                temperature, top_k, top_p = temperature[idx], top_k[idx], top_p[idx]
                greedy = greedy[idx]
            with self._step():
                logits = self.model(tokens[:, None], pos[:, None], use_cache=True)[:, 0]
                version = self.version
                self.decode_steps += 1
            pos = pos + 1
        return out

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

    def _step(self):
        """Wait while paused, then hold the step lock for one forward."""
        self._running.wait()
        return self._step_lock
