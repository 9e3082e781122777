import json
import struct

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from tasks import squeezellm as sq

pytestmark = pytest.mark.usefixtures("one_thread")


def _heavy(rows=32, cols=128, seed=0):
    """Student-t(3) weights (heavy tails, like trained LLM weights) and a log-normal Fisher."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(4, rows, cols, generator=g)
    w = 0.02 * z[0] / (z[1:] ** 2).mean(0).sqrt()  # t_3 = Z / sqrt(chi2_3 / 3)
    fisher = torch.exp(2.0 * torch.randn(rows, cols, generator=g))
    return w, fisher


@pytest.fixture()
def heavy():
    return _heavy()


def _fisher_error(w, w_hat, fisher):
    return float((fisher * (w - w_hat) ** 2).sum())


def _objective(w, weight, centroids, labels):
    """sum_i weight_i (w_i - c_a(i))^2, summed over rows, float64."""
    return float((weight.double() * (w.double() - centroids.double().gather(1, labels)) ** 2).sum())


# ------------------------------------------------------------------------------- bit packing
def test_pack_codes_known_bytes_lsb_first():
    # 1 = 100, 2 = 010, 7 = 111 (LSB first) -> stream 10001011 1 -> bytes 0b11010001, 0b00000001
    assert sq.pack_codes(torch.tensor([1, 2, 7]), 3).tolist() == [0b11010001, 1]


@pytest.mark.parametrize("bits", range(1, 9))
def test_pack_codes_round_trip_every_width(bits):
    codes = torch.randint(0, 2 ** bits, (1001,), generator=torch.Generator().manual_seed(bits))
    buf = sq.pack_codes(codes, bits)
    assert buf.dtype == torch.uint8 and buf.numel() == (1001 * bits + 7) // 8
    assert torch.equal(sq.unpack_codes(buf, bits, 1001), codes)


# ---------------------------------------------------------------------- packed format, files
CASES = [(m, b, o, s) for m in sq.METHODS for b in (2, 3, 4) for o, s in ((0.0, 0.0), (1.0, 0.5))]


@pytest.mark.parametrize("method,bits,outlier_pct,sensitive_pct", CASES)
def test_safetensors_round_trip_is_bitwise_and_counts_the_file(tmp_path, heavy, method, bits, outlier_pct,
                                                              sensitive_pct):
    w, fisher = heavy
    packed = sq.quantize_weight(w, fisher, bits=bits, method=method, outlier_pct=outlier_pct,
                                sensitive_pct=sensitive_pct, seed=3)
    path = tmp_path / "w.safetensors"
    save_file(packed.tensors("layer."), str(path))
    back = sq.PackedWeight.from_tensors(load_file(str(path)), "layer.")
    assert torch.equal(back.dequantize(), packed.dequantize())  # bit for bit

    raw = path.read_bytes()
    (header_len,) = struct.unpack("<Q", raw[:8])
    assert set(json.loads(raw[8:8 + header_len])) - {"__metadata__"} == {"layer." + k for k in sq.PACKED_KEYS}
    tensor_bytes = len(raw) - 8 - header_len
    assert tensor_bytes == packed.nbytes
    assert 8 * tensor_bytes / w.numel() == packed.effective_bits

    rows, cols = w.shape
    nnz = sq._top_count(w.numel(), outlier_pct) + sq._top_count(w.numel(), sensitive_pct)
    assert packed.nnz <= nnz and (packed.nnz > 0) == (outlier_pct > 0)  # the two masks may overlap
    expect = (rows * cols * bits + 7) // 8 + rows * 2 ** bits * 2 + (rows + 1) * 4 + packed.nnz * 6 + 16
    assert packed.nbytes == expect  # codes + fp16 LUT + crow + (int32 col + fp16 value) + meta
    # bits + LUT (16 2^bits / in) + CSR (32 (rows + 1) + 48 nnz) + meta (128), per weight
    overhead = (32 * (rows + 1) + 48 * packed.nnz + 128) / w.numel()
    assert packed.effective_bits == pytest.approx(bits + 2 ** bits * 16 / cols + overhead, rel=1e-12)


def test_per_group_luts_and_format_fields(heavy):
    w, fisher = heavy
    packed = sq.quantize_weight(w, fisher, bits=3, method="squeezellm", group_size=32)
    assert packed.lut.shape == (32, 4, 8) and packed.lut.dtype == torch.float16
    assert (packed.lut.diff(dim=2) >= 0).all()  # ascending tables: nearest() relies on it
    assert packed.codes.dtype == torch.uint8 and packed.codes.numel() == 32 * 128 * 3 // 8
    assert packed.crow.tolist() == [0] * 33 and packed.col.numel() == packed.values.numel() == 0
    # per-group tables fit better than one per row
    per_row = sq.quantize_weight(w, fisher, bits=3, method="squeezellm")
    assert _fisher_error(w, packed.dequantize(), fisher) < _fisher_error(w, per_row.dequantize(), fisher)


def test_a_transposed_weight_quantises_like_its_copy(heavy):
    w, fisher = heavy
    view = w.T.contiguous().T  # same values, column-major strides
    assert not view.is_contiguous()
    a = sq.quantize_weight(view, fisher.T.contiguous().T, bits=3, method="squeezellm", group_size=64)
    b = sq.quantize_weight(w, fisher, bits=3, method="squeezellm", group_size=64)
    assert all(torch.equal(x, y) for x, y in zip(a.tensors().values(), b.tensors().values()))


def test_from_tensors_rejects_a_corrupt_file(heavy):
    w, _ = heavy
    t = sq.quantize_weight(w, bits=3, method="kmeans").tensors()
    t["codes"] = t["codes"][:-1]
    with pytest.raises(ValueError, match="codes"):
        sq.PackedWeight.from_tensors(t)


# ------------------------------------------------------------------------------------ k-means
def test_equal_fisher_gives_exactly_plain_kmeans(heavy):
    w, _ = heavy
    for kw in ({}, {"outlier_pct": 1.0}, {"group_size": 64}):
        plain = sq.quantize_weight(w, bits=3, method="kmeans", **kw)
        fisher = sq.quantize_weight(w, torch.full_like(w, 3.7), bits=3, method="squeezellm", **kw)
        for k, v in plain.tensors().items():
            assert torch.equal(v, fisher.tensors()[k]), k


def test_weighted_kmeans_never_worse_than_its_init(heavy):
    w, fisher = heavy
    objective = []
    for iters in (0, 1, 2, 5, 20, 50):  # 0: the init itself
        c, labels = sq.weighted_kmeans_rows(w, fisher, 8, iters=iters)
        assert (c.diff(dim=1) >= 0).all() and labels.min() >= 0 and labels.max() < 8
        objective.append(_objective(w, fisher, c, labels))
    assert all(b <= a * (1 + 1e-9) for a, b in zip(objective, objective[1:]))  # Lloyd is monotone
    assert objective[-1] < 0.8 * objective[0]  # and it does move


def _dp_optimum(x, wt, k):
    """Exact weighted 1-D k-means by dynamic programming over the sorted points, O(k n^2)."""
    order = np.argsort(x)
    x, wt = x[order], wt[order]
    n = len(x)
    cw, cs, cq = (np.concatenate([[0.0], np.cumsum(a)]) for a in (wt, wt * x, wt * x * x))
    best = np.concatenate([[0.0], np.full(n, np.inf)])  # best[j]: points 0..j-1 in the clusters so far
    for _ in range(k):
        new = best.copy()
        for j in range(1, n + 1):
            i = np.arange(j)  # the last cluster is points i..j-1
            mass = cw[j] - cw[i]
            cost = cq[j] - cq[i] - (cs[j] - cs[i]) ** 2 / np.where(mass > 0, mass, 1.0)
            new[j] = np.min(best[:j] + np.where(mass > 0, cost, 0.0))
        best = new
    return best[n]


def test_weighted_kmeans_is_near_the_exact_optimum_and_no_worse_than_sklearn():
    from sklearn.cluster import KMeans

    g = torch.Generator().manual_seed(0)
    w = torch.randn(6, 200, generator=g, dtype=torch.float64)
    weight = torch.exp(1.5 * torch.randn(6, 200, generator=g, dtype=torch.float64))  # heavy, like Fisher
    c, labels = sq.weighted_kmeans_rows(w, weight, 8)
    assert c.dtype == torch.float64
    ours = np.array([float((weight[r] * (w[r] - c[r, labels[r]]) ** 2).sum()) for r in range(6)])
    exact = np.array([_dp_optimum(w[r].numpy(), weight[r].numpy(), 8) for r in range(6)])
    # the official call: one k-means++ run, random_state 0, 50 iterations
    skl = np.array([KMeans(8, random_state=0, n_init="auto", max_iter=50)
                    .fit(w[r].numpy()[:, None], sample_weight=weight[r].numpy()).inertia_ for r in range(6)])
    assert (ours >= exact * (1 - 1e-9)).all()  # nobody beats the optimum: the objective is right
    assert ours.sum() <= 1.10 * exact.sum()  # Lloyd finds local optima; measured 1.06 here
    assert ours.sum() <= 1.02 * skl.sum()  # measured 0.96


def test_rows_are_independent(heavy):
    # vectorised over rows, but each row's answer is the one it gets alone
    w, fisher = heavy
    c, labels = sq.weighted_kmeans_rows(w, fisher, 8)
    for r in (0, 7, 31):
        cr, lr = sq.weighted_kmeans_rows(w[r:r + 1], fisher[r:r + 1], 8)
        assert torch.equal(cr[0], c[r]) and torch.equal(lr[0], labels[r])


def test_weighted_kmeans_edge_rows():
    w = torch.tensor([[0.0, 1.0, 2.0, 3.0, 4.0, 5.0],   # all-zero weights: uniform
                      [0.0, 1.0, 2.0, 3.0, 4.0, 5.0],   # uniform
                      [2.0, 2.0, 2.0, 2.0, 2.0, 2.0],   # constant row
                      [0.0, 0.1, 0.2, 9.0, 9.1, 50.0]])  # one weight dominates
    weight = torch.tensor([[0.0] * 6, [1.0] * 6, [1.0] * 6, [1.0, 1.0, 1.0, 1.0, 1.0, 1e6]])
    c, labels = sq.weighted_kmeans_rows(w, weight, 4)
    assert torch.equal(c[0], c[1]) and torch.equal(labels[0], labels[1])
    assert (c[2] == 2.0).all()
    assert c[3, labels[3, 5]] == 50.0  # the heavy point gets a centroid of its own
    # more clusters than distinct points: every point lands exactly on a centroid (empty ones re-seeded)
    c, labels = sq.weighted_kmeans_rows(w[3:], torch.ones(1, 6), 8)
    assert torch.equal(c[0, labels[0]], w[3])


def test_outliers_do_not_pull_the_dense_table(heavy):
    w, fisher = heavy
    packed = sq.quantize_weight(w, fisher, bits=3, method="squeezellm", outlier_pct=2.0)
    mask = sq.sparse_mask(w, outlier_pct=2.0)
    wilder = torch.where(mask, w * 10, w)  # the same positions stay the top 2 %
    again = sq.quantize_weight(wilder, fisher, bits=3, method="squeezellm", outlier_pct=2.0)
    assert torch.equal(again.lut, packed.lut)


# ----------------------------------------------------------------------------- dense and sparse
def test_dense_and_sparse_is_exact_at_the_mask(heavy):
    w, fisher = heavy
    packed = sq.quantize_weight(w, fisher, bits=3, method="squeezellm", outlier_pct=0.5, sensitive_pct=0.25)
    mask = sq.sparse_mask(w, fisher, 0.5, 0.25)
    assert int(mask.sum()) > sq._top_count(w.numel(), 0.5)  # the two rules pick different entries
    assert packed.nnz == int(mask.sum())
    pattern = torch.zeros_like(mask)
    rows = torch.repeat_interleave(torch.arange(32), packed.crow.diff().long())
    pattern[rows, packed.col.long()] = True
    assert torch.equal(pattern, mask)  # the CSR pattern is the mask, row-major
    w_hat, dense = packed.dequantize(), packed.dense()
    correction = (w - dense)[mask]
    assert torch.allclose(w_hat[mask], w[mask], rtol=0, atol=float(correction.abs().max()) * 2 ** -11)
    assert ((w_hat[mask] - w[mask]).abs() <= correction.abs() * 2 ** -11 + 1e-12).all()  # fp16 half ulp
    assert torch.equal(w_hat[~mask], dense[~mask])
    # dense codes are the nearest table entries, so the correction is as small as it gets
    err = (w_hat - w).abs()
    assert err[mask].max() < err[~mask].max()


def test_sparse_mask_counts_are_percent():
    w = torch.arange(1, 10001, dtype=torch.float32).view(100, 100)
    assert int(sq.sparse_mask(w, outlier_pct=0.05).sum()) == 5  # 0.05 % of 10 000, not 5 %
    assert sq.sparse_mask(w, outlier_pct=0.05).view(-1)[-5:].all()
    assert int(sq.sparse_mask(w, outlier_pct=1e-6).sum()) == 1  # at least one when asked for some
    with pytest.raises(ValueError, match="Fisher"):
        sq.sparse_mask(w, sensitive_pct=0.1)


# ------------------------------------------------------------------------------------- RTN
@pytest.mark.parametrize("group_size", [None, 16])
def test_rtn_error_is_at_most_half_a_step(heavy, group_size):
    w, _ = heavy
    gs = group_size or w.shape[1]
    packed = sq.quantize_weight(w, bits=3, method="rtn", group_size=group_size)
    wg = w.view(-1, gs)
    step = (wg.amax(1, keepdim=True) - wg.amin(1, keepdim=True)) / 7
    err = (packed.dequantize().view(-1, gs) - wg).abs()
    fp16 = wg.abs().amax(1, keepdim=True) * 2 ** -10  # the table is stored in fp16
    assert (err <= step / 2 + fp16).all()
    levels = packed.lut.float().view(-1, 8)
    assert torch.allclose(levels.diff(dim=1), step.expand(-1, 7), rtol=0, atol=float(fp16.max()) * 2)
    assert torch.allclose(levels[:, 0:1], wg.amin(1, keepdim=True), rtol=2 ** -10, atol=0)


# ------------------------------------------------------------------------------------ Fisher
def test_fisher_is_the_per_sample_sum_of_squared_gradients():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 2), nn.Dropout(0.5), nn.Linear(2, 2))
    model.train()
    samples = [(torch.randn(1, 3), torch.randn(1, 2)) for _ in range(5)]

    def loss_fn(m, s):
        return ((m(s[0]) - s[1]) ** 2).sum()

    fisher = sq.fisher_diagonal(model, samples, loss_fn, names=["0"])
    assert list(fisher) == ["0"] and fisher["0"].dtype == torch.float32
    # by hand: h = W0 x + b0, y_hat = W2 h + b2 (eval: no dropout), dL/dW0 = (W2^T 2 (y_hat - y)) x^T
    W0, b0, W2, b2 = (p.detach() for p in (model[0].weight, model[0].bias, model[2].weight, model[2].bias))
    grads = []
    for x, y in samples:
        r = 2 * ((x @ W0.T + b0) @ W2.T + b2 - y)
        grads.append((r @ W2).T @ x)
    expect = sum(g ** 2 for g in grads)
    assert torch.allclose(fisher["0"], expect, rtol=1e-5, atol=1e-7)
    mean_sq = (sum(grads) / len(grads)) ** 2
    assert not torch.allclose(fisher["0"], mean_sq * len(grads), rtol=0.1)  # not the batch estimator
    assert model.training and model[1].training  # modes restored
    assert all(p.grad is None and p.requires_grad for p in model.parameters())
    every = sq.fisher_diagonal(model, samples, loss_fn)
    assert list(every) == ["0", "2"] and torch.equal(every["0"], fisher["0"])


def test_fisher_restores_frozen_parameters():
    model = nn.Sequential(nn.Linear(3, 2))
    model.requires_grad_(False).eval()
    fisher = sq.fisher_diagonal(model, [torch.randn(1, 3)], lambda m, x: m(x).sum())
    assert fisher["0"].abs().sum() > 0
    assert not any(p.requires_grad for p in model.parameters()) and not model.training
    with pytest.raises(ValueError, match="not an nn.Linear"):
        sq.fisher_diagonal(model, [], lambda m, x: m(x).sum(), names=["nope"])


# ----------------------------------------------------------------------------- layer, model
def test_quant_linear_forward_is_f_linear_of_the_dequantized_weight(heavy):
    w, fisher = heavy
    packed = sq.quantize_weight(w, fisher, bits=4, method="squeezellm", outlier_pct=0.5)
    bias = torch.randn(32)
    x = torch.randn(5, 128)
    expect = F.linear(x, packed.dequantize(), bias)
    for cache in (True, False):
        layer = sq.QuantLinear(packed, bias, cache=cache)
        assert torch.equal(layer(x), expect) and torch.equal(layer(x), expect)
        assert (layer._weight is not None) == cache
    layer = sq.QuantLinear(packed, bias).double()  # casts must not touch the stored bits
    assert layer.lut.dtype == torch.float16 and layer.values.dtype == torch.float16
    assert torch.equal(layer(x.double()), F.linear(x.double(), packed.dequantize().double(), bias.double()))
    assert set(layer.state_dict()) == set(sq.PACKED_KEYS) | {"bias"}


def _mlp(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 4))


def test_quantize_model_replaces_linears_and_round_trips_through_a_file(tmp_path):
    model = _mlp()
    x = torch.randn(20, 16)
    before = model(x).detach()
    samples = [(x[i:i + 1], torch.tensor([i % 4])) for i in range(8)]
    fisher = sq.fisher_diagonal(model, samples, lambda m, s: F.cross_entropy(m(s[0]), s[1]))
    stats = sq.quantize_model(model, fisher, bits=4, method="squeezellm", sensitive_pct=1.0, skip=("4",))
    assert [type(m).__name__ for m in model] == ["QuantLinear", "ReLU", "QuantLinear", "ReLU", "Linear"]
    assert set(stats["layers"]) == {"0", "2"} and stats["total"]["skipped"] == ["4"]
    assert stats["total"]["numel"] == 16 * 64 + 64 * 64
    assert stats["total"]["nbytes"] == model[0].packed.nbytes + model[2].packed.nbytes
    assert stats["layers"]["2"]["sparse_nnz"] == 41  # 1 % of 4096, rounded
    # a 64 x 64 layer is dominated by its tables: 4 bits + 16 x 16 / 64 (LUT) + CSR + meta
    assert stats["layers"]["2"]["effective_bits"] == (4 * 4096 + 16 * 16 * 64 + 32 * 65 + 48 * 41 + 128) / 4096
    after = model(x).detach()
    assert (after - before).norm() < 0.1 * before.norm()  # 4 bits: close, not equal
    assert not torch.equal(after, before)

    save_file(sq.packed_state(model), str(tmp_path / "q.safetensors"))
    fresh = sq.load_packed_state(_mlp(seed=1), load_file(str(tmp_path / "q.safetensors")))
    assert isinstance(fresh[2], sq.QuantLinear) and isinstance(fresh[4], nn.Linear)
    assert torch.equal(fresh(x), model(x))


def test_quantize_model_leaves_tied_weights_and_needs_fisher():
    model = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 8))
    model[1].weight = model[0].weight  # tied: quantising one would untie them
    stats = sq.quantize_model(model, bits=3, method="kmeans")
    assert stats["layers"] == {} and stats["total"]["skipped"] == ["0", "1"]
    with pytest.raises(ValueError, match="Fisher"):
        sq.quantize_model(_mlp(), None, bits=3, method="squeezellm")


def test_bad_arguments():
    w = torch.randn(4, 12)
    for kw, msg in [({"method": "squeezellm"}, "Fisher"), ({"method": "gptq"}, "method"),
                    ({"method": "rtn", "group_size": 5}, "group_size"), ({"method": "rtn", "bits": 9}, "bits"),
                    ({"method": "rtn", "outlier_pct": 100}, "percentage")]:
        with pytest.raises(ValueError, match=msg):
            sq.quantize_weight(w, **{"bits": 3, **kw})


# ---------------------------------------------------------------------------- the claim, small
def test_fisher_weighting_wins_on_heavy_tails():
    w, fisher = _heavy(64, 256)
    err = {m: _fisher_error(w, sq.quantize_weight(w, fisher, bits=3, method=m).dequantize(), fisher)
           for m in sq.METHODS}
    assert err["squeezellm"] < 0.9 * err["kmeans"] < 0.9 * err["rtn"]
    # the negative control: weights that know nothing about F help nothing, and lose on plain MSE
    assert err["random_weights"] > err["squeezellm"]
    mse = {m: float(((sq.quantize_weight(w, fisher, bits=3, method=m, seed=1).dequantize() - w) ** 2).sum())
           for m in ("kmeans", "random_weights")}
    assert mse["kmeans"] < mse["random_weights"]


def test_random_weights_follow_the_seed(heavy):
    w, _ = heavy
    a, b, c = (sq.quantize_weight(w, bits=3, method="random_weights", seed=s).lut for s in (0, 0, 1))
    assert torch.equal(a, b) and not torch.equal(a, c)
