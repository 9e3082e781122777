import heapq
import json
import math
from collections import Counter

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from tasks import deep_compression as dc
from tasks.common.registry import get_model

pytestmark = pytest.mark.usefixtures("one_thread")

# a tiny SqueezeNet (fire widths 16..64) with BatchNorm, so the file also carries norms and int64 buffers
TINY_SQUEEZENET = {"num_classes": 10, "in_channels": 1, "stem": "small", "base_e": 16, "incr_e": 16,
                   "batch_norm": True}
DIGITS_MLP = {"num_classes": 10, "in_features": 64, "hidden": [64, 32]}


def _model(name, kwargs, seed=0):
    torch.manual_seed(seed)
    return get_model(name, **kwargs)


def test_prunable_is_every_conv_and_linear_weight_once():
    model = _model("squeezenet1_1", TINY_SQUEEZENET)
    names = list(dc.prunable(model))
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert len(names) == len(convs) == 26  # conv1 + 8 fires x 3 + conv10
    assert names[0] == "features.0.0.weight" and "conv10.weight" in names
    assert "classifier.1.weight" not in names  # the same module as conv10, counted once
    assert all(n.endswith(".weight") and dc.prunable(model)[n].dim() == 4 for n in names)


def test_magnitude_masks_keep_the_round_density_n_largest():
    model = _model("mlp", DIGITS_MLP)
    layers = dc.prunable(model)
    masks = dc.magnitude_masks(model, {"layers.0.weight": 0.3, "layers.2.weight": 0.05})
    for name, d in [("layers.0.weight", 0.3), ("layers.2.weight", 0.05), ("layers.1.weight", 1.0)]:
        w, m = layers[name].detach().abs(), masks[name]
        assert m.dtype == torch.bool and m.shape == w.shape
        assert int(m.sum()) == round(d * w.numel())
        if d < 1:
            assert w[m].min() > w[~m].max()  # continuous init: no ties between kept and pruned
    with torch.no_grad():
        layers["layers.2.weight"].fill_(0.5)  # all tied: the lowest indices win, every time
    tied = dc.magnitude_masks(model, 0.1)["layers.2.weight"].reshape(-1)
    assert tied[:32].all() and not tied[32:].any()
    assert dc.magnitude_masks(model, 1e-9)["layers.2.weight"].sum() == 1  # at least one kept


@pytest.mark.parametrize("density,match", [(0.0, "layers.0.weight"), (1.5, "layers.0.weight"),
                                           ({"layers.1.weight": -0.2}, "layers.1.weight"),
                                           ({"nope.weight": 0.5}, "nope.weight")])
def test_bad_density_names_the_layer(density, match):
    with pytest.raises(ValueError, match=match):
        dc.magnitude_masks(_model("mlp", DIGITS_MLP), density)


def test_pruned_weights_stay_zero_under_momentum_and_weight_decay():
    def retrain(use_enforce):
        torch.manual_seed(1)
        model = _model("mlp", DIGITS_MLP)
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-2)
        x, y = torch.randn(32, 64), torch.randint(0, 10, (32,))
        for _ in range(3):  # dense training first: the momentum buffers are full when we prune
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step()
        masks = dc.magnitude_masks(model, 0.2)
        dc.apply_masks(model, masks)
        before = {k: v.detach().clone() for k, v in dc.prunable(model).items()}
        handles = dc.mask_gradients(model, masks)
        for _ in range(4):
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            assert all((p.grad[~masks[k]] == 0).all() for k, p in dc.prunable(model).items())
            opt.step()
            if use_enforce:
                dc.enforce(model, masks)
        for h in handles:
            h.remove()
        layers = dc.prunable(model)
        pruned_max = max(layers[k].detach()[~masks[k]].abs().max().item() for k in masks)
        moved = min((layers[k].detach() - before[k])[masks[k]].abs().max().item() for k in masks)
        return pruned_max, moved

    drift, _ = retrain(use_enforce=False)
    assert drift > 1e-4  # momentum alone revives pruned weights: enforce is needed
    zero, moved = retrain(use_enforce=True)
    assert zero == 0.0 and moved > 0  # pruned exactly 0, kept weights still train


