"""The native engine against full forwards of the same model: greedy and sampled tokens, their
log-probs, seeds, stop tokens, row dropping and weight updates between decode steps."""

from __future__ import annotations

import copy
import math
import threading
import time

import pytest
import torch

from model import CWM, CWMConfig
from model.hf import to_hf_state_dict
from rl.engines.base import SamplingParams
from rl.engines.native import NativeEngine, process_logits, sample

TOL = 1e-4


def tiny(seed: int) -> CWM:
    torch.manual_seed(seed)
    model = CWM(CWMConfig.preset("tiny")).eval()
    model.init_weights(std=0.3)
    return model


def reference_greedy(model: CWM, prompt: list[int], n: int) -> tuple[list[int], list[float]]:
    ids, lps = list(prompt), []
    with torch.no_grad():
        for _ in range(n):
            logits = model(torch.tensor([ids]))[0, -1]
            tok = int(logits.argmax())
            lps.append(float(logits.log_softmax(-1)[tok]))
            ids.append(tok)
    return ids[len(prompt) :], lps


def test_process_logits_by_hand():
    # probabilities 0.1, 0.2, 0.3, 0.4 (temperature 1)
    logits = torch.tensor([[math.log(1), math.log(2), math.log(3), math.log(4)]] * 4)
    temperature = torch.ones(4)
    top_k = torch.tensor([0, 2, 0, 0])
    top_p = torch.tensor([1.0, 1.0, 0.5, 0.35])
    probs = process_logits(logits, temperature, top_k, top_p).exp()
    want = torch.tensor(
        [
            [0.1, 0.2, 0.3, 0.4],
            [0.0, 0.0, 3 / 7, 4 / 7],  # top-2: {0.3, 0.4} renormalised
            [0.0, 0.0, 3 / 7, 4 / 7],  # top-p 0.5: 0.4 < 0.5, 0.4 + 0.3 >= 0.5
            [0.0, 0.0, 0.0, 1.0],  # top-p 0.35: 0.4 alone reaches it
        ]
    )
    assert torch.allclose(probs, want, atol=1e-6)
    # temperature 2 on probabilities (0.1 .. 0.4): p_i ~ sqrt(i) -> 1, 1.414, 1.732, 2 over 6.146
    t2 = process_logits(logits[:1], torch.tensor([2.0]), torch.tensor([0]), torch.tensor([1.0]))
    s = 1 + math.sqrt(2) + math.sqrt(3) + 2
    assert torch.allclose(
        t2.exp(), torch.tensor([[1 / s, math.sqrt(2) / s, math.sqrt(3) / s, 2 / s]])
    )


def test_greedy_matches_full_forward_past_the_window():
    model = tiny(0)
    engine = NativeEngine(copy.deepcopy(model))  # the engine packs its own copy
    prompts = [[5, 6, 7], list(range(10, 30)), [9]]  # 20 > the window of 16
    n = 24
    outs = engine.generate(prompts, SamplingParams(max_new_tokens=n, temperature=0))
    for prompt, out in zip(prompts, outs):
        want_ids, want_lps = reference_greedy(model, prompt, n)
        assert out.token_ids == want_ids
        assert max(abs(a - b) for a, b in zip(out.logprobs, want_lps)) <= TOL
        assert out.finish_reason == "length" and out.versions == [0] * n
        assert out.prompt_len == len(prompt)


def test_sampled_logprobs_are_those_of_the_sampling_distribution():
    model = tiny(1)
    engine = NativeEngine(copy.deepcopy(model))  # the engine packs its own copy
    params = SamplingParams(max_new_tokens=12, temperature=0.7, top_k=20, top_p=0.9, seed=3)
    prompt = [3, 1, 4, 1, 5]
    out = engine.generate([prompt], params)[0]
    ids = list(prompt)
    with torch.no_grad():
        for tok, lp in zip(out.token_ids, out.logprobs):
            logits = model(torch.tensor([ids]))[0, -1:]
            dist = process_logits(
                logits, torch.tensor([0.7]), torch.tensor([20]), torch.tensor([0.9])
            )
            assert dist[0, tok] > float("-inf"), "sampled a token outside top-k/top-p"
            assert abs(float(dist[0, tok]) - lp) <= TOL
            ids.append(tok)


