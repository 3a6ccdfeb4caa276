"""Sampling parity: the native engine samples from the distribution it reports.

For fixed prompts, many seeded samples of the first token and of a two-token continuation are
tested against the model's own softmax(logits / T) (a float64 forward of the same weights, one
full forward per prefix, no KV cache) by chi-square goodness of fit; every reported log-prob must
be log softmax(logits / T)[token] of that forward. Both with prefix sharing on (the G identical
prompts of a group prefilled once, their KV cache copied to the rows) and off (every row prefilled
on its own), with the rows of a group sampled together in one batch next to another prompt of a
different length (right padding in the prefill). The rows of a group must draw independent
streams: equal tokens between rows of a group no more (or less) often than sum p^2 predicts, and
disjoint row pairs (0, 1), (2, 3), ... distributed as the product of their marginals; each for
rollout-style seeds, consecutive seeds and engine-drawn seeds (seed=None). Seeds reproduce.

False alarms: every statistical test here has a null hypothesis that holds exactly for a correct
engine, and rejects at p < ALPHA = FILE_ALPHA / N_TESTS (Bonferroni), so a correct engine fails
this file with probability < FILE_ALPHA = 1e-3 over the choice of seeds. The seeds are fixed, so
CI is deterministic: a given machine passes or fails always; the 1e-3 describes how unlucky the
seed choice would have to be (float rounding differences between CPUs can flip a token whose
uniform draw lies within ~1e-7 of a CDF boundary, which moves a p-value negligibly). Every test
also checks its own power: the same statistic on the same samples must reject a slightly wrong
reference (temperature off by 10 %, the second token's off by 20 %, or rows of a group given one
seed).

The vLLM engine's counterpart is at the end of tests/test_engine_vllm.py (it needs .venv-vllm)
and reuses the helpers here."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from model import CWM, CWMConfig
from rl.engines.base import SamplingParams
from rl.engines.native import NativeEngine

V = 48  # a small vocabulary: enough expected counts per chi-square cell
PROMPTS = ([3, 1, 4, 1, 5, 9, 2, 6], [7, 7])  # different lengths: the short one is right-padded
TEMPERATURES = (0.7, 1.0)
N_PER_PROMPT = 20_000  # samples of each prompt per (temperature, sharing) configuration
BATCHES = 4  # ... drawn in this many generate() calls of 2 * N_PER_PROMPT / BATCHES rows
G = 8  # rows of a group in the independence tests
GROUPS = 2_500  # groups per seed scheme (20,000 rows), alternating between the two prompts
GROUPS_PER_BATCH = 250
SEED_SCHEMES = ("rollout", "consecutive", "engine")

# chi-square goodness of fit, first token and (t1, t2): 2 temperatures x 2 sharing x 2 prompts x 2;
# independence: 3 seed schemes x 3 statistics
N_TESTS = len(TEMPERATURES) * 2 * len(PROMPTS) * 2 + len(SEED_SCHEMES) * 3
FILE_ALPHA = 1e-3
ALPHA = FILE_ALPHA / N_TESTS  # 4e-5 per test
# |reported log-prob - log softmax(logits / T)[token]| of the float64 forward: the engine runs in
# float32 with a KV cache (measured here: max 2.0e-5, mean 1-2e-6; against a float32 full forward,
# the learner's, max 1.1e-5); the mean bound catches a systematic offset
TOL, MEAN_TOL = 3e-5, 5e-6


# -- statistics (float64 torch; no scipy in the main virtualenv) ----------------------------------


def chi2_sf(stat: float, df: int) -> float:
    """P(X >= stat) for X ~ chi-square(df): the regularised upper incomplete gamma function."""
    return float(
        torch.special.gammaincc(
            torch.tensor(df / 2, dtype=torch.float64), torch.tensor(stat / 2, dtype=torch.float64)
        )
    )


def normal_two_sided(z: float) -> float:
    return math.erfc(abs(z) / math.sqrt(2))


def merge_small(
    observed: torch.Tensor, expected: torch.Tensor, min_expected: float = 5.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Cells with expected count >= min_expected stay as they are; the others, in increasing order
    of expected count, are pooled into consecutive groups of expected count >= min_expected (a
    short remainder joins the first cell of the result). The pooling depends on the expected
    counts only, never on the observed ones, so the chi-square null distribution holds."""
    observed, expected = observed.double().flatten(), expected.double().flatten()
    order = expected.argsort()
    observed, expected = observed[order], expected[order]
    small = expected < min_expected
    cells_o, cells_e = [], []
    acc_o, acc_e = 0.0, 0.0
    for o, e in zip(observed[small].tolist(), expected[small].tolist()):
        acc_o, acc_e = acc_o + o, acc_e + e
        if acc_e >= min_expected:
            cells_o.append(acc_o)
            cells_e.append(acc_e)
            acc_o, acc_e = 0.0, 0.0
    cells_o += observed[~small].tolist()
    cells_e += expected[~small].tolist()
    if acc_e > 0 or acc_o > 0:
        if cells_e:
            cells_o[0] += acc_o
            cells_e[0] += acc_e
        else:
            cells_o, cells_e = [acc_o], [acc_e]
    return torch.tensor(cells_o, dtype=torch.float64), torch.tensor(cells_e, dtype=torch.float64)


