import contextlib
import itertools

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from tasks.llm import StepInfo, generate, kv_cache_lengths, tiny_llama
from tasks.squeeze_attention import (
    H2O,
    POLICIES,
    SqueezeAttentionBudget,
    budget_policy,
    fraction_budget,
    group_layers,
    kmeans_1d,
    kv_budget_loss,
    layer_importance,
    policy_min_budget,
    random_budgets,
    squeeze_allocate,
    squeeze_budgets,
)

pytestmark = pytest.mark.usefixtures("one_thread")

VOCAB = 128
PROMPT, LENGTH = 16, 32
BYTES_PER_ENTRY = 2 * 2 * 16 * 4  # key + value, 2 KV heads, head_dim 64 / 4 = 16, float32: per token per layer


@pytest.fixture(scope="module")
def model():
    return tiny_llama(VOCAB, seed=0, layers=4, attn_implementation="eager")


@pytest.fixture(scope="module")
def windows():
    return torch.randint(0, VOCAB, (2, LENGTH), generator=torch.Generator().manual_seed(1))


def _zero_attention(model, layers):
    with torch.no_grad():
        for i in layers:
            model.model.layers[i].self_attn.o_proj.weight.zero_()
    return model


# --- grouping and reallocation ------------------------------------------------------------------------

def test_total_budget_is_conserved_exactly():
    rng = np.random.default_rng(0)
    checked = 0
    for n, budget, p, low in itertools.product((1, 2, 3, 5, 7, 12, 30, 32), (1, 2, 3, 5, 17, 100),
                                               (0.0, 0.1, 0.38, 0.5, 0.625, 0.999, 1.0, 1.3), (1, 5)):
        for sim in (rng.uniform(-1, 1, n), np.round(rng.uniform(0.8, 1.0, n), 1), np.ones(n)):
            if budget < low:
                with pytest.raises(ValueError):
                    squeeze_allocate(sim, budget, p, low)
                continue
            out = squeeze_allocate(sim, budget, p, low)
            case = (n, budget, p, low, sim.tolist(), out)
            assert sum(out) == n * budget, case
            assert min(out) >= low and all(isinstance(b, int) for b in out), case
            labels = group_layers(sim)
            g3 = labels == labels.max()
            if not g3.all():
                assert len({out[i] for i in np.flatnonzero(g3)}) == 1, case  # one budget for G3
                others = [out[i] for i in np.flatnonzero(~g3)]
                assert max(others) - min(others) <= 1, case  # G1 + G2 share equally up to the remainder
            checked += 1
    assert checked > 1000


def test_a_cap_hands_the_surplus_on_and_keeps_the_total():
    # G3 is 4 of 6 layers: the 2 others would get 20 entries each of a 15-token sequence
    sim = [0.1, 0.5, 0.9, 0.9, 0.9, 0.9]
    assert squeeze_allocate(sim, 10, 0.5) == [20, 20, 5, 5, 5, 5]
    capped = squeeze_allocate(sim, 10, 0.5, max_budget=15)
    assert capped == [15, 15, 8, 8, 7, 7] and sum(capped) == 60  # 10 over the cap, handed on in layer order
    assert squeeze_allocate(sim, 10, 0.5, max_budget=20) == [20, 20, 5, 5, 5, 5]  # a cap that never binds
    assert squeeze_allocate(sim, 10, 0.5, max_budget=10) == [10] * 6  # cap = uniform: nothing can move
    rng = np.random.default_rng(0)
    for _ in range(200):
        sim, budget = rng.random(int(rng.integers(2, 12))).tolist(), int(rng.integers(1, 40))
        cap = int(rng.integers(budget, 3 * budget + 2))
        out = squeeze_allocate(sim, budget, float(rng.uniform(0, 1)), max_budget=cap)
        assert sum(out) == budget * len(sim) and max(out) <= cap


def test_allocation_known_values():
    sim = [0.2, 0.5, 0.52, 0.9, 0.91, 0.95]  # clusters {0.2} {0.5, 0.52} {0.9, 0.91, 0.95}
    assert squeeze_allocate(sim, 10, 0.5) == [15, 15, 15, 5, 5, 5]
    assert squeeze_allocate(sim, 7, 0.5) == [10, 10, 10, 4, 4, 4]  # 3.5 rounds up to 4; 42 - 12 = 30 over 3
    # G3 = {0.9, 0.95}: 2 x 5; 40 left over 3 layers = 13 r 1, the extra entry to the lowest cosine (layer 1)
    assert squeeze_allocate([0.3, 0.1, 0.45, 0.9, 0.95], 10, 0.5) == [13, 14, 13, 5, 5]
    assert squeeze_allocate([0.7] * 4, 9, 0.5) == [9] * 4  # one distinct value: nothing to reallocate
    assert squeeze_allocate([0.2, 0.2, 0.9], 10, 0.3) == [14, 13, 3]  # two values: the higher is G3
    assert squeeze_allocate(sim, 10, 0.2, min_budget=5) == [15, 15, 15, 5, 5, 5]  # clamped up to min_budget