def test_seeded_requests_do_not_depend_on_their_batch():
    engine = NativeEngine(tiny(2))
    p = SamplingParams(max_new_tokens=10, temperature=1.0, seed=42)
    alone = engine.generate([[1, 2, 3]], p)[0].token_ids
    batched = engine.generate([[9, 9], [1, 2, 3], [4]], [SamplingParams(seed=1), p, p])[1].token_ids
    other_seed = engine.generate([[1, 2, 3]], SamplingParams(max_new_tokens=10, seed=43))[0]
    assert alone == batched
    assert other_seed.token_ids != alone


def test_seeds_that_differ_above_bit_32_draw_different_streams():
    """torch's CPU generator keeps a seed's low 32 bits; the engine folds all 64 in."""
    engine = NativeEngine(tiny(2))

    def draw(seed: int) -> list[int]:
        params = SamplingParams(max_new_tokens=16, temperature=1.0, seed=seed)
        return engine.generate([[1, 2, 3]], params)[0].token_ids

    assert draw(7) == draw(7)
    assert draw(7) != draw(7 + 2**32) and draw(2**40) != draw(2**41)


def test_a_group_of_identical_prompts_is_prefilled_once():
    """GRPO asks for G samples of one prompt: it is prefilled once and its KV cache copied to
    the G rows; every sample (greedy and seeded) is the one it would be prefilled alone."""
    model = tiny(4)
    engine = NativeEngine(copy.deepcopy(model))
    prompt, other = [3, 1, 4, 1, 5, 9, 2, 6], [2, 7]
    params = [SamplingParams(max_new_tokens=12, temperature=1.0, seed=s) for s in range(4)]
    params.append(SamplingParams(max_new_tokens=12, temperature=0))
    prompts = [prompt] * 4 + [other]
    rows_per_forward = []
    hook = engine.model.embed_tokens.register_forward_hook(
        lambda mod, args, out: rows_per_forward.append(tuple(args[0].shape))
    )
    try:
        shared = engine.generate(prompts, params)
    finally:
        hook.remove()
    assert rows_per_forward[0] == (2, len(prompt))  # two distinct prompts, prefilled once each
    assert rows_per_forward[1][0] == 5  # then all five rows decode
    assert engine.prefill_tokens == 2 * len(prompt)
    engine.share_prompts = False
    separate = engine.generate(prompts, params)
    assert engine.prefill_tokens == 2 * len(prompt) + 5 * len(prompt)
    for a, b in zip(shared, separate):
        assert a.token_ids == b.token_ids
        assert max(abs(x - y) for x, y in zip(a.logprobs, b.logprobs)) <= TOL
    assert len({tuple(c.token_ids) for c in shared[:4]}) > 1  # the seeds still differ
    assert shared[4].token_ids == reference_greedy(model, other, 12)[0]


def test_stop_tokens_and_finished_rows_leave_the_batch():
    model = tiny(0)
    engine = NativeEngine(copy.deepcopy(model))  # the engine packs its own copy
    greedy_ids, _ = reference_greedy(model, [5, 6, 7], 30)
    stop = greedy_ids[3]
    first = greedy_ids.index(stop)
    rows_per_forward = []
    hook = engine.model.embed_tokens.register_forward_hook(
        lambda mod, args, out: rows_per_forward.append(args[0].shape[0])
    )
    try:
        outs = engine.generate(
            [[5, 6, 7], [8, 8]],
            [
                SamplingParams(max_new_tokens=30, temperature=0, stop_token_ids=[stop]),
                SamplingParams(max_new_tokens=30, temperature=0),
            ],
        )
    finally:
        hook.remove()
    assert outs[0].finish_reason == "stop" and outs[0].token_ids == greedy_ids[: first + 1]
    assert outs[1].finish_reason == "length" and len(outs[1].token_ids) == 30
    # prefill with both rows, then both rows until row 0 stops, then row 1 alone
    assert rows_per_forward[0] == 2
    assert rows_per_forward[1:] == [2] * first + [1] * (29 - first)