def test_kmeans_linear_init_is_the_papers_grid():
    w = torch.tensor([0.3, -1.2, 2.0, 0.9, -0.4, 1.1])
    c, idx = dc.kmeans_1d(w, 5, iters=0)
    grid = torch.tensor([-1.2 + j * (2.0 + 1.2) / 4 for j in range(5)])  # c_j = min + j (max - min) / (k - 1)
    assert torch.allclose(c, grid, atol=1e-6) and c.dtype == torch.float32
    assert torch.equal(idx, (w[:, None] - c[None]).abs().argmin(1))


def test_kmeans_converges_to_the_three_cluster_means():
    g = torch.Generator().manual_seed(0)
    centres = torch.tensor([-1.0, 0.2, 3.0])
    labels = torch.randint(0, 3, (3000,), generator=g)
    w = centres[labels] + 0.05 * torch.randn(3000, generator=g)
    means = torch.stack([w[labels == j].mean() for j in range(3)])
    for init in ("linear", "density"):
        c, idx = dc.kmeans_1d(w, 3, init=init)
        assert torch.equal(idx, labels)
        assert torch.allclose(c, means, atol=1e-6)


def test_kmeans_random_and_density_inits():
    w = torch.randn(1000, generator=torch.Generator().manual_seed(0))
    c, _ = dc.kmeans_1d(w, 16, iters=0, init="random", generator=torch.Generator().manual_seed(3))
    again, _ = dc.kmeans_1d(w, 16, iters=0, init="random", generator=torch.Generator().manual_seed(3))
    assert torch.equal(c, again) and c.unique().numel() == 16 and torch.isin(c, w).all()
    c, _ = dc.kmeans_1d(w, 4, iters=0, init="density")  # the CDF at 1/8, 3/8, 5/8, 7/8
    s = w.sort().values
    assert torch.equal(c, s[torch.tensor([0.125, 0.375, 0.625, 0.875]).mul(999).round().long()])
    with pytest.raises(ValueError, match="init"):
        dc.kmeans_1d(w, 4, init="kmeans++")


def test_kmeans_empty_cluster_keeps_its_centroid():
    c, idx = dc.kmeans_1d(torch.tensor([0.0, 0.0, 0.0, 10.0, 10.0, 10.0]), 4)
    assert torch.allclose(c, torch.tensor([0.0, 10 / 3, 20 / 3, 10.0]))
    assert idx.tolist() == [0, 0, 0, 3, 3, 3]


def test_kmeans_assigns_every_point_to_its_nearest_centroid():
    w = torch.randn(200_000, generator=torch.Generator().manual_seed(0)) ** 3
    c, idx = dc.kmeans_1d(w, 256, iters=5)
    nearest = torch.cat([(part[:, None] - c[None]).abs().min(1).values for part in w.split(20_000)])
    assert ((w - c[idx]).abs() <= nearest + 1e-6).all()
    assert c.is_contiguous() and (c[1:] >= c[:-1]).all()


def test_quantize_rtn_uses_the_uniform_grid():
    w = torch.randn(5000, generator=torch.Generator().manual_seed(0))
    q = dc.quantize_rtn(w, 3)
    step = (w.max() - w.min()) / 7
    assert q.unique().numel() <= 8
    assert (q - w).abs().max() <= step / 2 + 1e-6
    assert torch.isclose(q.min(), w.min()) and torch.isclose(q.max(), w.max())
    assert torch.equal(dc.quantize_rtn(torch.full((4,), 0.3), 2), torch.full((4,), 0.3))