def _sse(values, labels):
    return sum(((values[labels == g] - values[labels == g].mean()) ** 2).sum() for g in np.unique(labels))


def test_kmeans_1d_is_the_exact_optimum():
    rng = np.random.default_rng(0)
    for trial in range(40):
        v = rng.normal(size=int(rng.integers(3, 10)))
        labels, centres = kmeans_1d(v, 3)
        u = np.sort(v)
        best = min(_sse(u, np.repeat([0, 1, 2], [a, b - a, len(u) - b]))
                   for a in range(1, len(u) - 1) for b in range(a + 1, len(u)))
        assert _sse(v, labels) == pytest.approx(best, abs=1e-12)
        assert np.all(np.diff(centres) > 0)  # numbered by increasing centre
        assert all(labels[i] <= labels[j] for i in range(len(v)) for j in range(len(v)) if v[i] < v[j])
    labels, centres = kmeans_1d([0.5, 0.9, 0.5, 0.9, 0.5], 3)  # two distinct values: two clusters, ties kept
    assert labels.tolist() == [0, 1, 0, 1, 0] and centres.tolist() == [0.5, 0.9]


def test_kmeans_1d_no_worse_than_sklearn():
    cluster = pytest.importorskip("sklearn.cluster")
    rng = np.random.default_rng(1)
    for _ in range(10):
        v = np.concatenate([rng.normal(0.3, 0.05, 3), rng.normal(0.85, 0.02, 10), rng.normal(0.97, 0.01, 17)])
        km = cluster.KMeans(3, n_init=10, random_state=0).fit(v[:, None])
        assert _sse(v, kmeans_1d(v)[0]) <= km.inertia_ + 1e-12


def test_random_control_keeps_total_and_multiset():
    budgets = squeeze_allocate([0.2, 0.5, 0.52, 0.9, 0.91, 0.95, 0.3, 0.93], 11, 0.4)
    draws = [random_budgets(budgets, seed) for seed in range(20)]
    for d in draws:
        assert sum(d) == sum(budgets) == 8 * 11 and sorted(d) == sorted(budgets)
    assert random_budgets(budgets, 3) == draws[3]  # a seed gives the same assignment
    assert len({tuple(d) for d in draws}) > 10


# --- layer importance ---------------------------------------------------------------------------------

def test_layer_importance_range_and_zeroed_attention_is_one(windows):
    model = _zero_attention(tiny_llama(VOCAB, seed=0, layers=4), [2])
    sim = layer_importance(model, windows[0])
    assert sim.shape == (4,) and sim.dtype == torch.float64
    assert torch.all(sim.abs() <= 1)
    assert sim[2].item() == pytest.approx(1.0, abs=1e-12)  # h_2 = x_2: attention added nothing
    assert torch.all(sim[[0, 1, 3]] < 0.999)


def test_layer_importance_is_measured_before_the_mlp(windows):
    """With layer 1's MLP zeroed, its output is h_1, so cos_1 = cosine(hidden_states[1], hidden_states[2])."""
    model = tiny_llama(VOCAB, seed=0, layers=4)
    with torch.no_grad():
        model.model.layers[1].mlp.down_proj.weight.zero_()
    sim = layer_importance(model, windows[:1])
    with torch.no_grad():
        hs = model(input_ids=windows[:1], output_hidden_states=True, use_cache=False).hidden_states
    def cos(a, b):
        return F.cosine_similarity(a.double(), b.double(), dim=-1).mean().item()
    assert sim[1].item() == pytest.approx(cos(hs[1], hs[2]), abs=1e-6)
    assert abs(sim[0].item() - cos(hs[0], hs[1])) > 1e-4  # layer 0's MLP is live: after-MLP would differ