def test_bad_requests_are_named():
    engine = NativeEngine(tiny(0))
    with pytest.raises(ValueError, match="prompt 1 is empty"):
        engine.generate([[1], []], SamplingParams())
    with pytest.raises(ValueError, match="outside"):
        engine.generate([[1, 999]], SamplingParams())
    with pytest.raises(ValueError, match="top_p"):
        SamplingParams(top_p=0)
    with pytest.raises(ValueError, match="2 SamplingParams for 1 prompts"):
        engine.generate([[1]], [SamplingParams(), SamplingParams()])


def test_weight_update_between_decode_steps():
    """Pause mid-generation, load another model's weights, resume: the tokens after the update carry
    the new version and are those of the new weights over the KV cache the old weights wrote (the
    cache of requests in flight is kept, not recomputed, as in PipelineRL)."""
    old, new = tiny(0), tiny(7)
    engine = NativeEngine(tiny(0))
    prompt, n = [5, 6, 7], 20
    seen_steps = threading.Event()
    hook_calls = []

    def hook(mod, args, out):
        hook_calls.append(1)
        if len(hook_calls) == 6:  # prefill + 4 decode steps done: pause before the next one
            engine.pause()
            seen_steps.set()

    handle = engine.model.embed_tokens.register_forward_hook(hook)
    result = {}
    thread = threading.Thread(
        target=lambda: result.update(
            out=engine.generate([prompt], SamplingParams(max_new_tokens=n, temperature=0))[0]
        )
    )
    thread.start()
    assert seen_steps.wait(30)
    engine.update_weights(to_hf_state_dict(new.state_dict(), new.config), version=1)
    engine.resume()
    thread.join(30)
    handle.remove()
    out = result["out"]
    k = out.versions.index(1)
    assert out.versions == [0] * k + [1] * (n - k) and 0 < k < n
    assert out.token_ids[:k] == reference_greedy(old, prompt, k)[0]
    # reference: old weights fill the cache up to the last token sampled before the update, then
    # the new weights decode greedily from there
    ref, ids = tiny(0), prompt + out.token_ids[:k]
    ref.setup_cache(1, len(prompt) + n)
    with torch.no_grad():
        ref(torch.tensor([ids[:-1]]), use_cache=True)
        ref.load_state_dict(new.state_dict())
        cont = []
        for pos in range(len(ids) - 1, len(prompt) + n - 1):
            last = ids[-1] if not cont else cont[-1]
            cont.append(
                int(
                    ref(torch.tensor([[last]]), torch.tensor([[pos]]), use_cache=True)[
                        0, -1
                    ].argmax()
                )
            )
    assert out.token_ids[k:] == cont
    # and the update mattered: the old weights alone would have continued differently
    assert out.token_ids[k:] != reference_greedy(old, prompt, n)[0][k:]
    with pytest.raises(ValueError, match="shape"):
        engine.update_weights({"model.norm.weight": torch.ones(3)}, version=2)


def test_default_model_answers_through_the_native_engine():
    """SmolLM2-135M-Instruct (the embedded default), greedy, through ChatFormat token ids."""
    from conftest import require

    from model import load_pretrained
    from model.chat import ChatFormat

    try:
        from model.default_model import default_model_dir

        path = default_model_dir()
    except Exception as e:  # noqa: BLE001 - the package is optional for the test suite
        require("default_model", False, str(e))
    model, tokenizer = load_pretrained(path)
    chat = ChatFormat.from_tokenizer(tokenizer)
    prompt = chat.encode_messages(
        [
            {
                "role": "system",
                "content": "You are a helpful AI assistant named SmolLM, trained by Hugging Face",
            },
            {"role": "user", "content": "What is 2+3?"},
        ]
    )
    out = NativeEngine(model).generate(
        [prompt],
        SamplingParams(max_new_tokens=24, temperature=0, stop_token_ids=chat.stop_token_ids),
    )[0]
    text = chat.response_text(out.token_ids)
    assert out.finish_reason == "stop" and "5" in text, text