def test_centroid_gradient_is_the_sum_of_member_gradients():
    torch.manual_seed(0)
    layer = nn.Sequential(nn.Linear(20, 12))
    masks = dc.magnitude_masks(layer, 0.5)
    shared = dc.share_weights(layer, masks, 2)["0.weight"]
    x = torch.randn(8, 20)
    (layer(x) ** 2).sum().backward()
    # the same loss on a plain weight tensor with the shared values, differentiated on its own
    w = layer[0].weight.detach().clone().requires_grad_(True)
    (F.linear(x, w, layer[0].bias) ** 2).sum().backward()
    members = torch.full(w.shape, -1, dtype=torch.long)
    members[masks["0.weight"]] = shared.idx
    expected = torch.stack([w.grad[members == j].sum() for j in range(4)])  # dL/dc_j = sum over members
    assert torch.allclose(shared.centroids.grad, expected, rtol=1e-5, atol=1e-6)
    assert layer[0].parametrizations.weight.original.grad is None  # the dense weight does not train


def test_shared_model_is_the_dense_model_with_reconstructed_weights():
    model = _model("squeezenet1_1", TINY_SQUEEZENET).eval()
    masks = dc.magnitude_masks(model, 0.4)
    shared = dc.share_weights(model, masks, 3)
    reference = _model("squeezenet1_1", TINY_SQUEEZENET).eval()
    state = reference.state_dict()
    for name, sw in shared.items():  # W = C[idx] on the mask, 0 elsewhere, built independently
        w = torch.zeros(masks[name].numel())
        w[masks[name].reshape(-1).nonzero().squeeze(1)] = sw.centroids.detach()[sw.idx]
        state[name] = w.reshape(masks[name].shape)
    state["classifier.1.weight"] = state["conv10.weight"]
    reference.load_state_dict(state)
    x = torch.randn(3, 1, 16, 16)
    assert torch.equal(model(x), reference(x))
    assert all(sw.centroids.unique().numel() <= 8 for sw in shared.values())

    opt = torch.optim.SGD([sw.centroids for sw in shared.values()], lr=0.1, momentum=0.9)
    for _ in range(2):  # centroid fine-tuning keeps the pruning mask: zeros are not cluster members
        opt.zero_grad()
        model(x).sum().backward()
        opt.step()
    for name, sw in shared.items():
        weight = dict(model.named_modules())[name[:-len(".weight")]].weight
        assert (weight[~masks[name]] == 0).all() and weight[masks[name]].unique().numel() <= 8

    dc.remove_sharing(model)
    assert model.state_dict().keys() == reference.state_dict().keys()
    assert all(p.requires_grad for p in model.parameters())
    assert dc.shared_layers(model) == {} and len(dc.prunable(model)) == 26


def _optimal_cost(counts):
    heap = list(counts)
    heapq.heapify(heap)
    cost = 0
    while len(heap) > 1:
        a, b = heapq.heappop(heap), heapq.heappop(heap)
        cost += a + b
        heapq.heappush(heap, a + b)
    return cost


def test_huffman_reaches_the_optimal_cost_and_round_trips():
    rng = np.random.default_rng(0)
    x = np.minimum(rng.zipf(1.6, 100_000), 200)
    counts = Counter(x.tolist())
    lengths = dc.huffman_code_lengths(dict(counts))
    bits = sum(counts[s] * n for s, n in lengths.items())
    assert bits == _optimal_cost(counts.values())
    assert sum(2.0 ** -n for n in lengths.values()) == 1.0  # a complete prefix code
    data = dc.huffman_encode(x, lengths)
    assert len(data) == math.ceil(bits / 8)
    assert np.array_equal(dc.huffman_decode(data, lengths, x.size), x)
    by_array = dc.huffman_code_lengths(np.bincount(x))  # counts indexed by symbol: ties may differ, cost not
    assert sum(counts[s] * n for s, n in by_array.items()) == bits