def test_least_important_group_gets_less(windows):
    model = _zero_attention(tiny_llama(VOCAB, seed=0, layers=6), [3, 5])
    sim = layer_importance(model, windows[0, :PROMPT])
    budgets = squeeze_budgets(model, windows[0, :PROMPT], 12, 0.5)
    labels = group_layers(sim.tolist())
    g3 = np.flatnonzero(labels == labels.max())
    assert {3, 5} <= set(g3.tolist())  # cosine 1: the least important
    assert budgets[3] == budgets[5] == 6 and sum(budgets) == 6 * 12
    assert max(budgets[i] for i in g3) < min(b for i, b in enumerate(budgets) if i not in g3)


# --- full budget = uncompressed -----------------------------------------------------------------------

def test_full_cache_loss_matches_one_forward(model, windows):
    got = kv_budget_loss(model, windows, PROMPT)
    with torch.no_grad():
        logits = model(input_ids=windows, use_cache=False).logits[:, PROMPT - 1: -1]
    want = F.cross_entropy(logits.transpose(1, 2), windows[:, PROMPT:], reduction="none").double().mean(1)
    assert torch.allclose(got["nll_per_window"], want, atol=1e-5)
    assert got["kv_bytes"] == got["kv_bytes_full"] == BYTES_PER_ENTRY * 4 * (LENGTH - 1)


@pytest.mark.parametrize("policy", POLICIES)
def test_full_budget_equals_uncompressed(model, windows, policy):
    full = kv_budget_loss(model, windows, PROMPT)
    same = kv_budget_loss(model, windows, PROMPT, [LENGTH] * 4, policy)
    assert torch.equal(same["nll_per_window"], full["nll_per_window"])
    squeezed = SqueezeAttentionBudget(policy, total_fraction=4.0, p=0.5)  # G3 keeps 2 x PROMPT >= LENGTH
    same = kv_budget_loss(model, windows, PROMPT, None, squeezed)
    assert torch.equal(same["nll_per_window"], full["nll_per_window"])
    small = kv_budget_loss(model, windows, PROMPT, [6, 7, 8, 9], policy)  # the check above can fail
    assert not torch.allclose(small["nll_per_window"], full["nll_per_window"])

    prompt = windows[0, :PROMPT]
    want, _ = generate(model, prompt, 12)
    kv = budget_policy(policy, [PROMPT + 12] * 4)
    with kv.attached(model) if hasattr(kv, "attached") else contextlib.nullcontext():
        got, stats = generate(model, prompt, 12, kv_policy=kv)
    assert torch.equal(got, want) and stats["kv_lengths"] == [PROMPT + 11] * 4
    with squeezed.attached(model):
        got, _ = generate(model, prompt, 12, kv_policy=squeezed)
    assert torch.equal(got, want)


# --- budgets in use, memory ---------------------------------------------------------------------------

@pytest.mark.parametrize("policy", POLICIES)
def test_squeeze_policy_uses_the_squeeze_budgets(model, windows, policy):
    prompt = windows[1, :PROMPT]
    kv = SqueezeAttentionBudget(policy, total_fraction=0.5, p=0.5)
    with kv.attached(model):
        _, stats = generate(model, prompt, 12, kv_policy=kv)
    low = policy_min_budget(policy)
    uniform = fraction_budget(0.5, PROMPT, low)
    assert torch.equal(kv.similarity, layer_importance(model, prompt))
    assert kv.budgets == squeeze_budgets(model, prompt, uniform, 0.5, low)
    assert sum(kv.budgets) == 4 * uniform and kv.budgets != [uniform] * 4
    assert stats["kv_lengths"] == kv.budgets
    assert stats["kv_bytes"] == BYTES_PER_ENTRY * 4 * uniform  # the same memory as the uniform budget


def test_kv_bytes_follow_the_budgets(model, windows):
    def squeeze(ids):
        return squeeze_budgets(model, ids, 8, 0.5)
    for budgets in ([8] * 4, squeeze, lambda ids: random_budgets(squeeze(ids), 0)):
        got = kv_budget_loss(model, windows, PROMPT, budgets, "h2o")
        assert got["kv_bytes"] == BYTES_PER_ENTRY * 32 and got["kv_bytes_full"] == BYTES_PER_ENTRY * 4 * (LENGTH - 1)
        assert all(sum(b) == 32 for b in got["budgets"])
        assert got["kv_lengths"] == got["budgets"][-1]


# --- H2O ----------------------------------------------------------------------------------------------