def test_prepacked_kernels_match_the_plain_ones():
    """The engine's oneDNN-packed linears (CPU) sample the same tokens with the same log-probs."""
    from conftest import require

    from rl.engines import cpu_kernels

    require("onednn", cpu_kernels.available(), "torch has no prepacked mkldnn linear here")
    packed = NativeEngine(tiny(4))
    plain = NativeEngine(tiny(4), prepack=False)
    assert packed._packers and not plain._packers
    prompts = [[1, 2, 3], list(range(5, 25))]
    params = SamplingParams(max_new_tokens=20, temperature=0.8, seed=5)
    a, b = packed.generate(prompts, params), plain.generate(prompts, params)
    for x, y in zip(a, b):
        assert x.token_ids == y.token_ids
        assert max(abs(p - q) for p, q in zip(x.logprobs, y.logprobs)) < 1e-4
    # after a weight update the packed copies follow the new weights
    other = tiny(5)
    packed.update_weights(to_hf_state_dict(other.state_dict(), other.config), version=1)
    plain.update_weights(to_hf_state_dict(other.state_dict(), other.config), version=1)
    a, b = packed.generate(prompts, params), plain.generate(prompts, params)
    assert [x.token_ids for x in a] == [y.token_ids for y in b]


def test_every_update_reaches_the_packed_weights_even_from_reused_storage():
    """The packed copies are rebuilt on every update, whatever the source tensors: a learner that
    sends the same buffers again (same data_ptr, new values) is followed, update after update,
    exactly as a fresh engine built on those weights would sample."""
    prompts = [[1, 2, 3], list(range(5, 25))]
    params = SamplingParams(max_new_tokens=12, temperature=0.8, seed=3)
    engine = NativeEngine(tiny(4))  # prepacked where the kernel exists
    source = to_hf_state_dict(tiny(5).state_dict(), tiny(5).config)  # reused for every update
    for version in (1, 2, 3):
        with torch.no_grad():
            for t in source.values():
                t.mul_(0.9).add_(0.01 * version)  # new values, same storage
        engine.update_weights(source, version=version)
        fresh_engine = NativeEngine(tiny(4), prepack=bool(engine._packers))
        fresh_engine.update_weights(copy.deepcopy(source), version=version)
        a, b = engine.generate(prompts, params), fresh_engine.generate(prompts, params)
        for x, y in zip(a, b):
            assert x.versions == [version] * len(x.token_ids)
            assert x.token_ids == y.token_ids and x.logprobs == y.logprobs


def test_a_bad_update_changes_nothing():
    """An update is applied whole or not at all: a bad tensor anywhere in it (here the last)
    leaves every weight and the version as they were."""
    engine = NativeEngine(tiny(0))
    before = {k: v.clone() for k, v in engine.model.state_dict().items()}
    update = {k: v + 1 for k, v in to_hf_state_dict(tiny(1).state_dict(), tiny(1).config).items()}
    del update["model.norm.weight"]
    update["model.norm.weight"] = torch.ones(3)  # the wrong shape, after all the good ones
    with pytest.raises(ValueError, match="shape"):
        engine.update_weights(update, version=1)
    assert engine.version == 0
    assert all(torch.equal(v, before[k]) for k, v in engine.model.state_dict().items())


def test_top_p_fast_path_equals_a_full_sort(monkeypatch):
    from rl.engines import native

    torch.manual_seed(0)
    peaked = torch.randn(6, 500) * 6  # most mass in a few tokens: the candidate path
    flat = torch.randn(6, 500) * 0.1  # mass spread out: falls back to a full sort
    top_p = torch.tensor([0.1, 0.5, 0.9, 0.95, 0.99, 1.0])
    for logits in (peaked, flat):
        monkeypatch.setattr(native, "TOP_P_CANDIDATES", 500)  # sorts everything
        full = native.top_p_drop(logits, top_p)
        monkeypatch.setattr(native, "TOP_P_CANDIDATES", 16)
        assert torch.equal(native.top_p_drop(logits, top_p), full)
    assert not full[-1].any()  # top_p 1 keeps every token


