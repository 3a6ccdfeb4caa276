"""The CWM transformer: a plain nn.Module (GQA, SwiGLU, RMSNorm, llama3-scaled RoPE, per-layer full or
sliding-window causal attention), in reading order: config, KV cache, model, block, attention, MLP,
norm, RoPE, masks.

Two ways in:
- training / scoring: `forward(input_ids, position_ids)` over packed rows; a document starts wherever
  a position does not continue the previous one (e.g. resets to 0), and no token attends across a
  document boundary;
- decoding: `setup_cache(...)`, then `forward(input_ids, position_ids, use_cache=True)`; every row
  writes its keys/values at slot = position, so rows of different lengths decode together.

Parallelism (FSDP2, activation checkpointing, compile) is applied from outside (rl/learner.py).
Hugging Face weight names live in model/hf.py.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

try:  # optional: only on CUDA machines with flash-attn installed
    from flash_attn import flash_attn_varlen_func
except Exception:  # noqa: BLE001 - any import failure means "not available"
    flash_attn_varlen_func = None

FULL, SLIDING = "full_attention", "sliding_attention"


@dataclass
class CWMConfig:
    """Architecture hyper-parameters; field names follow Hugging Face's LlamaConfig / CwmConfig."""

    vocab_size: int = 128256
    hidden_size: int = 6144
    intermediate_size: int = 21504
    num_hidden_layers: int = 64
    num_attention_heads: int = 48
    num_key_value_heads: int = 8
    head_dim: int = 128
    rms_norm_eps: float = 1e-5
    rope_theta: float = 1_000_000.0
    # llama3 RoPE scaling: {"factor", "low_freq_factor", "high_freq_factor",
    # "original_max_position_embeddings"}; None = plain RoPE
    rope_scaling: dict | None = field(
        default_factory=lambda: {
            "factor": 16.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192,
        }
    )
    max_position_embeddings: int = 131072
    sliding_window: int | None = 8192
    layer_types: list[str] | None = None  # None: CWM's pattern, full iff i % 4 == 0
    tie_word_embeddings: bool = False
    bos_token_id: int | None = 128000
    eos_token_id: int | list[int] | None = None
    pad_token_id: int | None = None
    model_type: str = "cwm"  # "cwm" or "llama": which HF architecture save_pretrained writes

    def __post_init__(self) -> None:
        if self.layer_types is None:
            if self.model_type == "llama" or not self.sliding_window:
                self.layer_types = [FULL] * self.num_hidden_layers
            else:
                self.layer_types = [
                    FULL if i % 4 == 0 else SLIDING for i in range(self.num_hidden_layers)
                ]
        self.layer_types = list(self.layer_types)
        if len(self.layer_types) != self.num_hidden_layers:
            raise ValueError(
                f"layer_types has {len(self.layer_types)} entries, num_hidden_layers is "
                f"{self.num_hidden_layers}"
            )
        unknown = set(self.layer_types) - {FULL, SLIDING}
        if unknown:
            raise ValueError(f"layer_types: unknown {sorted(unknown)}; use {FULL!r} or {SLIDING!r}")
        if SLIDING in self.layer_types and not self.sliding_window:
            raise ValueError("layer_types has sliding_attention layers but sliding_window is unset")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_key_value_heads})"
            )

    @classmethod
    def from_hf_config(cls, hf: Any) -> CWMConfig:
        """Build from a transformers config object or a config.json dict (Cwm or Llama)."""
        d = hf.to_dict() if hasattr(hf, "to_dict") else dict(hf)
        model_type = d.get("model_type", "llama")
        if model_type not in ("cwm", "llama"):
            raise ValueError(f"unsupported model_type {model_type!r}: expected 'cwm' or 'llama'")
        rope = dict(d.get("rope_parameters") or d.get("rope_scaling") or {})
        theta = rope.get("rope_theta", d.get("rope_theta", 10000.0))
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type == "llama3":
            scaling = {k: float(rope[k]) for k in ("factor", "low_freq_factor", "high_freq_factor")}
            scaling["original_max_position_embeddings"] = int(
                rope["original_max_position_embeddings"]
            )
        elif rope_type == "default":
            scaling = None
        else:
            raise ValueError(f"unsupported rope_type {rope_type!r}: expected 'llama3' or 'default'")
        n_heads = d["num_attention_heads"]
        return cls(
            vocab_size=d["vocab_size"],
            hidden_size=d["hidden_size"],
            intermediate_size=d["intermediate_size"],
            num_hidden_layers=d["num_hidden_layers"],
            num_attention_heads=n_heads,
            num_key_value_heads=d.get("num_key_value_heads") or n_heads,
            head_dim=d.get("head_dim") or d["hidden_size"] // n_heads,
            rms_norm_eps=d.get("rms_norm_eps", 1e-5),
            rope_theta=float(theta),
            rope_scaling=scaling,
            max_position_embeddings=d.get("max_position_embeddings", 131072),
            sliding_window=d.get("sliding_window") if model_type == "cwm" else None,
            layer_types=d.get("layer_types") if model_type == "cwm" else None,
            tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
            bos_token_id=d.get("bos_token_id"),
            eos_token_id=d.get("eos_token_id"),
            pad_token_id=d.get("pad_token_id"),
            model_type=model_type,
        )

    def to_hf_config(self) -> dict:
        """A config.json dict for CwmForCausalLM or LlamaForCausalLM (per model_type)."""
        rope = {"rope_theta": self.rope_theta, "rope_type": "default"}
        if self.rope_scaling:
            rope.update(self.rope_scaling, rope_type="llama3")
        d = {
            "architectures": ["CwmForCausalLM" if self.model_type == "cwm" else "LlamaForCausalLM"],
            "model_type": self.model_type,
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim,
            "hidden_act": "silu",
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,  # older transformers read these two keys
            "rope_scaling": rope if self.rope_scaling else None,
            "rope_parameters": rope,
            "max_position_embeddings": self.max_position_embeddings,
            "tie_word_embeddings": self.tie_word_embeddings,
            "attention_bias": False,
            "mlp_bias": False,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_id,
            "pad_token_id": self.pad_token_id,
        }
        if self.model_type == "cwm":
            d.update(sliding_window=self.sliding_window, layer_types=list(self.layer_types))
            d.pop("attention_bias")
        return d

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> CWMConfig:
        """Named sizes: tiny (tests), cwm-1b (MFU benchmark), cwm-32b (CWM)."""
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; known: {sorted(PRESETS)}")
        return cls(**{**PRESETS[name], **overrides})

    @property
    def num_params(self) -> int:
        h, i, v = self.hidden_size, self.intermediate_size, self.vocab_size
        attn = h * self.head_dim * (2 * self.num_attention_heads + 2 * self.num_key_value_heads)
        per_layer = attn + 3 * h * i + 2 * h
        return (
            self.num_hidden_layers * per_layer + v * h * (1 if self.tie_word_embeddings else 2) + h
        )