def test_huffman_single_symbol_and_empty_streams():
    x = np.full(13, 7)
    lengths = dc.huffman_code_lengths(Counter(x.tolist()))
    assert lengths == {7: 1}
    data = dc.huffman_encode(x, lengths)
    assert len(data) == 2 and np.array_equal(dc.huffman_decode(data, lengths, 13), x)
    assert dc.huffman_encode(np.zeros(0, np.int64), {}) == b""
    assert dc.huffman_decode(b"", {}, 0).size == 0


def test_huffman_lengths_are_capped_and_still_decode():
    fib = [1, 1]
    while len(fib) < 30:
        fib.append(fib[-1] + fib[-2])  # Fibonacci counts: the optimal code would be 29 bits deep
    lengths = dc.huffman_code_lengths(fib)
    assert max(lengths.values()) <= dc.MAX_CODE_LEN
    assert sum(2.0 ** -n for n in lengths.values()) <= 1.0
    codes = dc.canonical_codes(lengths)
    words = sorted(format(codes[s], f"0{lengths[s]}b") for s in lengths)
    assert not any(b.startswith(a) for a, b in zip(words, words[1:]))  # prefix-free
    x = np.repeat(np.arange(30), 3)
    assert np.array_equal(dc.huffman_decode(dc.huffman_encode(x, lengths), lengths, x.size), x)


def test_huffman_decode_rejects_truncated_streams_and_bad_tables():
    x = np.arange(50) % 5
    lengths = dc.huffman_code_lengths(np.bincount(x))
    data = dc.huffman_encode(x, lengths)
    with pytest.raises(ValueError, match="truncated or corrupt"):
        dc.huffman_decode(data[:-2], lengths, x.size)
    for bad in ({0: 1, 1: 1, 2: 1}, {0: 1, 1: 35}, {0: 0}):  # over-subscribed, too deep, empty code
        with pytest.raises(ValueError, match="invalid Huffman code lengths"):
            dc.huffman_decode(data, bad, x.size)