def chi_square_gof(samples: torch.Tensor, probs: torch.Tensor) -> tuple[float, int, float]:
    """Chi-square goodness of fit of category samples (ids into probs.flatten()) to `probs`:
    (statistic, degrees of freedom, p-value), cells of expected count < 5 merged first."""
    probs = probs.double().flatten()
    assert abs(float(probs.sum()) - 1) < 1e-9
    counts = torch.bincount(samples.flatten(), minlength=probs.numel()).double()
    observed, expected = merge_small(counts, probs * samples.numel())
    stat = float(((observed - expected) ** 2 / expected).sum())
    df = observed.numel() - 1
    return stat, df, chi2_sf(stat, df)


def collision_test(samples: torch.Tensor, probs: torch.Tensor) -> tuple[float, float, float]:
    """Rows of each group drawn independently from their group's distribution? samples [M, G]
    category ids, probs [M, C] each group's distribution. C = the number of equal pairs
    (i < j) within a group; under independence E[C] = P q2 and
    Var[C] = P q2 (1 - q2) + 2 P (G - 2) (q3 - q2^2), with P = G (G - 1) / 2, q2 = sum p^2,
    q3 = sum p^3 (pairs sharing a row covary; disjoint pairs do not). Summed over the M
    independent groups, z is asymptotically normal: (observed, expected, two-sided p)."""
    M, g = samples.shape
    equal = (samples[:, :, None] == samples[:, None, :]).triu(1).sum((1, 2)).double()
    probs = probs.double()
    q2, q3 = (probs**2).sum(-1), (probs**3).sum(-1)
    pairs = g * (g - 1) / 2
    mean = pairs * q2
    var = pairs * q2 * (1 - q2) + 2 * pairs * (g - 2) * (q3 - q2**2)
    z = float((equal.sum() - mean.sum()) / var.sum().sqrt())
    return float(equal.sum()), float(mean.sum()), normal_two_sided(z)


def inverse_cdf_bins(probs: torch.Tensor, k: int = 4) -> torch.Tensor:
    """Bin of each token [.., V] -> [0, k): the quantile of the uniform draw at which the token's
    interval starts in an inverse-CDF sampler over token ids in order; rows of a group drawing
    correlated uniforms would show as dependent bins."""
    start = probs.double().cumsum(-1) - probs.double()
    return (start * k).floor().long().clamp(0, k - 1)


def pair_independence_test(
    bins: torch.Tensor, bin_probs: torch.Tensor, k: int
) -> tuple[float, int, float]:
    """Disjoint row pairs (0, 1), (2, 3), ... of every group, as k x k cells, against the
    product of their bins' reference probabilities: bins [M, G], bin_probs [M, k]."""
    a, b = bins[:, 0::2], bins[:, 1::2]
    cells = a * k + b  # [M, G / 2]
    joint = bin_probs[:, :, None] * bin_probs[:, None, :]  # [M, k, k]
    expected = joint.reshape(joint.shape[0], 1, -1).expand(-1, a.shape[1], -1).sum((0, 1))
    counts = torch.bincount(cells.flatten(), minlength=k * k).double()
    observed, expected = merge_small(counts, expected)
    stat = float(((observed - expected) ** 2 / expected).sum())
    df = observed.numel() - 1
    return stat, df, chi2_sf(stat, df)