def test_sample_draws_from_the_distribution():
    probs = torch.tensor([[0.1, 0.2, 0.3, 0.4, 0.0]])
    gen = [torch.Generator().manual_seed(0)]
    counts = torch.zeros(5)
    for _ in range(4000):
        counts[sample(probs.log(), gen)] += 1
    freq = counts / counts.sum()
    assert freq[4] == 0  # a masked token is never drawn
    assert (freq[:4] - probs[0, :4]).abs().max() < 0.03


# -- continuous batching ---------------------------------------------------------------------------


def test_a_short_request_joins_a_running_batch_and_finishes_first():
    """A request submitted while a long one decodes joins the batch at the next step boundary
    (its own prefill, then one decode forward of both rows) and finishes first; both produce
    exactly what each produces alone (greedy and seeded), their log-probs within TOL."""
    model = tiny(5)
    engine = NativeEngine(copy.deepcopy(model))
    long_p = SamplingParams(max_new_tokens=40, temperature=1.0, seed=11)
    short_p = SamplingParams(max_new_tokens=5, temperature=0)
    alone_long = engine.generate([[5, 6, 7]], long_p)[0]
    alone_short = engine.generate([[9, 3, 8, 1]], short_p)[0]

    rows, order, short = [], [], {}

    def hook(mod, args, out):
        rows.append(tuple(args[0].shape))
        if len(rows) == 4:  # prefill + 3 decode steps of the long request
            short["f"] = engine.submit([[9, 3, 8, 1]], short_p)[0]
            short["f"].add_done_callback(lambda f: order.append("short"))

    handle = engine.model.embed_tokens.register_forward_hook(hook)
    try:
        (long_f,) = engine.submit([[5, 6, 7]], long_p)
        long_f.add_done_callback(lambda f: order.append("long"))
        long_out, long_admitted = long_f.result(60)
        short_out, short_admitted = short["f"].result(60)
    finally:
        handle.remove()
    assert order == ["short", "long"]
    assert short_admitted > long_admitted
    # long prefill, 3 decodes of one row, the short prompt's prefill, then both rows decode
    assert rows[:6] == [(1, 3), (1, 1), (1, 1), (1, 1), (1, 4), (2, 1)]
    assert rows.count((2, 1)) == 4  # the short one leaves after its 5th token (4 forwards)
    assert long_out.token_ids == alone_long.token_ids
    assert (
        short_out.token_ids == alone_short.token_ids == reference_greedy(model, [9, 3, 8, 1], 5)[0]
    )
    for a, b in ((long_out, alone_long), (short_out, alone_short)):
        assert max(abs(x - y) for x, y in zip(a.logprobs, b.logprobs)) <= TOL


def test_max_batch_holds_requests_until_a_row_leaves():
    engine = NativeEngine(tiny(1), max_batch=2)
    rows = []
    handle = engine.model.embed_tokens.register_forward_hook(
        lambda mod, args, out: rows.append(args[0].shape[0])
    )
    try:
        params = [SamplingParams(max_new_tokens=n, temperature=0) for n in (3, 8, 4)]
        outs = engine.generate([[1, 2], [3, 4], [5, 6]], params)
    finally:
        handle.remove()
    assert [len(o.token_ids) for o in outs] == [3, 8, 4]
    assert max(rows) == 2  # never three rows at once
    # two rows decode until the first leaves (after 3 tokens); the third joins then
    assert rows[:4] == [2, 2, 2, 1]
    solo = NativeEngine(tiny(1))
    assert outs[2].token_ids == solo.generate([[5, 6]], params[2])[0].token_ids


def test_a_failing_forward_fails_every_request_in_the_batch_and_the_engine_recovers():
    engine = NativeEngine(tiny(3))
    calls = []

    def hook(mod, args, out):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("injected forward failure")

    handle = engine.model.embed_tokens.register_forward_hook(hook)
    try:
        futures = engine.submit([[1, 2], [3]], SamplingParams(max_new_tokens=10, temperature=0))
        for f in futures:
            with pytest.raises(RuntimeError, match="injected forward failure"):
                f.result(60)
    finally:
        handle.remove()
    out = engine.generate([[1, 2]], SamplingParams(max_new_tokens=4, temperature=0))[0]
    assert len(out.token_ids) == 4 and out.finish_reason == "length"