PRESETS: dict[str, dict[str, Any]] = {
    "tiny": dict(
        vocab_size=256,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        sliding_window=16,
        max_position_embeddings=4096,
        rope_scaling={
            "factor": 4.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 64,
        },
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    ),
    "cwm-1b": dict(
        vocab_size=128256,
        hidden_size=2048,
        intermediate_size=7168,
        num_hidden_layers=16,
        num_attention_heads=16,
        num_key_value_heads=4,
        head_dim=128,
    ),
    "cwm-32b": {},  # the dataclass defaults are CWM's
}


class KVCache(nn.Module):
    """Keys and values of one attention layer, one slot per position: [B, n_kv_heads, S, head_dim]."""

    def __init__(
        self, batch_size: int, max_len: int, n_kv_heads: int, head_dim: int, dtype, device
    ):
        super().__init__()
        shape = (batch_size, n_kv_heads, max_len, head_dim)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    def update(self, position_ids: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
        """Write k, v [B, H, T, D] at slots position_ids [B, T]; return the whole cache."""
        index = position_ids[:, None, :, None].expand(-1, k.shape[1], -1, k.shape[3])
        self.k.scatter_(2, index, k.to(self.k.dtype))
        self.v.scatter_(2, index, v.to(self.v.dtype))
        return self.k, self.v

    def keep_rows(self, rows: torch.Tensor) -> None:
        """Drop finished sequences: keep only batch rows `rows`."""
        self.k = self.k.index_select(0, rows)
        self.v = self.v.index_select(0, rows)

    def append_rows(self, other: KVCache) -> None:
        """Add the rows of `other` after this cache's rows (continuous batching: requests that
        join a running batch). The slot count becomes the larger of the two; the slots a row
        never wrote are masked by position, so their padding is never read."""
        slots = max(self.k.shape[2], other.k.shape[2])
        self.k = torch.cat([_pad_slots(self.k, slots), _pad_slots(other.k, slots)])
        self.v = torch.cat([_pad_slots(self.v, slots), _pad_slots(other.v, slots)])


def _pad_slots(x: torch.Tensor, slots: int) -> torch.Tensor:
    return x if x.shape[2] == slots else F.pad(x, (0, 0, 0, slots - x.shape[2]))


class CWM(nn.Module):
    def __init__(self, config: CWMConfig):
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(
            TransformerBlock(config, layer_type) for layer_type in config.layer_types
        )
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        # a plain fp32 tensor, not a buffer: dtype casts of the module (bf16) must not touch it
        self.inv_freq = rope_inv_freq(config)
        self.attn_backend = (
            "auto"  # auto (flash on CUDA if installed, else docs) | docs | dense | flash
        )

    def forward(
        self,
        input_ids: torch.Tensor,
        position_ids: torch.Tensor | None = None,
        *,
        use_cache: bool = False,
        logits_index: torch.Tensor | None = None,
        head: Callable[[torch.Tensor, nn.Linear], Any] | None = None,
        attention: Callable | None = None,
    ) -> Any:
        """Logits [B, T, V] (or [B, K, V] at `logits_index` [B, K], e.g. each row's last token).

        `head(hidden, lm_head)` replaces the output layer (the learner computes log-probs over
        chunks of positions); it runs inside forward so FSDP has the weights gathered.
        `attention(q, k, v, sliding, kv_cache)` replaces the packed-row attention (the learner's
        context parallelism, rl/context_parallel.py)."""
        h = self.hidden_states(input_ids, position_ids, use_cache=use_cache, attention=attention)
        if head is not None:
            return head(h, self.lm_head)
        if logits_index is not None:
            h = h.gather(1, logits_index[..., None].expand(-1, -1, h.shape[-1]))
        return self.lm_head(h)

    def hidden_states(
        self,
        input_ids: torch.Tensor,
        position_ids: torch.Tensor | None = None,
        *,
        use_cache=False,
        attention: Callable | None = None,
    ) -> torch.Tensor:
        """Final-norm hidden states [B, T, hidden]; the learner applies lm_head in chunks."""
        B, T = input_ids.shape
        if position_ids is None:
            position_ids = torch.arange(T, device=input_ids.device).expand(B, T)
        if self.inv_freq.device != input_ids.device:
            self.inv_freq = self.inv_freq.to(input_ids.device)
        cos, sin = rope_cos_sin(self.inv_freq, position_ids)
        if attention is not None:
            attend = attention
        elif use_cache:
            attend = CachedAttention(position_ids, self.config.sliding_window)
        else:
            attend = PackedAttention(
                position_ids, self.config.sliding_window, self._backend(input_ids)
            )
        h = self.embed_tokens(input_ids)
        for layer in self.layers:
            h = layer(h, cos, sin, attend)
        return self.norm(h)

    def _backend(self, input_ids: torch.Tensor) -> str:
        if self.attn_backend != "auto":
            return self.attn_backend
        return "flash" if flash_attn_varlen_func is not None and input_ids.is_cuda else "docs"

    def setup_cache(self, batch_size: int, max_len: int, dtype=None, device=None) -> None:
        """Allocate a KV cache of `max_len` slots per row in every layer (replacing any old one)."""
        p = self.embed_tokens.weight
        for layer in self.layers:
            layer.attention.kv_cache = KVCache(
                batch_size,
                max_len,
                self.config.num_key_value_heads,
                self.config.head_dim,
                dtype or p.dtype,
                device or p.device,
            )

    def keep_cache_rows(self, rows: torch.Tensor) -> None:
        for layer in self.layers:
            layer.attention.kv_cache.keep_rows(rows)

    def take_cache(self) -> list[KVCache]:
        """Detach the current cache (one KVCache per layer) and leave none set."""
        caches = [layer.attention.kv_cache for layer in self.layers]
        self.free_cache()
        return caches

    def set_cache(self, caches: list[KVCache]) -> None:
        for layer, cache in zip(self.layers, caches, strict=True):
            layer.attention.kv_cache = cache

    def free_cache(self) -> None:
        for layer in self.layers:
            layer.attention.kv_cache = None

    @torch.no_grad()
    def init_weights(self, std: float = 0.02, generator: torch.Generator | None = None) -> None:
        """Random init for from-scratch models (normal(0, std) matrices, unit norms)."""
        for name, p in self.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            else:
                p.normal_(0.0, std, generator=generator)


class TransformerBlock(nn.Module):
    def __init__(self, config: CWMConfig, layer_type: str):
        super().__init__()
        self.attention_norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.attention = Attention(config, layer_type)
        self.mlp_norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = FeedForward(config.hidden_size, config.intermediate_size)

    def forward(self, x, cos, sin, attend):
        x = x + self.attention(self.attention_norm(x), cos, sin, attend)
        return x + self.mlp(self.mlp_norm(x))


class Attention(nn.Module):
    def __init__(self, config: CWMConfig, layer_type: str):
        super().__init__()
        self.n_heads, self.n_kv_heads = config.num_attention_heads, config.num_key_value_heads
        self.head_dim = config.head_dim
        self.sliding = layer_type == SLIDING
        h = config.hidden_size
        self.wq = nn.Linear(h, self.n_heads * self.head_dim, bias=False)
        self.wk = nn.Linear(h, self.n_kv_heads * self.head_dim, bias=False)
        self.wv = nn.Linear(h, self.n_kv_heads * self.head_dim, bias=False)
        self.wo = nn.Linear(self.n_heads * self.head_dim, h, bias=False)
        self.kv_cache: KVCache | None = None

    def forward(self, x, cos, sin, attend):
        B, T, _ = x.shape
        q = self.wq(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)
        k = self.wk(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = self.wv(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        out = attend(q, k, v, self.sliding, self.kv_cache)  # [B, H, T, D]
        return self.wo(out.transpose(1, 2).reshape(B, T, -1))


class FeedForward(nn.Module):
    """SwiGLU."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.w_gate = nn.Linear(dim, hidden, bias=False)
        self.w_up = nn.Linear(dim, hidden, bias=False)
        self.w_down = nn.Linear(hidden, dim, bias=False)

    def forward(self, x):
        return self.w_down(F.silu(self.w_gate(x)) * self.w_up(x))


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


# --- RoPE -----------------------------------------------------------------------------------------


def rope_inv_freq(config: CWMConfig) -> torch.Tensor:
    """Inverse frequencies, with Llama 3.1's frequency-dependent scaling when configured."""
    dim = config.head_dim
    inv_freq = 1.0 / (
        config.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.float32, device="cpu") / dim)
    )
    s = config.rope_scaling
    if not s:
        return inv_freq.float()
    old_len = s["original_max_position_embeddings"]
    low_wavelen = old_len / s["low_freq_factor"]
    high_wavelen = old_len / s["high_freq_factor"]
    wavelen = 2 * math.pi / inv_freq
    # long wavelengths are divided by `factor`, short ones kept, the band between interpolated
    scaled = torch.where(wavelen > low_wavelen, inv_freq / s["factor"], inv_freq)
    smooth = (old_len / wavelen - s["low_freq_factor"]) / (
        s["high_freq_factor"] - s["low_freq_factor"]
    )
    smoothed = (1 - smooth) * scaled / s["factor"] + smooth * scaled
    medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return torch.where(medium, smoothed, scaled).float()


def rope_cos_sin(inv_freq: torch.Tensor, position_ids: torch.Tensor):
    """cos, sin [B, 1, T, head_dim] for the half-split (rotate_half) layout HF checkpoints use."""
    freqs = position_ids[..., None].float() * inv_freq  # [B, T, D/2]
    emb = torch.cat([freqs, freqs], dim=-1)[:, None]
    return emb.cos(), emb.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    rotated = torch.cat([-x2, x1], dim=-1)
    return x * cos.to(x.dtype) + rotated * sin.to(x.dtype)


# --- attention over packed rows and over the KV cache ---------------------------------------------


def document_ids(position_ids: torch.Tensor) -> torch.Tensor:
    """Per-token document index within each row: a document starts where positions do not continue."""
    starts = torch.ones_like(position_ids, dtype=torch.bool)
    starts[:, 1:] = position_ids[:, 1:] != position_ids[:, :-1] + 1
    return starts.long().cumsum(-1)


class PackedAttention:
    """Causal attention within documents of packed rows (+ sliding window on sliding layers).

    Backends: `docs` (default without flash-attn): one SDPA call per document with is_causal, so
    memory and work grow with the sum of squared document lengths, not with the squared row
    length; a sliding layer masks only documents longer than its window. `dense`: one SDPA call
    per row with a [T, T] document mask (the reference). `flash`: flash-attn varlen (CUDA).
    Masks and segments are computed once per forward and shared by all layers."""

    def __init__(self, position_ids: torch.Tensor, window: int | None, backend: str):
        if backend not in ("docs", "dense", "flash"):
            raise ValueError(f"attention backend must be docs, dense or flash, got {backend!r}")
        self.position_ids, self.window, self.backend = position_ids, window, backend
        self._masks: dict[bool, torch.Tensor] = {}
        self._varlen = None
        self._segments: list[list[int]] | None = None
        self._window_masks: dict[int, torch.Tensor] = {}

    def mask(self, sliding: bool) -> torch.Tensor:
        if sliding not in self._masks:
            doc = document_ids(self.position_ids)
            T = doc.shape[1]
            idx = torch.arange(T, device=doc.device)
            causal = idx[None, :] <= idx[:, None]  # [q, k]
            m = causal[None] & (doc[:, :, None] == doc[:, None, :])
            if sliding:
                m = m & (idx[:, None] - idx[None, :] < self.window)[None]
            self._masks[sliding] = m[:, None]  # [B, 1, T, T]
        return self._masks[sliding]

    def __call__(self, q, k, v, sliding: bool, kv_cache):
        if self.backend == "flash":
            return self._flash(q, k, v, sliding)
        if self.backend == "docs":
            return self._docs(q, k, v, sliding)
        return F.scaled_dot_product_attention(
            q, k, v, attn_mask=self.mask(sliding), enable_gqa=q.shape[1] != k.shape[1]
        )

    def segments(self) -> list[list[int]]:
        """Document lengths of each row, in order."""
        if self._segments is None:
            doc = document_ids(self.position_ids).cpu()
            self._segments = [
                torch.unique_consecutive(row, return_counts=True)[1].tolist() for row in doc
            ]
        return self._segments

    def _window_mask(self, n: int, device) -> torch.Tensor:
        if n not in self._window_masks:
            idx = torch.arange(n, device=device)
            diff = idx[:, None] - idx[None, :]
            self._window_masks[n] = (diff >= 0) & (diff < self.window)
        return self._window_masks[n]

    def _docs(self, q, k, v, sliding: bool):
        gqa = q.shape[1] != k.shape[1]
        rows = []
        for b, lengths in enumerate(self.segments()):
            outs, start = [], 0
            for n in lengths:
                part = slice(start, start + n)
                qd, kd, vd = q[b : b + 1, :, part], k[b : b + 1, :, part], v[b : b + 1, :, part]
                if sliding and n > self.window:
                    mask = self._window_mask(n, q.device)
                    o = F.scaled_dot_product_attention(qd, kd, vd, attn_mask=mask, enable_gqa=gqa)
                else:
                    o = F.scaled_dot_product_attention(qd, kd, vd, is_causal=True, enable_gqa=gqa)
                outs.append(o)
                start += n
            rows.append(outs[0] if len(outs) == 1 else torch.cat(outs, dim=2))
        return rows[0] if len(rows) == 1 else torch.cat(rows, dim=0)

    def _flash(self, q, k, v, sliding: bool):
        """flash-attn varlen: every document of every row is one sequence in cu_seqlens."""
        B, H, T, D = q.shape
        if self._varlen is None:
            doc = document_ids(self.position_ids) + (torch.arange(B, device=q.device) * T)[:, None]
            _, counts = torch.unique_consecutive(doc.flatten(), return_counts=True)
            cu = F.pad(counts.cumsum(0), (1, 0)).to(torch.int32)
            self._varlen = (cu, int(counts.max()))
        cu, max_len = self._varlen
        flat = lambda t: t.transpose(1, 2).reshape(B * T, t.shape[1], D)  # noqa: E731
        window = (self.window - 1, 0) if sliding else (-1, -1)
        out = flash_attn_varlen_func(
            flat(q), flat(k), flat(v), cu, cu, max_len, max_len, causal=True, window_size=window
        )
        return out.view(B, T, H, D).transpose(1, 2)


class CachedAttention:
    """Attention of new tokens over a KV cache whose slot index is the token position.

    Slots after a query's position hold stale or padding values and are masked out; a sliding layer
    also masks slots older than the window, so decoding stays exact past the window."""

    def __init__(self, position_ids: torch.Tensor, window: int | None):
        self.position_ids, self.window = position_ids, window
        self.n_slots = int(position_ids.max()) + 1  # no query looks past this
        self._checked = False
        self._masks: dict[bool, torch.Tensor] = {}

    def mask(self, sliding: bool) -> torch.Tensor:
        if sliding not in self._masks:
            slot = torch.arange(self.n_slots, device=self.position_ids.device)
            q = self.position_ids[:, :, None]  # [B, T, 1]
            m = slot[None, None, :] <= q
            if sliding:
                m = m & (q - slot[None, None, :] < self.window)
            self._masks[sliding] = m[:, None]  # [B, 1, T, S]
        return self._masks[sliding]

    def __call__(self, q, k, v, sliding: bool, kv_cache: KVCache | None):
        if kv_cache is None:
            raise RuntimeError("use_cache=True but no KV cache: call model.setup_cache() first")
        if not self._checked:
            if self.n_slots > kv_cache.k.shape[2]:
                raise ValueError(
                    f"position {self.n_slots - 1} beyond the KV cache ({kv_cache.k.shape[2]} slots)"
                )
            self._checked = True
        k_all, v_all = kv_cache.update(self.position_ids, k, v)
        k_all, v_all = k_all[:, :, : self.n_slots], v_all[:, :, : self.n_slots]
        return F.scaled_dot_product_attention(
            q, k_all, v_all, attn_mask=self.mask(sliding), enable_gqa=q.shape[1] != k.shape[1]
        )