def test_statistics_helpers():
    # chi-square quantiles: 95 % at 1 df is 3.841, 99.9 % at 10 df is 29.588
    assert abs(chi2_sf(3.841459, 1) - 0.05) < 1e-6
    assert abs(chi2_sf(29.58830, 10) - 0.001) < 1e-7
    assert abs(normal_two_sided(1.959964) - 0.05) < 1e-6
    # merging: cells below 5 pooled in increasing order, totals kept
    o, e = merge_small(torch.tensor([1, 0, 2, 50, 7]), torch.tensor([1.0, 2.0, 3.0, 48.0, 6.0]))
    assert e.tolist() == [6.0, 6.0, 48.0] and o.tolist() == [3.0, 7.0, 50.0]
    # calibration on exact multinomial draws: the p-values of 200 tests of a true null are
    # roughly uniform, and a wrong reference is rejected
    g = torch.Generator().manual_seed(0)
    probs = torch.softmax(torch.randn(V, generator=g, dtype=torch.float64), -1)
    ps = [
        chi_square_gof(torch.multinomial(probs, 2000, True, generator=g), probs)[2]
        for _ in range(200)
    ]
    assert 0.03 < sum(p < 0.1 for p in ps) / 200 < 0.2
    draws = torch.multinomial(probs, 2000, True, generator=g)
    assert chi_square_gof(draws, torch.softmax(probs.log() / 1.3, -1))[2] < 1e-6
    # collisions: independent groups pass; groups of one repeated draw fail
    rows = torch.multinomial(probs, 400 * G, True, generator=g).view(400, G)
    assert collision_test(rows, probs.expand(400, -1))[2] > 1e-3
    assert collision_test(rows[:, :1].expand(-1, G), probs.expand(400, -1))[2] < 1e-12


# -- the model, its reference distributions and the engine's samples ------------------------------


def make_model() -> CWM:
    """The tiny preset with a 48-token vocabulary (head_dim 32, as vLLM's CPU kernels need); the
    output layer is scaled so the next-token distributions are moderate: far from uniform and
    from one-hot (asserted in test_reference_distributions_give_the_tests_power)."""
    torch.manual_seed(0)
    model = CWM(CWMConfig.preset("tiny", vocab_size=V, head_dim=32)).eval()
    model.init_weights(std=0.3)
    with torch.no_grad():
        model.lm_head.weight.mul_(0.7)
    return model


