"""SRe2L: the BN-statistics loss (zero at matched statistics, known values, finite differences), recovery
(lowers its loss, the teacher recognises the images, one image per class per batch, deterministic and
independent of the other requested pairs, valid pixels), relabel replay, the student paths, the fair
baselines, and a teacher left in eval mode with its statistics and requires_grad flags intact."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import tasks.sre2l as sre2l
from tasks.sre2l import (BNStatLoss, SoftLabels, accuracy, crop_plan, plan_batches, random_real_baseline,
                         random_real_subset, recover, recover_pairs, relabel, resized_crop, soft_label_loss,
                         train_student)

SIDE, CLASSES = 8, 4


def tiny_net(num_classes=CLASSES, bn_layers=2, width=6):
    layers, cin = [], 1
    for _ in range(bn_layers):
        layers += [nn.Conv2d(cin, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU()]
        cin = width
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(cin, num_classes))


def synthetic_set(n_per_class=24, seed=0):
    """Class k: a bright 4x4 square in quadrant k on a dark noisy background (uint8, like the datasets)."""
    rng = np.random.default_rng(seed)
    x = rng.integers(0, 40, (CLASSES * n_per_class, 1, SIDE, SIDE)).astype(np.uint8)
    y = np.repeat(np.arange(CLASSES), n_per_class)
    for i, k in enumerate(y):
        r, c = divmod(int(k), 2)
        x[i, 0, 4 * r:4 * r + 4, 4 * c:4 * c + 4] = rng.integers(200, 256, (4, 4))
    return x, y


MEAN, STD = 0.25, 0.35
SETTINGS = dict(mean=MEAN, std=STD, image_shape=(1, SIDE, SIDE))


@pytest.fixture(scope="module")
def teacher():
    torch.manual_seed(0)
    net = tiny_net()
    x, y = synthetic_set()
    xt = (torch.from_numpy(x).float() / 255 - MEAN) / STD
    opt = torch.optim.Adam(net.parameters(), 0.02)
    for _ in range(80):
        opt.zero_grad()
        F.cross_entropy(net(xt), torch.from_numpy(y)).backward()
        opt.step()
    net.eval()
    assert accuracy(net, x, y, mean=MEAN, std=STD) == 1.0
    return net


@pytest.fixture(scope="module")
def recovered(teacher):
    return recover(teacher, ipc_index=[0, 1], seed=3, iterations=60, lr=0.1, **SETTINGS)


def _match_running_stats(model, x):
    """Set each BN's running stats to the (biased) statistics of its input on ``x``, layer by layer in
    eval mode, so that afterwards every BN sees exactly its running statistics on ``x``."""
    model.eval()
    for bn in [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]:
        seen = {}
        h = bn.register_forward_hook(lambda m, i, o: seen.setdefault("x", i[0].detach()))
        model(x)
        h.remove()
        bn.running_mean.copy_(seen["x"].mean((0, 2, 3)))
        bn.running_var.copy_(seen["x"].var((0, 2, 3), correction=0))


# ------------------------------------------------------------------------------------------ BN loss
def test_bn_loss_is_zero_when_the_batch_has_the_running_statistics():
    torch.manual_seed(0)
    net = tiny_net(bn_layers=3).double()
    x = torch.randn(5, 1, SIDE, SIDE, dtype=torch.float64) * 2 + 0.7
    with torch.no_grad():
        _match_running_stats(net, x)
        with BNStatLoss(net) as bn:
            net(x)
            assert bn.loss().item() == pytest.approx(0.0, abs=1e-10)
            assert len(bn.per_layer()) == 3


def test_bn_loss_known_values_biased_variance_unsquared_norms_and_first_layer_multiplier():
    torch.manual_seed(1)
    x = torch.randn(6, 1, SIDE, SIDE, dtype=torch.float64)
    with torch.no_grad():
        # a shift d of the LAST layer's running mean changes nothing upstream: L = 1 * ||d||
        net = tiny_net(bn_layers=2).double()
        _match_running_stats(net, x)
        d = torch.tensor([0.3, -0.4, 0.0, 1.2, 0.0, 0.0], dtype=torch.float64)
        net[4].running_mean += d
        with BNStatLoss(net, first_bn_multiplier=10.0) as bn:
            net(x)
            assert bn.loss().item() == pytest.approx(float(d.norm()), rel=1e-9)  # un-squared: 1.3, not 1.69
        # one BN whose running var is the UNBIASED var of this batch (what BN itself keeps): the loss
        # uses the biased var, so it is 10 * ||var_b (n / (n - 1) - 1)|| with n = N H W
        one = tiny_net(bn_layers=1).double()
        one[1].momentum = None
        one.train()
        one(x)
        one.eval()
        conv_out = one[0](x)
        n = conv_out.numel() // conv_out.shape[1]
        var_b = conv_out.var((0, 2, 3), correction=0)
        with BNStatLoss(one, first_bn_multiplier=10.0) as bn:
            one(x)
            assert bn.loss().item() == pytest.approx(10 * float((var_b / (n - 1)).norm()), rel=1e-6)


def test_bn_loss_gradient_matches_finite_differences_in_float64():
    torch.manual_seed(2)
    net = tiny_net(bn_layers=2, width=3).double()
    with torch.no_grad():
        for bn in [m for m in net.modules() if isinstance(m, nn.BatchNorm2d)]:
            bn.running_mean.uniform_(-0.5, 0.5)
            bn.running_var.uniform_(0.5, 2.0)
    net.eval()
    with BNStatLoss(net, first_bn_multiplier=10.0) as bn:
        def f(x):
            net(x)
            return bn.loss()

        x = torch.randn(2, 1, 4, 4, dtype=torch.float64, requires_grad=True)
        assert torch.autograd.gradcheck(f, (x,), eps=1e-6, atol=1e-6)


def test_bn_loss_needs_a_batchnorm_model_and_a_forward_pass():
    with pytest.raises(ValueError, match="BatchNorm"):
        BNStatLoss(nn.Sequential(nn.Conv2d(1, 2, 3)))
    with BNStatLoss(tiny_net()) as bn, pytest.raises(RuntimeError, match="forward"):
        bn.loss()


# ----------------------------------------------------------------------------------------- recover
def test_recovery_lowers_its_loss_and_the_teacher_recognises_every_image(teacher, recovered):
    r_bn = 0.01
    start = recovered.ce_start.mean() + r_bn * recovered.bn_loss_start.mean()
    end = recovered.ce.mean() + r_bn * recovered.bn_loss.mean()
    assert end < 0.2 * start
    assert recovered.bn_loss.mean() < recovered.bn_loss_start.mean()
    np.testing.assert_array_equal(recovered.labels, [0, 1, 2, 3, 0, 1, 2, 3])
    np.testing.assert_array_equal(recovered.ipc_index, [0] * 4 + [1] * 4)
    np.testing.assert_array_equal(recovered.predicted, recovered.labels)
    assert recovered.confidence.min() > 0.5 and recovered.confidence.mean() > 0.85
    # the diagnostics describe the returned pixels
    assert accuracy(teacher, recovered.images, recovered.labels, mean=MEAN, std=STD) == 1.0
    # two IPC indices start from different noise
    assert not np.allclose(recovered.images[:4], recovered.images[4:])


def test_recovered_images_are_valid_pixels(recovered):
    assert recovered.images.dtype == np.float32 and recovered.images.shape == (8, 1, SIDE, SIDE)
    assert recovered.images.min() >= 0.0 and recovered.images.max() <= 1.0
    # the clip is active: N(0, 1) noise at mean 0.25 / std 0.35 starts far below pixel 0
    assert (recovered.images == 0.0).mean() > 0.05


def test_every_recovery_batch_holds_one_image_per_class(teacher, monkeypatch):
    targets = []
    real_ce = F.cross_entropy

    def spy(logits, target, *a, **k):
        targets.append(target.tolist())
        return real_ce(logits, target, *a, **k)

    monkeypatch.setattr(F, "cross_entropy", spy)
    recover(teacher, ipc_index=[0, 1], seed=0, iterations=3, batch_size=3, crop=(0.5, 1.0), flip=True, **SETTINGS)
    blocks = {tuple(b.classes) for b in plan_batches(CLASSES, 2, batch_size=3)}
    assert blocks == {(0, 1, 2), (3,)}
    assert len(targets) == 4 * (1 + 3 + 1)  # 2 IPC x 2 blocks x (start score + 3 steps + final score)
    for t in targets:
        assert len(set(t)) == len(t) and tuple(t) in blocks


def test_recovery_is_deterministic_and_a_pair_does_not_depend_on_what_else_is_asked(teacher):
    kw = dict(iterations=6, batch_size=2, jitter=1, crop=(0.5, 1.0), **SETTINGS)
    full = recover(teacher, ipc_index=[0, 1], seed=7, **kw)
    again = recover(teacher, ipc_index=[0, 1], seed=7, **kw)
    np.testing.assert_array_equal(full.images, again.images)
    np.testing.assert_array_equal(full.ce, again.ce)
    # a lone pair, a subset in another order: the same rows, bit for bit (the pair's block is run whole)
    one = recover_pairs(teacher, [(2, 1)], seed=7, **kw)
    np.testing.assert_array_equal(one.images[0], full.images[6])
    sub = recover(teacher, [3, 0], ipc_index=1, seed=7, **kw)
    np.testing.assert_array_equal(sub.images, full.images[[7, 4]])
    np.testing.assert_array_equal(sub.labels, [3, 0])
    # another seed, or other batch-mates (batch_size 4 puts class 2 with 0, 1, 3): another image
    assert not np.allclose(recover(teacher, [2], seed=8, **kw).images[0], full.images[2])
    assert not np.allclose(recover(teacher, [2], seed=7, **(kw | {"batch_size": 4})).images[0], full.images[2])


def test_recovery_rejects_bad_requests(teacher):
    with pytest.raises(ValueError, match="out of range"):
        recover(teacher, [CLASSES], iterations=1, **SETTINGS)
    with pytest.raises(ValueError, match="crop"):
        recover(teacher, [0], iterations=1, crop=(0.0, 1.0), **SETTINGS)
    with pytest.raises(ValueError, match="mean/std"):
        recover(teacher, [0], iterations=1, mean=[0.1, 0.2], std=1.0, image_shape=(1, SIDE, SIDE))


def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_teacher_is_left_in_eval_mode_with_its_statistics_and_requires_grad_flags(teacher):
    t = tiny_net()
    t.load_state_dict(teacher.state_dict())
    t.train()  # as a caller might hand it over; the official CIFAR relabel never called eval()
    t[0].weight.requires_grad_(False)
    flags = [p.requires_grad for p in t.parameters()]
    before = _state(t)
    x, y = synthetic_set(4, seed=1)
    recover(t, [0, 1], iterations=3, **SETTINGS)
    assert not t.training and [p.requires_grad for p in t.parameters()] == flags
    t.train()
    store = relabel(t, x, epochs=2, mean=MEAN, std=STD)
    assert not t.training and [p.requires_grad for p in t.parameters()] == flags
    t.train()
    train_student(tiny_net(), x, teacher=t, epochs=2, mean=MEAN, std=STD)
    assert not t.training and [p.requires_grad for p in t.parameters()] == flags
    for k, v in _state(t).items():
        torch.testing.assert_close(v, before[k], rtol=0, atol=0)
    # the labels are the eval-mode teacher's (one image at a time gives the same logits)
    one = relabel(t, x[:1], epochs=2, mean=MEAN, std=STD)
    np.testing.assert_allclose(one.logits[:, 0].astype(np.float32), store.logits[:, 0].astype(np.float32), atol=2e-3)


# ----------------------------------------------------------------------------------------- relabel
def test_resized_crop_is_identity_on_whole_images_mirrors_and_matches_bilinear_resize_inside():
    x = torch.randn(2, 1, 12, 12, dtype=torch.float64)
    whole = np.array([[0, 0, 12, 12]] * 2)
    assert resized_crop(x, whole, [False, False]) is x
    torch.testing.assert_close(resized_crop(x, whole, [True, False]), torch.stack([x[0].flip(-1), x[1]]))
    out = resized_crop(x, np.array([[2, 3, 6, 8], [0, 0, 12, 12]]), [False, False])
    ref = F.interpolate(x[:1, :, 2:8, 3:11], size=(12, 12), mode="bilinear", align_corners=False)
    torch.testing.assert_close(out[0, :, 2:-2, 2:-2], ref[0, :, 2:-2, 2:-2])  # edges: border padding


def test_crop_plan_follows_random_resized_crop_and_is_per_image_and_prefix_stable():
    boxes, flips = crop_plan(range(50), 4, seed=3, image_hw=(28, 28), scale=(0.25, 1.0), flip=True)
    assert boxes.shape == (4, 50, 4) and flips.shape == (4, 50)
    top, left, h, w = boxes.transpose(2, 0, 1)
    assert (top >= 0).all() and (left >= 0).all() and (top + h <= 28).all() and (left + w <= 28).all()
    frac = h * w / 28**2
    assert frac.min() > 0.2 and frac.max() <= 1.0 and frac.std() > 0.1
    assert 0.3 < flips.mean() < 0.7
    b2, f2 = crop_plan([7, 2], 2, seed=3, image_hw=(28, 28), scale=(0.25, 1.0), flip=True)
    np.testing.assert_array_equal(b2, boxes[:2, [7, 2]])
    np.testing.assert_array_equal(f2, flips[:2, [7, 2]])
    assert not crop_plan(range(50), 1, seed=3, image_hw=(28, 28), scale=None, flip=False)[1].any()


def test_relabel_replay_gives_the_same_crops_and_labels_for_the_same_seed(teacher):
    x, _ = synthetic_set(3, seed=2)
    a = relabel(teacher, x, epochs=3, seed=5, mean=MEAN, std=STD, flip=True)
    b = relabel(teacher, x, epochs=3, seed=5, mean=MEAN, std=STD, flip=True)
    for name in ("image_ids", "boxes", "flips", "logits"):
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name))
    assert a.logits.dtype == np.float16 and a.boxes.dtype == np.int16 and a.logits.shape == (3, len(x), CLASSES)
    assert not np.array_equal(relabel(teacher, x, epochs=3, seed=6, mean=MEAN, std=STD).boxes, a.boxes)
    # replaying a stored view through the teacher reproduces the stored label
    xt = (torch.from_numpy(x).float() / 255 - MEAN) / STD
    with torch.no_grad():
        again = teacher(resized_crop(xt, a.boxes[2], a.flips[2])).numpy()
    np.testing.assert_allclose(a.logits[2].astype(np.float32), again, atol=1e-2, rtol=1e-3)
    # shards keyed by image id equal the whole; fewer epochs are a prefix
    shard = relabel(teacher, x[[4, 1]], epochs=2, seed=5, mean=MEAN, std=STD, flip=True, image_ids=[4, 1])
    np.testing.assert_array_equal(shard.boxes, a.boxes[:2, [4, 1]])
    np.testing.assert_allclose(shard.logits.astype(np.float32), a.logits[:2, [4, 1]].astype(np.float32), atol=1e-2)
    joined = SoftLabels.concat([a.take([0, 1]), a.take([2])])
    np.testing.assert_array_equal(joined.logits, a.logits[:, :3])


def test_soft_label_loss_is_the_official_batchmean_kl_without_t_squared():
    s, t = torch.randn(5, 7), torch.randn(5, 7)
    official = nn.KLDivLoss(reduction="batchmean")(F.log_softmax(s / 20, 1), F.softmax(t / 20, 1))
    torch.testing.assert_close(soft_label_loss(s, t, 20.0), official)


def test_stored_replay_and_online_labels_show_the_student_the_same_views_and_targets(teacher, monkeypatch):
    x, _ = synthetic_set(5, seed=3)
    kw = dict(epochs=3, batch_size=8, seed=11, mean=MEAN, std=STD, flip=True)
    store = relabel(teacher, x, epochs=3, seed=11, mean=MEAN, std=STD, flip=True, dtype=np.float32)
    real = sre2l.soft_label_loss

    def run(**target):
        seen = {"inputs": [], "targets": []}

        def spy(s, t, temperature):
            seen["targets"].append(t.detach().clone())
            return real(s, t, temperature)

        monkeypatch.setattr(sre2l, "soft_label_loss", spy)
        torch.manual_seed(0)
        student = tiny_net()
        student.register_forward_pre_hook(lambda m, i: seen["inputs"].append(i[0].detach().clone()))
        seen["history"] = train_student(student, x, **target, **kw)
        assert not student.training
        return seen

    replay, online = run(labels=store), run(teacher=teacher)
    assert len(replay["inputs"]) == 3 * 3  # 20 images in batches of 8, 3 epochs
    for a, b in zip(replay["inputs"], online["inputs"]):
        torch.testing.assert_close(a, b, rtol=0, atol=0)  # the very same crops, flips and batch order
    for a, b in zip(replay["targets"], online["targets"]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)  # stored logits = the online teacher's
    assert len(replay["targets"]) == 9
    np.testing.assert_allclose(replay["history"]["loss"], online["history"]["loss"], rtol=1e-3)
    with pytest.raises(ValueError, match="exceeds"):
        train_student(tiny_net(), x, store, epochs=4)


def test_students_learn_with_hard_and_with_online_soft_labels_under_a_cosine_schedule(teacher):
    x, y = synthetic_set(10, seed=4)
    test_x, test_y = synthetic_set(10, seed=5)
    for target in ({"labels": y}, {"teacher": teacher}):
        torch.manual_seed(1)
        student = tiny_net()
        h = train_student(student, x, **target, epochs=40, lr=0.03, batch_size=10, mean=MEAN, std=STD, scale=None)
        assert h["lr"][0] == 0.03 and h["lr"][-1] < 1e-3 and h["loss"][-1] < 0.2 * h["loss"][0]
        assert accuracy(student, test_x, test_y, mean=MEAN, std=STD) >= 0.9


# --------------------------------------------------------------------------------------- baselines
def test_random_real_subset_is_stratified_without_replacement_and_seeded():
    labels = np.repeat(np.arange(3), [5, 7, 9])
    idx = random_real_subset(labels, 4, seed=0)
    assert len(idx) == 12 and len(set(idx.tolist())) == 12
    np.testing.assert_array_equal(np.bincount(labels[idx]), [4, 4, 4])
    np.testing.assert_array_equal(idx, random_real_subset(labels, 4, seed=0))
    assert not np.array_equal(idx, random_real_subset(labels, 4, seed=1))
    with pytest.raises(ValueError, match="fewer than ipc"):
        random_real_subset(labels, 6, seed=0)
    # nested: IPC 2 is the first two draws of IPC 4 in every class
    np.testing.assert_array_equal(random_real_subset(labels, 2, seed=0), idx.reshape(3, 4)[:, :2].ravel())


def test_real_pairs_draw_the_random_real_subset_with_recoverys_diagnostics(teacher):
    x, y = synthetic_set(6, seed=5)
    pairs = [(c, i) for i in range(2) for c in range(CLASSES)]
    real = sre2l.real_pairs(teacher, x, y, pairs, seed=7, mean=MEAN, std=STD)
    idx = random_real_subset(y, 2, seed=7).reshape(CLASSES, 2)  # rows: class, then draw
    expect = np.stack([idx[c, i] for c, i in pairs])
    np.testing.assert_array_equal(real.images, x[expect].astype(np.float32) / 255)
    assert real.labels.tolist() == [c for c, _ in pairs] and real.ipc_index.tolist() == [0] * 4 + [1] * 4
    with torch.no_grad():
        logits = teacher(((torch.from_numpy(x[expect]).float() / 255) - MEAN) / STD)
    np.testing.assert_allclose(real.ce, F.cross_entropy(logits, torch.from_numpy(real.labels), reduction="none"),
                               rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(real.predicted, logits.argmax(1).numpy())
    # L_bn is that of the block a recovery would have formed (one per IPC index here), not of all rows
    with BNStatLoss(teacher) as bn, torch.no_grad():
        teacher(((torch.from_numpy(x[expect[4:]]).float() / 255) - MEAN) / STD)
        assert real.bn_loss[4:] == pytest.approx([float(bn.loss())] * 4, rel=1e-5)
    assert real.bn_loss[0] != real.bn_loss[4]
    # one pair alone is the same image as in the larger request
    one = sre2l.real_pairs(teacher, x, y, [pairs[5]], seed=7, mean=MEAN, std=STD)
    np.testing.assert_array_equal(one.images[0], real.images[5])
    with pytest.raises(ValueError, match="has 6 images"):
        sre2l.real_pairs(teacher, x, y, [(0, 6)], seed=7)


def test_random_real_baselines_run_hard_and_with_the_same_relabel(teacher):
    x, y = synthetic_set(6, seed=5)
    torch.manual_seed(2)
    hard = random_real_baseline(tiny_net(), x, y, ipc=2, seed=0, epochs=2, mean=MEAN, std=STD)
    soft = random_real_baseline(tiny_net(), x, y, ipc=2, seed=0, teacher=teacher, epochs=2, mean=MEAN, std=STD)
    assert len(hard["loss"]) == len(soft["loss"]) == 2
    # the soft arm is exactly: the same seeded subset, relabelled, replayed
    idx = random_real_subset(y, 2, seed=0)
    torch.manual_seed(3)
    a = tiny_net()
    b = tiny_net()
    b.load_state_dict(a.state_dict())
    random_real_baseline(a, x, y, ipc=2, seed=0, teacher=teacher, epochs=2, mean=MEAN, std=STD)
    train_student(b, x[idx], relabel(teacher, x[idx], epochs=2, mean=MEAN, std=STD), epochs=2, seed=0,
                  mean=MEAN, std=STD)
    for p, q in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=0)
