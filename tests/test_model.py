"""The CWM module against transformers' own CwmForCausalLM / LlamaForCausalLM (fp32, random tiny
configs), packing, KV-cache decoding and the HF checkpoint round trip."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import CwmConfig, CwmForCausalLM, LlamaConfig, LlamaForCausalLM

from model import CWM, CWMConfig, load_pretrained, save_pretrained
from model.cwm import FULL, SLIDING, document_ids

TOL = 1e-4


def hf_cwm(seed: int = 0, tie: bool = False, window: int = 8) -> CwmForCausalLM:
    torch.manual_seed(seed)
    cfg = CwmConfig(
        vocab_size=97,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=5,  # layers 0 and 4 full, 1-3 sliding
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        sliding_window=window,
        max_position_embeddings=512,
        tie_word_embeddings=tie,
        rope_parameters={
            "rope_theta": 10000.0,
            "factor": 8.0,
            "high_freq_factor": 4.0,
            "low_freq_factor": 1.0,
            "original_max_position_embeddings": 16,
            "rope_type": "llama3",
        },
        bos_token_id=1,
        eos_token_id=2,
    )
    return _randomize(CwmForCausalLM(cfg).eval())


def hf_llama(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=101,
        hidden_size=48,
        intermediate_size=80,
        num_hidden_layers=3,
        num_attention_heads=6,
        num_key_value_heads=3,
        max_position_embeddings=256,
        tie_word_embeddings=True,
        rope_parameters={"rope_theta": 500.0, "rope_type": "default"},
    )
    return _randomize(LlamaForCausalLM(cfg).eval())


@torch.no_grad()
def _randomize(model):
    # HF initialises norms to 1; random norms make the weight mapping matter
    for name, p in model.named_parameters():
        if "norm" in name:
            p.uniform_(0.5, 1.5)
    return model


def native_from_hf(hf_model, tmp_path) -> CWM:
    hf_model.save_pretrained(tmp_path / "hf")
    model, _ = load_pretrained(tmp_path / "hf")
    return model.eval()


@pytest.mark.parametrize("tie", [False, True])
def test_cwm_logits_match_transformers(tmp_path, tie):
    hf = hf_cwm(tie=tie)
    ours = native_from_hf(hf, tmp_path)
    assert ours.config.layer_types == [FULL, SLIDING, SLIDING, SLIDING, FULL]
    ids = torch.randint(0, 97, (2, 40))  # 40 tokens: five times the window of 8
    with torch.no_grad():
        want = hf(ids).logits
        got = ours(ids)
    assert got.shape == want.shape == (2, 40, 97)
    assert (got - want).abs().max().item() <= TOL


def test_llama_logits_match_transformers(tmp_path):
    hf = hf_llama()
    ours = native_from_hf(hf, tmp_path)
    assert ours.config.model_type == "llama" and ours.config.tie_word_embeddings
    ids = torch.randint(0, 101, (3, 33))
    with torch.no_grad():
        assert (ours(ids) - hf(ids).logits).abs().max().item() <= TOL


def test_sliding_window_changes_the_result(tmp_path):
    """The parity test would not notice a missing window if the window never binds: check it does."""
    hf = hf_cwm()
    ours = native_from_hf(hf, tmp_path)
    ids = torch.randint(0, 97, (1, 40))
    with torch.no_grad():
        windowed = ours(ids)
        for layer in ours.layers:
            layer.attention.sliding = False
        full = ours(ids)
    assert (windowed[:, :8] - full[:, :8]).abs().max() <= TOL  # identical inside the first window
    assert (windowed[:, 8:] - full[:, 8:]).abs().max() > 1e-2


def tiny_model(seed: int = 0, **overrides) -> CWM:
    torch.manual_seed(seed)
    model = CWM(CWMConfig.preset("tiny", **overrides)).eval()
    model.init_weights(std=0.2)
    return model


def test_packed_row_equals_documents_one_by_one():
    model = tiny_model()
    lengths = [7, 30, 1, 12]  # 30 > the tiny preset's window of 16
    docs = [torch.randint(0, 256, (1, n)) for n in lengths]
    packed = torch.cat(docs, dim=1)
    positions = torch.cat([torch.arange(n) for n in lengths])[None]
    assert document_ids(positions).tolist()[0] == sum(
        ([i + 1] * n for i, n in enumerate(lengths)), []
    )
    with torch.no_grad():
        got = model(packed, positions)
        want = torch.cat([model(d) for d in docs], dim=1)
        # packed without the position resets must differ: the test can tell
        leaky = model(packed)
    assert (got - want).abs().max().item() <= TOL
    assert (leaky - want).abs().max().item() > 1e-2


def test_per_document_attention_equals_the_dense_mask_with_gradients():
    """The `docs` backend (one SDPA call per document) against the `dense` reference (one masked
    call per row): two rows split differently, documents shorter and longer than the window."""
    model = tiny_model().train()
    window = model.config.sliding_window
    splits = [[5, window + 9, 1, 19], [2 * window + 3, 11, 4]]  # 50 tokens each
    ids = torch.randint(0, 256, (2, 50))
    positions = torch.stack([torch.cat([torch.arange(n) for n in row]) for row in splits])
    results = {}
    for backend in ("dense", "docs"):
        model.zero_grad()
        model.attn_backend = backend
        logits = model(ids, positions)
        (logits.float().pow(2).mean()).backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        results[backend] = logits.detach(), grads
    (dense, g_dense), (docs, g_docs) = results["dense"], results["docs"]
    assert (dense - docs).abs().max().item() <= TOL
    assert g_dense.keys() == g_docs.keys() and len(g_docs) > 10
    for name in g_dense:
        scale = g_dense[name].abs().max().item() + 1e-12
        assert (g_dense[name] - g_docs[name]).abs().max().item() <= 1e-4 * scale, name
    with pytest.raises(ValueError, match="attention backend"):
        model.attn_backend = "sdpa"
        model(ids, positions)


def test_kv_cache_decoding_equals_full_forward():
    """Prefill rows of different lengths (right-padded), then decode one token at a time past the
    sliding window; every step's logits equal a full forward over the sequence so far."""
    model = tiny_model()
    window = model.config.sliding_window
    prompt_lens = [3, 9]
    total = window * 3 + 5
    seqs = torch.randint(0, 256, (2, total))
    model.setup_cache(batch_size=2, max_len=total + 8)
    with torch.no_grad():
        Lmax = max(prompt_lens)
        prefill = seqs[:, :Lmax].clone()
        positions = torch.arange(Lmax).expand(2, Lmax)
        last = torch.tensor([[n - 1] for n in prompt_lens])
        logits = model(prefill, positions, use_cache=True, logits_index=last)[:, 0]
        cur = torch.tensor(prompt_lens)
        steps = 0
        while int(cur.max()) < total:
            for row in range(2):
                n = int(cur[row])
                if n <= total:
                    full = model(seqs[row : row + 1, :n])[0, -1]
                    assert (logits[row] - full).abs().max().item() <= TOL, (row, n)
            step_ids = seqs.gather(1, cur.clamp(max=total - 1)[:, None])
            logits = model(step_ids, cur[:, None], use_cache=True)[:, 0]
            cur = cur + 1
            steps += 1
    assert steps > 2 * window