def test_relative_indices_bridge_long_gaps_with_fillers():
    mask = np.zeros(70, bool)
    mask[[3, 20, 21, 60]] = True  # runs of zeros: 3, 16, 0, 38
    gaps, fillers = dc.relative_indices(mask, gap_bits=4)
    assert gaps.dtype == np.uint8 and gaps.tolist() == [3, 15, 0, 0, 15, 15, 6]
    assert fillers.tolist() == [19, 37, 53]
    assert np.array_equal(dc.mask_from_relative_indices(gaps, fillers, 70), mask)

    rng = np.random.default_rng(0)
    for gap_bits in (1, 3, 4, 8):
        mask = rng.random(20_000) < 2.0 ** -gap_bits  # a run of 2^gap_bits zeros has odds ~1/e
        gaps, fillers = dc.relative_indices(mask, gap_bits)
        runs = np.diff(np.flatnonzero(mask), prepend=-1) - 1
        assert gaps.max() < 2 ** gap_bits and fillers.size == (runs // 2 ** gap_bits).sum() > 0
        assert not mask[fillers].any() and gaps.size == mask.sum() + fillers.size
        assert np.array_equal(dc.mask_from_relative_indices(gaps, fillers, mask.size), mask)


def _compressed(name, kwargs, density, bits, seed=0):
    model = _model(name, kwargs, seed).eval()
    dense = dc.dense_bytes(model)
    masks = dc.magnitude_masks(model, density)
    dc.share_weights(model, masks, bits)
    return model, masks, dense, dc.encode(model, masks, {"model": name, "kwargs": kwargs})


@pytest.mark.parametrize("name,kwargs,density,bits", [
    ("squeezenet1_1", TINY_SQUEEZENET, 0.33, 6),
    ("squeezenet1_1", TINY_SQUEEZENET, {"conv10.weight": 0.2, "features.2.expand3x3.0.weight": 0.05}, 8),
    ("mlp", DIGITS_MLP, 0.1, 4)])
def test_encode_decode_is_exact_to_the_bit(name, kwargs, density, bits):
    model, masks, dense, data = _compressed(name, kwargs, density, bits)
    state, spec = dc.decode(data)
    assert spec == {"model": name, "kwargs": kwargs}
    parts = dc.size_breakdown(data)
    assert list(parts) == ["header", "codebooks", "codes", "gaps", "rest"] and sum(parts.values()) == len(data)
    dc.remove_sharing(model)
    expected = model.state_dict()
    assert state.keys() == expected.keys()
    for key, value in expected.items():
        assert torch.equal(state[key], value) and state[key].dtype == value.dtype, key
    for key, mask in masks.items():
        assert (state[key][~mask] == 0).all()
    assert dc.dense_bytes(model) == dense


def test_files_are_many_times_smaller_than_float32():
    mlp = {"num_classes": 10, "in_features": 784, "hidden": [256, 256]}
    for density, bits, factor in [(0.1, 4, 25), (0.33, 6, 10)]:  # measured: 33.6x and 12.5x
        _, _, dense, data = _compressed("mlp", mlp, density, bits)
        assert dense == 4 * 269_322 and dense / len(data) > factor
        report = dc.compression_report(dense, data)
        assert report["nnz"] == round(density * 784 * 256) + round(density * 256 * 256) + round(density * 2560)
        # Huffman never loses to the released fixed-width streams: 4-bit gaps, (bits + 1)-bit codes
        entries = report["nnz"] + report["fillers"]
        assert report["gaps"] <= entries * 4 / 8 + 3 and report["codes"] <= entries * (bits + 1) / 8 + 3


def test_save_and_load_compressed_rebuild_the_runnable_model(tmp_path):
    model, masks, _, _ = _compressed("squeezenet1_1", TINY_SQUEEZENET, 0.33, 5)
    out = dc.save_compressed(model, masks, tmp_path / "m", "squeezenet1_1", TINY_SQUEEZENET,
                             input={"shape": [1, 16, 16]})
    assert sorted(p.name for p in out.iterdir()) == ["model.json", "model.sqdc"]
    spec = json.loads((out / "model.json").read_text())
    assert spec == {"model": "squeezenet1_1", "kwargs": TINY_SQUEEZENET, "input": {"shape": [1, 16, 16]},
                    "format": "deep_compression"}
    loaded, loaded_spec = dc.load_compressed(out)
    assert loaded_spec == spec and not loaded.training
    x = torch.randn(4, 1, 16, 16)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))


def test_encode_refuses_masked_layers_that_are_not_shared():
    model = _model("mlp", DIGITS_MLP)
    masks = dc.magnitude_masks(model, 0.5)
    with pytest.raises(ValueError, match="share_weights"):
        dc.encode(model, masks, {})
    dc.share_weights(model, masks, 4)
    with pytest.raises(ValueError, match="already"):
        dc.share_weights(model, masks, 4)
    other = dc.magnitude_masks(_model("mlp", DIGITS_MLP, seed=1), 0.5)
    with pytest.raises(ValueError, match="differs"):
        dc.encode(model, other, {})


def test_truncated_or_corrupt_files_raise_value_error():
    _, _, _, data = _compressed("mlp", DIGITS_MLP, 0.2, 4)
    head = 12 + int.from_bytes(data[8:12], "little")
    flipped = bytearray(data)
    flipped[head + 40] ^= 0xFF
    cases = {"truncated": data[:-1], "trailing": data + b"\0", "CRC32": bytes(flipped),
             "magic": b"ZIP!" + data[4:], "version": data[:4] + (2).to_bytes(4, "little") + data[8:],
             "prefix": data[:7], "header": data[:8] + (len(data)).to_bytes(4, "little") + data[12:],
             "corrupt header": data[:12] + b"x" + data[13:]}
    for reason, bad in cases.items():
        with pytest.raises(ValueError, match=reason if reason not in ("prefix", "header") else "truncated"):
            dc.decode(bad)