@torch.no_grad()
def reference_logits(model: CWM, prompt: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """float64 logits at the prompt's end [V] and after each first token t [V (t), V]: a full
    forward per prefix (no KV cache) of a float64 copy of the model."""
    ref = copy.deepcopy(model).double()
    first = ref(torch.tensor([prompt]))[0, -1]
    second = ref(torch.tensor([prompt + [t] for t in range(V)]))[:, -1]
    return first, second


class Reference:
    """softmax(logits / T) of a prompt: first token [V], second given the first [V, V], joint."""

    def __init__(self, logits: tuple[torch.Tensor, torch.Tensor], temperature: float):
        first, second = logits
        self.log1 = (first / temperature).log_softmax(-1)
        self.log2 = (second / temperature).log_softmax(-1)
        self.p1, self.p2 = self.log1.exp(), self.log2.exp()
        self.joint = self.p1[:, None] * self.p2


def entropy(p: torch.Tensor) -> torch.Tensor:
    return -(p * p.clamp_min(1e-300).log()).sum(-1)


@pytest.fixture(scope="module")
def model() -> CWM:
    return make_model()


@pytest.fixture(scope="module")
def ref_logits(model):
    return [reference_logits(model, p) for p in PROMPTS]


@pytest.fixture(scope="module")
def engine(model):
    return NativeEngine(copy.deepcopy(model))  # the engine packs its own copy


def generate_tokens(engine, prompts, params) -> tuple[torch.Tensor, torch.Tensor]:
    """token ids and reported log-probs [rows, max_new_tokens] of one generate() call."""
    outs = engine.generate(prompts, params)
    assert all(len(o.token_ids) == p.max_new_tokens for o, p in zip(outs, params))
    tokens = torch.tensor([o.token_ids for o in outs])
    logprobs = torch.tensor([o.logprobs for o in outs], dtype=torch.float64)
    return tokens, logprobs


def check_logprobs(tokens, logprobs, ref: Reference, tol=TOL, mean_tol=MEAN_TOL) -> float:
    """Every reported log-prob is log softmax(logits / T)[token] of the reference forward."""
    want = torch.stack([ref.log1[tokens[:, 0]], ref.log2[tokens[:, 0], tokens[:, 1]]], -1)
    error = (logprobs - want).abs()
    worst, mean = float(error.max()), float(error.mean())
    assert worst <= tol and mean <= mean_tol, (worst, mean)
    return worst


# -- the tests --------------------------------------------------------------------------------------


def test_reference_distributions_give_the_tests_power(ref_logits):
    """Moderate distributions: far from uniform (log 48 = 3.87 nats) and from one-hot, at both
    temperatures, for the first token and for the second given each likely first token."""
    for logits in ref_logits:
        for t in TEMPERATURES:
            ref = Reference(logits, t)
            h1 = float(entropy(ref.p1))
            assert 1.5 < h1 < 3.4 and float(ref.p1.max()) < 0.4, (t, h1)
            likely = ref.p1 > 0.02
            h2 = entropy(ref.p2[likely])
            assert bool(((h2 > 0.5) & (h2 < 3.6)).all()), (t, h2)


@pytest.mark.parametrize("share", [True, False], ids=["shared-prefill", "own-prefill"])
@pytest.mark.parametrize("temperature", TEMPERATURES)
def test_samples_follow_the_softmax_at_the_temperature(engine, ref_logits, temperature, share):
    """N_PER_PROMPT rows of each prompt, interleaved in BATCHES batches, each row with its own
    seed, two tokens each: the first token's counts and the (t1, t2) counts fit
    softmax(logits / T) and p(t1) p(t2 | t1) of the reference forward; every log-prob is the
    reference's. Power: the same samples reject the distribution at 1.1 T (first token and
    joint), and a second token drawn at 1.2 T after a right first token (joint)."""
    engine.share_prompts = share
    rows = 2 * N_PER_PROMPT // BATCHES
    base = 1_000_000 * (1 + TEMPERATURES.index(temperature)) + 500_000 * share
    tokens, logprobs = [], []
    prefill_before = engine.prefill_tokens
    try:
        for b in range(BATCHES):
            prompts = [PROMPTS[i % 2] for i in range(rows)]
            params = [
                SamplingParams(max_new_tokens=2, temperature=temperature, seed=base + b * rows + i)
                for i in range(rows)
            ]
            t, lp = generate_tokens(engine, prompts, params)
            tokens.append(t)
            logprobs.append(lp)
    finally:
        engine.share_prompts = True
    prefilled = engine.prefill_tokens - prefill_before
    padded = max(len(p) for p in PROMPTS)
    assert prefilled == BATCHES * (2 if share else rows) * padded  # sharing was on / off
    tokens, logprobs = torch.cat(tokens), torch.cat(logprobs)
    for k, logits in enumerate(ref_logits):
        ref = Reference(logits, temperature)
        tok, lp = tokens[k::2], logprobs[k::2]
        assert tok.shape == (N_PER_PROMPT, 2)
        worst = check_logprobs(tok, lp, ref)
        _, df1, p1 = chi_square_gof(tok[:, 0], ref.p1)
        _, df2, p2 = chi_square_gof(tok[:, 0] * V + tok[:, 1], ref.joint)
        wrong = Reference(logits, temperature * 1.1)
        power1 = chi_square_gof(tok[:, 0], wrong.p1)[2]
        power2 = chi_square_gof(tok[:, 0] * V + tok[:, 1], wrong.joint)[2]
        second_wrong = ref.p1[:, None] * Reference(logits, temperature * 1.2).p2
        power3 = chi_square_gof(tok[:, 0] * V + tok[:, 1], second_wrong)[2]
        print(
            f"prompt {k} T {temperature} share {share}: first token p={p1:.3g} (df {df1}), "
            f"(t1, t2) p={p2:.3g} (df {df2}); power: at 1.1 T p={power1:.2g} / {power2:.2g}, "
            f"t2 at 1.2 T p={power3:.2g}; max |log-prob error| {worst:.2g}"
        )
        assert p1 >= ALPHA, f"first token does not follow softmax(logits / T): p={p1:.3g}"
        assert p2 >= ALPHA, f"(t1, t2) does not follow p(t1) p(t2 | t1): p={p2:.3g}"
        assert max(power1, power2, power3) < ALPHA, "the test has no power"


def group_seeds(scheme: str, group: int) -> list[int | None]:
    """The G seeds of a group: as rl/rollout.py derives them (group seed * 1_000_003 + row, then
    * 7919 + turn, from the orchestrator's run seed * 1_000_003 + draw), consecutive integers, or
    none (the engine draws each request's seed from its own stream)."""
    if scheme == "rollout":
        group_seed = 7 * 1_000_003 + group
        return [(group_seed * 1_000_003 + i) * 7919 for i in range(G)]
    if scheme == "consecutive":
        return [10_000 + group * G + i for i in range(G)]
    return [None] * G


@pytest.mark.parametrize("scheme", SEED_SCHEMES)
def test_rows_of_a_group_draw_independent_streams(model, ref_logits, scheme):
    """GROUPS groups of G rows (one prompt each, alternating between the two prompts), sampled
    GROUPS_PER_BATCH groups to a batch with shared prefill, T = 1, two tokens. Under independence:
    equal first tokens, and equal (t1, t2), between rows of a group as often as sum p^2 predicts
    (collision_test), and the inverse-CDF bins of disjoint row pairs distributed as the product
    of their marginals (pair_independence_test). Power: groups whose rows share one seed fail."""
    engine = NativeEngine(copy.deepcopy(model), seed=11)  # its own seed stream for seed=None
    refs = [Reference(logits, 1.0) for logits in ref_logits]
    tokens = []
    for start in range(0, GROUPS, GROUPS_PER_BATCH):
        groups = range(start, start + GROUPS_PER_BATCH)
        prompts = [PROMPTS[g % 2] for g in groups for _ in range(G)]
        params = [
            SamplingParams(max_new_tokens=2, temperature=1.0, seed=s)
            for g in groups
            for s in group_seeds(scheme, g)
        ]
        tokens.append(generate_tokens(engine, prompts, params)[0])
    tokens = torch.cat(tokens).view(GROUPS, G, 2)
    which = torch.arange(GROUPS) % 2  # the prompt of each group
    p1 = torch.stack([refs[int(w)].p1 for w in which])
    joint = torch.stack([refs[int(w)].joint.flatten() for w in which])
    seen1, want1, p_first = collision_test(tokens[..., 0], p1)
    seen2, want2, p_pair = collision_test(tokens[..., 0] * V + tokens[..., 1], joint)
    k = 4
    bins_of = [inverse_cdf_bins(r.p1, k) for r in refs]
    bins = torch.stack([bins_of[int(w)][tokens[g, :, 0]] for g, w in enumerate(which)])
    bin_probs = torch.stack(
        [
            torch.zeros(k, dtype=torch.float64).index_add_(0, bins_of[int(w)], refs[int(w)].p1)
            for w in which
        ]
    )
    _, df, p_bins = pair_independence_test(bins, bin_probs, k)
    print(
        f"{scheme} seeds: equal first tokens {seen1:.0f} (expected {want1:.1f}, p={p_first:.3g}); "
        f"equal (t1, t2) {seen2:.0f} (expected {want2:.1f}, p={p_pair:.3g}); "
        f"row pairs' inverse-CDF bins p={p_bins:.3g} (df {df})"
    )
    assert p_first >= ALPHA and p_pair >= ALPHA, "rows of a group are not independent"
    assert p_bins >= ALPHA, "rows of a group draw dependent uniforms"
    # power: 100 groups whose rows all got one seed (identical streams) are flagged
    same = [SamplingParams(max_new_tokens=2, temperature=1.0, seed=5 + g) for g in range(100)]
    one_seed = generate_tokens(
        engine, [PROMPTS[0]] * (100 * G), [s for s in same for _ in range(G)]
    )
    p_same = collision_test(one_seed[0][:, 0].view(100, G), refs[0].p1.expand(100, -1))[2]
    assert p_same < ALPHA


def test_seeds_reproduce_and_distinct_seeds_differ(model):
    """A seed gives the same tokens and log-probs whatever its batch and prefill sharing; 64
    distinct seeds give 64 distinct 12-token continuations (two agreeing on all 12 tokens by
    chance has probability <= 2016 * (max sum p^2)^12, about 1e-8 here); unseeded requests come
    from the engine's own seed: the same engine seed repeats them, different requests differ."""
    engine = NativeEngine(copy.deepcopy(model))
    prompt = PROMPTS[0]
    params = [SamplingParams(max_new_tokens=12, temperature=1.0, seed=s) for s in range(64)]
    first = engine.generate([prompt] * 64, params)
    assert len({tuple(o.token_ids) for o in first}) == 64
    engine.share_prompts = False
    again = engine.generate([PROMPTS[1]] + [prompt] * 64, [SamplingParams(seed=99)] + params)[1:]
    engine.share_prompts = True
    for a, b in zip(first, again):
        assert a.token_ids == b.token_ids
        assert max(abs(x - y) for x, y in zip(a.logprobs, b.logprobs)) <= 1e-5
    unseeded = SamplingParams(max_new_tokens=12, temperature=1.0)
    runs = [
        NativeEngine(copy.deepcopy(model), seed=5).generate([prompt] * 8, unseeded)
        for _ in range(2)
    ]
    assert [o.token_ids for o in runs[0]] == [o.token_ids for o in runs[1]]
    assert len({tuple(o.token_ids) for o in runs[0]}) == 8