def test_the_async_batcher_submits_as_requests_arrive():
    """rl/rollout.py's Batcher in async mode: a request submitted after a long one started
    comes back first; with continuous=False (batch at a time) it waits for the long one."""
    import asyncio

    from rl.rollout import Batcher

    async def run(continuous: bool) -> list[str]:
        engine = NativeEngine(tiny(6))
        batcher = Batcher(engine, max_batch=8, deterministic=False, continuous=continuous)
        batcher.start()
        done = []

        async def request(name, prompt, n, delay):
            await asyncio.sleep(delay)
            await batcher.generate((name,), prompt, SamplingParams(max_new_tokens=n))
            done.append(name)

        await asyncio.gather(request("long", [1, 2, 3], 300, 0), request("short", [4, 5], 3, 0.05))
        batcher.task.cancel()
        engine.close()
        return done

    assert asyncio.run(run(True)) == ["short", "long"]
    assert asyncio.run(run(False)) == ["long", "short"]


# -- streamed weight updates -----------------------------------------------------------------------


def _buckets(model: CWM, size: int) -> tuple[list, list]:
    """The model's weights as a streamed update: (name, shape)s and buckets of pieces."""
    from rl.weights import bucket_plan, plan_tensors

    sd = to_hf_state_dict(model.state_dict(), model.config)
    plan = bucket_plan([(k, tuple(v.shape), v.dtype) for k, v in sd.items()], size)
    buckets = [
        [(name, start, sd[name].reshape(-1)[start:stop]) for name, _, start, stop in pieces]
        for _, pieces in plan
    ]
    return plan_tensors(plan), buckets


def test_a_streamed_update_equals_a_whole_one():
    new = tiny(7)
    names, buckets = _buckets(new, 4096)
    assert len(buckets) > 3
    streamed, whole = NativeEngine(tiny(0)), NativeEngine(tiny(0))
    streamed.load_streaming(names, iter(buckets), version=3)
    whole.update_weights(to_hf_state_dict(new.state_dict(), new.config), version=3)
    p = SamplingParams(max_new_tokens=12, temperature=0)
    a, b = streamed.generate([[4, 2]], p)[0], whole.generate([[4, 2]], p)[0]
    assert a.token_ids == b.token_ids and a.versions == b.versions == [3] * 12
    assert a.token_ids == reference_greedy(new, [4, 2], 12)[0]


def test_a_streamed_update_with_a_bad_name_or_shape_changes_nothing():
    engine = NativeEngine(tiny(0))
    before = engine.generate([[4, 2]], SamplingParams(max_new_tokens=8, temperature=0))[0]
    names, buckets = _buckets(tiny(7), 4096)
    consumed = []

    def stream():
        for b in buckets:
            consumed.append(1)
            yield b

    for bad, match in (
        (names + [("model.layers.99.mlp.up_proj.weight", (2, 2))], "unknown parameter"),
        ([(names[0][0], (1, 1))] + names[1:], "shape"),
    ):
        with pytest.raises((KeyError, ValueError), match=match):
            engine.load_streaming(bad, stream(), version=1)
    assert not consumed and engine.version == 0
    after = engine.generate([[4, 2]], SamplingParams(max_new_tokens=8, temperature=0))[0]
    assert after.token_ids == before.token_ids


def test_a_stream_broken_midway_holds_sampling_until_a_complete_update():
    """Part of an update loaded, then the transport fails: no token may be sampled on those
    torn weights. A request waits; the next complete update releases it, and every token it
    samples carries the new version."""
    new = tiny(7)
    engine = NativeEngine(tiny(0))
    names, buckets = _buckets(new, 4096)

    def broken():
        yield buckets[0]
        raise ConnectionError("peer gone")

    with pytest.raises(ConnectionError):
        engine.load_streaming(names, broken(), version=1)
    (future,) = engine.submit([[4, 2]], SamplingParams(max_new_tokens=6, temperature=0))
    time.sleep(0.5)
    assert not future.done()  # waiting, not sampling on torn weights
    engine.load_streaming(names, iter(buckets), version=2)
    out, _ = future.result(30)
    assert out.versions == [2] * 6
    assert out.token_ids == reference_greedy(new, [4, 2], 6)[0]