class _Checked:
    """Wraps H2O and checks after every prune: budget kept exactly, the newest ``recent`` tokens kept."""

    def __init__(self, inner):
        self.inner, self.prunes = inner, 0

    def prune(self, cache, info):
        self.inner.prune(cache, info)
        n = len(cache.layers)
        for i, (budget, recent) in enumerate(zip(self.inner.layer_budgets(n), self.inner.recent_counts(n))):
            pos = self.inner.kept_positions(i)
            assert kv_cache_lengths(cache)[i] == pos.shape[-1] == min(budget, info.seen)
            assert torch.all(pos.diff(dim=-1) > 0)  # distinct, in order
            newest = torch.arange(info.seen - recent, info.seen)
            assert torch.equal(pos[..., pos.shape[-1] - recent:], newest.expand(*pos.shape[:2], recent))
        self.prunes += 1


def test_h2o_keeps_budget_and_recent(model, windows):
    h2o = H2O([5, 8, 11, 20], recent_fraction=0.5)
    assert h2o.recent_counts(4) == [3, 4, 6, 10]
    checked = _Checked(h2o)
    with h2o.attached(model):
        generate(model, windows[0, :PROMPT], 12, kv_policy=checked)
    assert checked.prunes == 12
    heads = [torch.equal(h2o.kept_positions(2)[0, 0], h2o.kept_positions(2)[0, 1])]
    assert heads == [False]  # heavy hitters are chosen per KV head


def test_h2o_picks_the_heaviest_older_tokens():
    from transformers import DynamicCache

    keys = torch.arange(10.0).view(1, 1, 10, 1).expand(1, 2, 10, 3).contiguous()  # entry t holds t
    cache = DynamicCache()
    cache.update(keys, keys + 100, 0)
    h2o = H2O(5, recent_fraction=0.4)  # 2 recent (8, 9) + 3 heavy among 0..7
    scores = torch.zeros(1, 2, 10)
    scores[0, 0, [1, 4, 6, 9]] = torch.tensor([3.0, 2.0, 1.0, 99.0])
    scores[0, 1, [7, 2]] = torch.tensor([5.0, 4.0])  # a tie at 0 for the third: the earliest (0) wins
    h2o._scores[0] = scores
    h2o.prune(cache, StepInfo(0, 10, 10, 1))
    assert cache.layers[0].keys[0, :, :, 0].tolist() == [[1, 4, 6, 8, 9], [0, 2, 7, 8, 9]]
    assert torch.equal(cache.layers[0].values, cache.layers[0].keys + 100)
    assert h2o._scores[0][0, 0].tolist() == [3.0, 2.0, 1.0, 0.0, 99.0]


def test_h2o_scores_are_summed_attention(model, windows):
    """Unpruned, a key's score is the attention it got from every query so far (prefill and decoded), summed
    over the query heads of its KV head: what one forward over the fed tokens says."""
    h2o, prompt = H2O(LENGTH), windows[0, :PROMPT]
    with h2o.attached(model):
        new, _ = generate(model, prompt, 8, kv_policy=h2o)
    fed = torch.cat([prompt, new[:-1]]).unsqueeze(0)  # the last token is picked, never fed
    with torch.no_grad():
        out = model(input_ids=fed, output_attentions=True, use_cache=False)
    for i, attn in enumerate(out.attentions):  # [1, 4 heads, q, k]; heads 0-1 read KV head 0, 2-3 KV head 1
        want = attn.sum(2).view(1, 2, 2, fed.shape[1]).sum(2)
        assert torch.allclose(h2o._scores[i], want, atol=1e-5)


def test_h2o_needs_eager_attention(windows):
    with pytest.raises(ValueError, match="eager"):
        with H2O(8).attached(tiny_llama(VOCAB, layers=2)):
            pass


def test_streaming_budgets_include_the_sinks():
    policy = budget_policy("streaming_llm", [5, 9], sinks=4)
    assert policy.layer_budgets(2) == [5, 9]
    with pytest.raises(ValueError):
        budget_policy("streaming_llm", [4, 9], sinks=4)
    with pytest.raises(ValueError):
        budget_policy("nope", 8)


def test_p_one_is_the_uniform_baseline(model, windows):
    kv = SqueezeAttentionBudget("sliding_window", total_fraction=0.5, p=1.0)
    with kv.attached(model):
        got = kv_budget_loss(model, windows, PROMPT, None, kv)
    assert got["budgets"] == [[8] * 4] * 2
    uniform = kv_budget_loss(model, windows, PROMPT, 8, "sliding_window")
    assert torch.equal(got["nll_per_window"], uniform["nll_per_window"])