def test_keep_cache_rows_drops_finished_sequences():
    model = tiny_model()
    seqs = torch.randint(0, 256, (3, 10))
    model.setup_cache(batch_size=3, max_len=16)
    with torch.no_grad():
        model(seqs[:, :9], torch.arange(9).expand(3, 9), use_cache=True)
        model.keep_cache_rows(torch.tensor([0, 2]))
        got = model(seqs[[0, 2], 9:10], torch.tensor([[9], [9]]), use_cache=True)[:, 0]
        want = model(seqs[[0, 2]])[:, -1]
    assert (got - want).abs().max().item() <= TOL


@pytest.mark.parametrize("model_type", ["cwm", "llama"])
def test_save_pretrained_round_trip_through_transformers(tmp_path, model_type):
    overrides = {"model_type": model_type}
    if model_type == "llama":
        overrides.update(sliding_window=None, layer_types=None, rope_scaling=None)
    model = tiny_model(**overrides)
    # a tiny max shard size forces a sharded checkpoint with an index
    save_pretrained(model, tmp_path / "ckpt", max_shard_bytes=64 * 1024)
    assert (tmp_path / "ckpt" / "model.safetensors.index.json").exists()
    cfg = json.loads((tmp_path / "ckpt" / "config.json").read_text())
    assert cfg["model_type"] == model_type
    cls = CwmForCausalLM if model_type == "cwm" else LlamaForCausalLM
    hf = cls.from_pretrained(tmp_path / "ckpt", dtype=torch.float32).eval()
    reloaded, tokenizer = load_pretrained(tmp_path / "ckpt")
    assert tokenizer is None
    ids = torch.randint(0, 256, (2, 40))
    with torch.no_grad():
        want = model(ids)
        assert (hf(ids).logits - want).abs().max().item() <= TOL
        assert torch.equal(reloaded(ids), want)


def test_bad_checkpoints_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="no config.json"):
        load_pretrained(tmp_path)
    model = tiny_model()
    save_pretrained(model, tmp_path / "ckpt")
    cfg = json.loads((tmp_path / "ckpt" / "config.json").read_text())
    cfg["num_hidden_layers"] = 5
    cfg["layer_types"] = cfg["layer_types"] + ["full_attention"]
    (tmp_path / "ckpt" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="missing.*layers.4"):
        load_pretrained(tmp_path / "ckpt")
    with pytest.raises(ValueError, match="layer_types has 2 entries"):
        CWMConfig.preset("tiny", layer_types=[FULL, FULL])
    with pytest.raises(ValueError, match="unknown preset"):
        CWMConfig.preset("huge")


def test_cwm_32b_preset_matches_hf_defaults():
    ours = CWMConfig.preset("cwm-32b").to_hf_config()
    hf = CwmConfig().to_dict()
    for key in (
        "hidden_size",
        "intermediate_size",
        "num_hidden_layers",
        "num_attention_heads",
        "num_key_value_heads",
        "head_dim",
        "sliding_window",
        "layer_types",
        "vocab_size",
    ):
        assert ours[key] == hf[key], key
    assert ours["rope_parameters"] == hf["rope_parameters"]
    assert 31e9 < CWMConfig.preset("cwm-32b").num_params < 34e9
