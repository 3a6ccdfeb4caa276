"""Hugging Face checkpoints <-> the CWM module: weight names, config, safetensors (sharded too).

A directory written by `save_pretrained` loads in transformers (CwmForCausalLM / LlamaForCausalLM)
and so in vLLM with the same logits."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from model.cwm import CWM, CWMConfig

# native name -> HF name; {i} is the layer index
_LAYER_NAMES = {
    "attention_norm.weight": "input_layernorm.weight",
    "attention.wq.weight": "self_attn.q_proj.weight",
    "attention.wk.weight": "self_attn.k_proj.weight",
    "attention.wv.weight": "self_attn.v_proj.weight",
    "attention.wo.weight": "self_attn.o_proj.weight",
    "mlp_norm.weight": "post_attention_layernorm.weight",
    "mlp.w_gate.weight": "mlp.gate_proj.weight",
    "mlp.w_up.weight": "mlp.up_proj.weight",
    "mlp.w_down.weight": "mlp.down_proj.weight",
}
_TOP_NAMES = {
    "embed_tokens.weight": "model.embed_tokens.weight",
    "norm.weight": "model.norm.weight",
    "lm_head.weight": "lm_head.weight",
}
_HF_TO_NATIVE_LAYER = {v: k for k, v in _LAYER_NAMES.items()}
_HF_TO_NATIVE_TOP = {v: k for k, v in _TOP_NAMES.items()}
_HF_LAYER_RE = re.compile(r"^model\.layers\.(\d+)\.(.+)$")
_NATIVE_LAYER_RE = re.compile(r"^layers\.(\d+)\.(.+)$")


def hf_name(native: str) -> str:
    """The HF parameter name of a native one (e.g. layers.3.attention.wq.weight)."""
    if native in _TOP_NAMES:
        return _TOP_NAMES[native]
    m = _NATIVE_LAYER_RE.match(native)
    if not m or m.group(2) not in _LAYER_NAMES:
        raise KeyError(f"no Hugging Face name for parameter {native!r}")
    return f"model.layers.{m.group(1)}.{_LAYER_NAMES[m.group(2)]}"


def native_name(hf: str) -> str | None:
    """The native name of an HF parameter, or None for buffers HF may store (rotary inv_freq)."""
    if hf in _HF_TO_NATIVE_TOP:
        return _HF_TO_NATIVE_TOP[hf]
    m = _HF_LAYER_RE.match(hf)
    if m and m.group(2) in _HF_TO_NATIVE_LAYER:
        return f"layers.{m.group(1)}.{_HF_TO_NATIVE_LAYER[m.group(2)]}"
    if hf.endswith("rotary_emb.inv_freq"):
        return None
    raise KeyError(f"unexpected tensor {hf!r} in a Llama/CWM checkpoint")


def to_hf_state_dict(state_dict: dict[str, torch.Tensor], config: CWMConfig) -> dict:
    out = {hf_name(k): v for k, v in state_dict.items()}
    if config.tie_word_embeddings:
        out.pop("lm_head.weight", None)
    return out


def from_hf_state_dict(state_dict: dict[str, torch.Tensor]) -> dict:
    out = {}
    for k, v in state_dict.items():
        name = native_name(k)
        if name is not None:
            out[name] = v
    return out


def split_state_dict(
    state: dict[str, torch.Tensor], max_bytes: int, by_dtype: bool = False
) -> list[dict[str, torch.Tensor]]:
    """Split a state dict, in order, into pieces of at most `max_bytes` (a larger tensor goes
    alone): checkpoint shards, weight-sync buckets. by_dtype: a piece also holds one dtype only
    (so it flattens into one tensor)."""
    out, current, size = [], {}, 0
    for name, t in state.items():
        n = t.numel() * t.element_size()
        dtype_changes = by_dtype and current and next(iter(current.values())).dtype != t.dtype
        if current and (size + n > max_bytes or dtype_changes):
            out.append(current)
            current, size = {}, 0
        current[name] = t
        size += n
    if current or not out:
        out.append(current)
    return out


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    index = path / "model.safetensors.index.json"
    if index.exists():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        state: dict[str, torch.Tensor] = {}
        for f in files:
            state.update(load_file(path / f))
        return state
    single = path / "model.safetensors"
    if single.exists():
        return load_file(single)
    raise FileNotFoundError(
        f"{path}: no model.safetensors or model.safetensors.index.json (only safetensors "
        "checkpoints are supported)"
    )


def load_pretrained(
    path: str | os.PathLike, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"
):
    """Load an HF checkpoint directory (CwmForCausalLM or LlamaForCausalLM) -> (CWM, tokenizer).

    The tokenizer is None when the directory has no tokenizer files."""
    path = Path(path)
    cfg_file = path / "config.json"
    if not cfg_file.exists():
        raise FileNotFoundError(f"{path}: not a Hugging Face checkpoint (no config.json)")
    config = CWMConfig.from_hf_config(json.loads(cfg_file.read_text()))
    state = from_hf_state_dict(_read_safetensors(path))
    if config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    with torch.device("meta"):
        model = CWM(config)
    model = model.to_empty(device=device)
    expected = {
        k for k in model.state_dict() if not (config.tie_word_embeddings and k == "lm_head.weight")
    }
    missing, unexpected = expected - state.keys(), state.keys() - expected
    if missing or unexpected:
        raise ValueError(
            f"{path}: checkpoint does not match its config: missing {sorted(missing)[:5]}, "
            f"unexpected {sorted(unexpected)[:5]}"
        )
    model.load_state_dict(state, strict=False)
    if config.tie_word_embeddings:
        model.lm_head.weight = model.embed_tokens.weight
    model = model.to(dtype)
    return model, _load_tokenizer(path)


def _load_tokenizer(path: Path):
    if not any((path / f).exists() for f in ("tokenizer.json", "tokenizer_config.json")):
        return None
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path))


def save_pretrained(
    model: CWM,
    path: str | os.PathLike,
    tokenizer=None,
    state_dict: dict[str, torch.Tensor] | None = None,
    max_shard_bytes: int = 5 * 2**30,
) -> Path:
    """Write an HF checkpoint directory: config.json, safetensors (sharded past max_shard_bytes),
    generation_config.json and the tokenizer when given. `state_dict` overrides the module's (e.g. a
    full state dict gathered from FSDP shards)."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    config = model.config
    state = state_dict if state_dict is not None else model.state_dict()
    tensors = {
        k: v.detach().to("cpu").contiguous() for k, v in to_hf_state_dict(state, config).items()
    }
    dtype = next(iter(tensors.values())).dtype
    hf_config = config.to_hf_config()
    hf_config["torch_dtype"] = str(dtype).removeprefix("torch.")
    (path / "config.json").write_text(json.dumps(hf_config, indent=2))
    gen = {"bos_token_id": config.bos_token_id, "eos_token_id": config.eos_token_id}
    (path / "generation_config.json").write_text(json.dumps(gen, indent=2))
    shards = split_state_dict(tensors, max_shard_bytes)
    for old in path.glob("model*.safetensors*"):
        old.unlink()
    if len(shards) == 1:
        save_file(shards[0], path / "model.safetensors", metadata={"format": "pt"})
    else:
        weight_map = {}
        for i, shard in enumerate(shards):
            fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            save_file(shard, path / fname, metadata={"format": "pt"})
            weight_map.update(dict.fromkeys(shard, fname))
        total = sum(t.numel() * t.element_size() for t in tensors.values())
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (path / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    if tokenizer is not None:
        tokenizer.save_pretrained(str(path))
    return path
