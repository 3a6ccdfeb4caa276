"""The Engine interface: token ids in; sampled token ids, their log-probs, the policy version of each
token and a finish reason out. Backends: `native` (model/ KV cache) and `vllm`."""

from __future__ import annotations

import abc
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import torch

FINISH_REASONS = ("stop", "length")


@dataclass(frozen=True)
class SamplingParams:
    """Per-request sampling settings (mapped one to one onto vLLM's SamplingParams).

    temperature 0 is greedy; top_k 0 and top_p 1 are off; a request stops after sampling any of
    `stop_token_ids` (kept in the output) or after `max_new_tokens`."""

    max_new_tokens: int = 256
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    stop_token_ids: tuple[int, ...] = ()
    seed: int | None = None

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0 = off), got {self.top_k}")
        object.__setattr__(self, "stop_token_ids", tuple(int(t) for t in self.stop_token_ids))


@dataclass
class Completion:
    """One sampled continuation. `logprobs[i]` is the log-probability of `token_ids[i]` under the
    distribution it was actually drawn from (after temperature, top-k and top-p; for greedy rows,
    the model's unscaled distribution); `versions[i]` the policy version that sampled it."""

    token_ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    versions: list[int] = field(default_factory=list)
    finish_reason: str = "length"
    prompt_len: int = 0


class Engine(abc.ABC):
    """A generation backend. `version` counts weight updates received (0 = initial weights)."""

    version: int = 0

    @abc.abstractmethod
    def generate(
        self, prompts: list[list[int]], params: SamplingParams | list[SamplingParams]
    ) -> list[Completion]:
        """Complete every prompt; one SamplingParams for all, or one per prompt."""

    @abc.abstractmethod
    def update_weights(
        self, weights: Mapping[str, torch.Tensor] | Iterable[tuple[str, torch.Tensor]], version: int
    ) -> None:
        """Load one whole update of Hugging Face-named tensors and set the policy version, at
        once between two decode steps: no token is sampled on part of an update, and a version
        is never stamped before all of its tensors (and any copy an engine derives from them,
        such as packed weights) are in place. Callers pass an update whole, never bucket by
        bucket. Requests in flight continue with the new weights from their next token on;
        their KV cache, written by the old weights, is kept (as in PipelineRL and CWM), and
        `versions` records the mix."""

    @abc.abstractmethod
    def load_streaming(
        self,
        names_shapes: list[tuple[str, tuple[int, ...]]],
        buckets: Iterable[Iterable[tuple[str, int, torch.Tensor]]],
        version: int,
    ) -> None:
        """Load one update that arrives bucket by bucket (rl/weights.recv_weights_streaming:
        `names_shapes` first, then buckets of pieces (name, first flat element, flat values), a
        large tensor split over several; a bucket's views die with the next bucket), as it
        arrives, never holding a whole copy of the model. The same guarantees as
        update_weights: every name and shape is checked before anything changes, and no token
        is sampled on part of the update. A stream that fails midway leaves the weights torn:
        the engine then samples nothing until a complete update has loaded, and raises."""

    def pause(self) -> None:  # noqa: B027 - optional for engines without in-flight requests
        """Stop starting decode steps (in-flight requests wait, nothing is lost)."""

    def resume(self) -> None:  # noqa: B027
        """Undo pause()."""


def per_prompt(params: SamplingParams | list[SamplingParams], n: int) -> list[SamplingParams]:
    if isinstance(params, SamplingParams):
        return [params] * n
    if len(params) != n:
        raise ValueError(f"{len(params)} SamplingParams for {n} prompts")
    return list(params)
