"""SRe2L: squeeze a dataset into a BatchNorm teacher, recover images from it, relabel them with soft labels.

Yin, Xing, Shen, "Squeeze, Recover and Relabel: Dataset Condensation at ImageNet Scale From A New
Perspective", NeurIPS 2023 (arXiv 2306.13092); official code VILA-Lab/SRe2L (``recover/``,
``relabel/``, ``validate/train_FKD.py``, ``*small_dataset/`` for CIFAR).

Squeeze is ordinary training of a BatchNorm-equipped teacher (the train job's ``squeezenet1_1`` with
``batch_norm: true``); this module implements the other two stages and the student that uses them:

- ``BNStatLoss``: forward hooks on every ``BatchNorm2d`` of the teacher; after a forward pass,
  L_bn = sum_l m_l (||running_var_l - var_l(x)||_2 + ||running_mean_l - mean_l(x)||_2), batch
  statistics over N, H, W of the BN *input*, biased variance, un-squared L2 norms, m_1 =
  ``first_bn_multiplier`` (10) and m_l = 1 for the rest (``recover/utils.py:BNFeatureHook``).
- ``recover`` / ``recover_pairs``: per IPC index, batches holding one image per class; x ~ N(0, 1) in
  normalised space, Adam(lr, betas=(0.5, 0.9)), cosine learning rate without warm-up, loss
  CE(teacher(aug(x)), y) + r_bn L_bn with the teacher frozen in eval mode, x clipped to the valid pixel
  range after every step, the last iterate kept. Returns plain arrays (``Recovered``): images in [0, 1]
  and per-image diagnostics (teacher CE, confidence and arg-max on the final image, the batch's L_bn).
- ``relabel``: FKD-style soft labels. For every student epoch and image a random-resized crop (and a
  flip when enabled) is drawn from a seed, the eval-mode teacher labels that view, and the crop box,
  flip flag and fp16 logits are stored (``SoftLabels``), so the student replays exactly those views.
- ``train_student``: AdamW (lr 1e-3, wd 0.01), cosine per epoch, on the stored soft labels (replay), on
  soft labels computed online from the teacher (same crops, no storage), or on hard labels with CE.
  Soft-label loss: KL(softmax(t / T) || softmax(s / T)) with ``batchmean`` as ``validate/train_FKD.py``
  (``nn.KLDivLoss(reduction='batchmean')`` on log_softmax(s / T), softmax(t / T)), *without* Hinton's
  T^2 factor, as the official code (the factor is commented out there). Under Adam a constant factor
  on the loss cancels in m / sqrt(v) except against eps, and AdamW's decay is decoupled, so T^2 would
  change nothing but eps's relative size; it matters only with SGD, which the official code does not
  use for these runs. (``tasks.kd.kd_loss`` is the T^2-scaled loss; this module divides it back out.)
- Fair baselines (the caveat the literature found: soft relabelling, not the synthetic images, carries
  most of SRe2L's accuracy): ``random_real_subset`` picks IPC real images per class by seed (nested:
  IPC k is a prefix of any larger IPC); ``random_real_baseline`` trains on them with hard labels, or
  with the very same ``relabel``; ``real_pairs`` returns the same draws in ``recover_pairs``'s form,
  so a pipeline stores a random-real set exactly like a recovered one.

Determinism and what a result depends on. Images of one recovery batch are coupled through L_bn (batch
statistics), so an image cannot be independent of its batch-mates. The batches are therefore fixed by
a plan, not by the call: for ``num_classes`` classes and ``batch_size`` B (default: all classes in one
batch), class c is always recovered in block c // B together with classes [B*(c//B), B*(c//B+1)), from
noise and augmentations seeded by hash_seed(seed, ipc_index, block). A request for a subset of
(class, ipc_index) pairs runs the whole blocks those pairs fall in and returns only the requested rows.
So the image of (c, i) is a function of (teacher, seed, settings, num_classes, B, c, i) alone, the same
whichever other pairs a call asks for (bitwise on CPU in one environment; cuDNN may need its
deterministic flag). Ask for whole blocks (``plan_batches``) to waste no compute. Soft labels are
keyed per image by ``image_ids`` (default 0..N-1): the crops of image k at epoch e depend only on
(seed, image_ids[k], e), so relabelling can be sharded and a store cut to fewer epochs is a prefix.

Departs from the paper / official code:
- 28x28 grayscale (Fashion-MNIST, MNIST) instead of 224x224 RGB, so the augmentation follows the
  official *CIFAR* recover path and the research brief's CPU experiment: no random-resized crop and
  no flip by default (``crop=None``, ``flip=False``; digits are not flip-symmetric), a random circular
  roll of +-1 px (``jitter=1``; the official rolls by U{0..jitter} with jitter 32 at 224 px and 4 at
  32 px; a symmetric range does not favour one corner).
  ``crop=(lo, hi)`` and ``flip=True`` restore the ImageNet path; as there, one crop box, flip and roll
  are drawn per step and shared by the whole batch (a torchvision transform applied to a 4-D tensor).
- 500 iterations (official: 1,000 for CIFAR, 4,000 for ImageNet), lr 0.25 and r_bn 0.01 as the released
  CIFAR and ImageNet scripts. No total-variation or L2 image prior (both 0 in the released scripts).
- Crops are resampled with bilinear ``grid_sample`` (border padding) instead of torchvision's
  ``resized_crop``; the box sampling is torchvision's RandomResizedCrop rule (10 tries, area scale,
  log-uniform aspect ratio 3/4..4/3, whole image as the fallback). Relabel crops default to area scale
  (0.5, 1) (not tuned): the official 0.08 lower bound cuts an 8x8 patch out of a 28x28 image, often
  background or a stroke fragment; flips are off by default for the same reason as above.
- No Mixup/CutMix in relabel (the official ImageNet relabel uses CutMix, the CIFAR one Mixup): mixing
  ties a stored label to its batch-mates, which would break per-image sharding; the brief's CPU
  experiment specifies crop/shift augmentation only.
- Crop boxes are stored as integer pixels (top, left, height, width) rather than fractions of the
  image, since every stored image has the same size.
- Student batch size 32 (official: 1,024 on ImageNet, 128 on CIFAR, i.e. tens of steps per epoch):
  a 10-class IPC-10 set has 100 images, which 128 would make one step per epoch. Measured once on
  Fashion-MNIST (seed 0, IPC 10, 300 epochs, T = 4, a 3-conv BN CNN teacher at 83.6 %, 5k test
  images): random real + relabel 48.0 % at batch 128 vs 60.5 % at 32; recovered + relabel 43.2 % vs 50.4 %.
- Diagnostics are computed on the un-augmented final image in float; a caller that stores uint8
  (``to_uint8``) may re-score.
"""
from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, fields
from functools import partial

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from tasks.common.seeding import hash_seed
from tasks.kd import kd_loss

RATIO = (3 / 4, 4 / 3)  # RandomResizedCrop's aspect-ratio range (torchvision default, used by the official)
_TRIES = 10  # RandomResizedCrop's attempts before falling back to the whole image
_U_PER_VIEW = 2 * _TRIES + 3  # uniforms per sampled view: tries x (area, ratio), top, left, flip


# ----------------------------------------------------------------------------------------- BN loss
class BNStatLoss:
    """Distance between the batch statistics entering every ``BatchNorm2d`` and its running statistics.

    Hooks stay on the model until ``remove()`` (or the end of a ``with`` block). After each forward pass
    ``loss()`` is sum_l m_l (||running_var_l - var_l||_2 + ||running_mean_l - mean_l||_2), differentiable
    in the model's input; ``per_layer()`` gives the unweighted terms.
    """

    def __init__(self, model: nn.Module, first_bn_multiplier: float = 10.0):
        self.layers = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
        if not self.layers:
            raise ValueError("the model has no BatchNorm2d layer: SRe2L needs a BatchNorm teacher")
        if any(bn.running_mean is None for bn in self.layers):
            raise ValueError("a BatchNorm2d has no running statistics (track_running_stats=False)")
        self.multipliers = [float(first_bn_multiplier)] + [1.0] * (len(self.layers) - 1)  # m_l
        self.terms: list[torch.Tensor | None] = [None] * len(self.layers)
        self._handles = [bn.register_forward_hook(partial(self._hook, i)) for i, bn in enumerate(self.layers)]

    def _hook(self, i: int, bn: nn.BatchNorm2d, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
        x = inputs[0]
        mean = x.mean(dim=(0, 2, 3))
        var = x.var(dim=(0, 2, 3), correction=0)  # biased, as BN normalises with
        self.terms[i] = (torch.linalg.vector_norm(bn.running_var - var)
                         + torch.linalg.vector_norm(bn.running_mean - mean))

    def _check(self) -> list[torch.Tensor]:
        if any(t is None for t in self.terms):
            raise RuntimeError("BNStatLoss read before a forward pass went through every BatchNorm2d")
        return self.terms  # type: ignore[return-value]

    def loss(self) -> torch.Tensor:
        return sum(m * t for m, t in zip(self.multipliers, self._check()))

    __call__ = loss

    def per_layer(self) -> list[float]:
        return [float(t) for t in self._check()]

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def __enter__(self) -> "BNStatLoss":
        return self

    def __exit__(self, *exc) -> None:
        self.remove()


@contextmanager
def frozen(teacher: nn.Module) -> Iterator[nn.Module]:
    """The teacher in eval mode with gradients off; requires_grad flags are restored on exit, eval mode
    is kept (the official CIFAR relabel forgot eval(): its teacher labelled with batch statistics and
    kept updating its running statistics)."""
    params = list(teacher.parameters())
    flags = [p.requires_grad for p in params]
    teacher.eval()
    for p in params:
        p.requires_grad_(False)
    try:
        yield teacher
    finally:
        for p, flag in zip(params, flags):
            p.requires_grad_(flag)


# ------------------------------------------------------------------------------------ augmentation
def _channel_tensor(value: float | Sequence[float], channels: int, device, dtype) -> torch.Tensor:
    v = torch.as_tensor(value, dtype=dtype, device=device).reshape(-1)
    if v.numel() not in (1, channels):
        raise ValueError(f"mean/std must have 1 or {channels} values, got {v.numel()}")
    return v.expand(channels).reshape(1, channels, 1, 1).clone()


def _views_from_uniforms(u: np.ndarray, hw: tuple[int, int], scale: tuple[float, float] | None,
                         ratio: tuple[float, float], flip: bool) -> tuple[np.ndarray, np.ndarray]:
    """RandomResizedCrop's box rule (plus a flip flag) applied to pre-drawn U[0, 1) numbers.

    ``u`` has shape (..., _U_PER_VIEW). Returns boxes (..., 4) int (top, left, height, width) and flips
    (...,) bool. With ``scale=None`` the box is the whole image.
    """
    H, W = hw
    lead = u.shape[:-1]
    flips = (u[..., -1] < 0.5) if flip else np.zeros(lead, bool)
    if scale is None:
        boxes = np.broadcast_to(np.array([0, 0, H, W]), (*lead, 4)).copy()
        return boxes, flips
    tries = u[..., : 2 * _TRIES].reshape(*lead, _TRIES, 2)
    area = H * W * (scale[0] + tries[..., 0] * (scale[1] - scale[0]))
    log_r = math.log(ratio[0]) + tries[..., 1] * (math.log(ratio[1]) - math.log(ratio[0]))
    r = np.exp(log_r)
    w = np.rint(np.sqrt(area * r))
    h = np.rint(np.sqrt(area / r))
    ok = (w > 0) & (w <= W) & (h > 0) & (h <= H)
    first = ok.argmax(-1)[..., None]
    h = np.where(ok.any(-1), np.take_along_axis(h, first, -1)[..., 0], H).astype(np.int64)
    w = np.where(ok.any(-1), np.take_along_axis(w, first, -1)[..., 0], W).astype(np.int64)
    top = np.minimum(np.floor(u[..., 2 * _TRIES] * (H - h + 1)), H - h).astype(np.int64)
    left = np.minimum(np.floor(u[..., 2 * _TRIES + 1] * (W - w + 1)), W - w).astype(np.int64)
    return np.stack([top, left, h, w], -1), flips


def resized_crop(x: torch.Tensor, boxes: np.ndarray | torch.Tensor, flips: np.ndarray | torch.Tensor) -> torch.Tensor:
    """Crop each image of ``x`` (N, C, H, W) to its box (top, left, height, width), mirror it where its
    flip flag is set, and resample back to H x W (bilinear, border padding); differentiable in ``x``."""
    n, _, H, W = x.shape
    b = torch.as_tensor(np.asarray(boxes), dtype=x.dtype, device=x.device).reshape(n, 4)
    f = torch.as_tensor(np.asarray(flips), device=x.device).reshape(n).to(torch.bool)
    if bool(((b[:, 0] == 0) & (b[:, 1] == 0) & (b[:, 2] == H) & (b[:, 3] == W)).all()) and not bool(f.any()):
        return x  # whole images, no flips: the identity, skipped
    theta = torch.zeros(n, 2, 3, dtype=x.dtype, device=x.device)
    # affine_grid (align_corners=False) maps output pixel u to input x = j + (u + 0.5) w / W - 0.5 with
    # scale w / W and shift (2 j + w) / W - 1; a negative scale mirrors the crop about its centre
    theta[:, 0, 0] = torch.where(f, -1.0, 1.0).to(x.dtype) * b[:, 3] / W
    theta[:, 0, 2] = (2 * b[:, 1] + b[:, 3]) / W - 1
    theta[:, 1, 1] = b[:, 2] / H
    theta[:, 1, 2] = (2 * b[:, 0] + b[:, 2]) / H - 1
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


def crop_plan(image_ids: Sequence[int] | np.ndarray, epochs: int, *, seed: int, image_hw: tuple[int, int],
              scale: tuple[float, float] | None, ratio: tuple[float, float] = RATIO,
              flip: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Per-epoch views for relabelling and student training: boxes (epochs, N, 4) and flips (epochs, N).

    Image k's views come from its own stream, seeded by (seed, image_ids[k]), one row of uniforms per
    epoch: they do not depend on the other images, and a plan for fewer epochs is a prefix.
    """
    ids = np.asarray(image_ids, dtype=np.int64).reshape(-1)
    if epochs < 1:
        raise ValueError(f"epochs must be >= 1, got {epochs}")
    u = np.stack([np.random.default_rng([seed, int(i)]).random((epochs, _U_PER_VIEW)) for i in ids], 1) \
        if len(ids) else np.zeros((epochs, 0, _U_PER_VIEW))
    return _views_from_uniforms(u, image_hw, scale, ratio, flip)


def _check_scale(scale: tuple[float, float] | None, name: str) -> tuple[float, float] | None:
    if scale is None:
        return None
    lo, hi = float(scale[0]), float(scale[1])
    if not 0 < lo <= hi <= 1:
        raise ValueError(f"{name} must satisfy 0 < lo <= hi <= 1, got {scale}")
    return lo, hi


def to_unit(images: np.ndarray | torch.Tensor) -> torch.Tensor:
    """uint8 pixels (0..255) or floats already in [0, 1] -> a float32 tensor in [0, 1]."""
    if isinstance(images, torch.Tensor):
        t = images.detach().cpu()
        return t.float() / 255.0 if t.dtype == torch.uint8 else t.float()
    a = np.asarray(images)
    return torch.from_numpy(a.astype(np.float32) / 255.0 if a.dtype == np.uint8 else a.astype(np.float32))


def to_uint8(images: np.ndarray) -> np.ndarray:
    """[0, 1] floats -> uint8 pixels, rounded (the storage format of the project's datasets)."""
    return np.clip(np.rint(np.asarray(images, dtype=np.float64) * 255.0), 0, 255).astype(np.uint8)


# ----------------------------------------------------------------------------------------- recover
@dataclass(frozen=True)
class RecoveryBatch:
    """One unit of recovery work: the classes of one block at one IPC index (one image per class)."""
    ipc_index: int
    block: int
    classes: tuple[int, ...]


def plan_batches(num_classes: int, ipc: int | Sequence[int], batch_size: int | None = None) -> list[RecoveryBatch]:
    """Every recovery batch for IPC indices ``range(ipc)`` (or the given indices): classes cut into
    consecutive blocks of ``batch_size`` (default: all classes in one batch), as the official
    ``arange(num_classes)`` in chunks of ``--batch-size``."""
    bs = num_classes if batch_size is None else int(batch_size)
    if num_classes < 1 or bs < 1:
        raise ValueError(f"num_classes and batch_size must be >= 1, got {num_classes}, {batch_size}")
    ipcs = range(ipc) if isinstance(ipc, int) else ipc
    return [RecoveryBatch(int(i), b, tuple(range(b * bs, min((b + 1) * bs, num_classes))))
            for i in ipcs for b in range(-(-num_classes // bs))]


@dataclass(frozen=True)
class Recovered:
    """Recovered images and per-image diagnostics, one row per (class, ipc_index), as plain arrays."""
    images: np.ndarray         # (N, C, H, W) float32 in [0, 1] (pixel space)
    labels: np.ndarray         # (N,) int64 target class
    ipc_index: np.ndarray      # (N,) int64
    block: np.ndarray          # (N,) int64 the class block the image was recovered in
    ce: np.ndarray             # (N,) float32 teacher cross-entropy on the final image (eval, un-augmented)
    confidence: np.ndarray     # (N,) float32 teacher softmax probability of the target class
    predicted: np.ndarray      # (N,) int64 teacher arg-max
    bn_loss: np.ndarray        # (N,) float32 L_bn of the image's batch (a batch quantity), final image
    ce_start: np.ndarray       # (N,) float32 the same CE on the starting noise
    bn_loss_start: np.ndarray  # (N,) float32 the batch's L_bn on the starting noise

    def __len__(self) -> int:
        return len(self.labels)

    def take(self, index: np.ndarray | Sequence[int]) -> "Recovered":
        idx = np.asarray(index, dtype=np.int64)
        return Recovered(**{f.name: getattr(self, f.name)[idx] for f in fields(self)})

    @staticmethod
    def concat(parts: Sequence["Recovered"]) -> "Recovered":
        return Recovered(**{f.name: np.concatenate([getattr(p, f.name) for p in parts]) for f in fields(Recovered)})

    def columns(self) -> dict[str, np.ndarray]:
        """Name -> array, for a table writer; images stay (N, C, H, W)."""
        return {f.name: getattr(self, f.name) for f in fields(self)}


def _infer_num_classes(teacher: nn.Module, image_shape: tuple[int, int, int], device) -> int:
    with torch.no_grad():
        return int(teacher(torch.zeros(1, *image_shape, device=device)).shape[1])


def _device_of(model: nn.Module) -> torch.device:
    for t in list(model.parameters()) + list(model.buffers()):
        return t.device
    return torch.device("cpu")


def _recover_block(teacher: nn.Module, bn: BNStatLoss, batch: RecoveryBatch, *, seed: int, iterations: int,
                   lr: float, r_bn: float, jitter: int, crop: tuple[float, float] | None, flip: bool,
                   mean: torch.Tensor, std: torch.Tensor, image_shape: tuple[int, int, int]) -> dict[str, np.ndarray]:
    device, dtype = mean.device, mean.dtype
    n = len(batch.classes)
    stream = hash_seed(seed, batch.ipc_index, batch.block)
    noise = torch.Generator().manual_seed(stream)
    rng = np.random.default_rng(stream)  # augmentation draws
    y = torch.tensor(batch.classes, dtype=torch.long, device=device)
    lo, hi = (0.0 - mean) / std, (1.0 - mean) / std  # the valid pixel range [0, 1] in normalised space
    x = torch.randn((n, *image_shape), generator=noise, dtype=dtype).to(device).requires_grad_(True)

    def score() -> tuple[np.ndarray, float, np.ndarray, np.ndarray]:
        with torch.no_grad():
            logits = teacher(x)
            bn_value = float(bn.loss())
            ce = F.cross_entropy(logits, y, reduction="none")
            p = torch.softmax(logits, 1).gather(1, y[:, None])[:, 0]
        return ce.cpu().numpy(), bn_value, p.cpu().numpy(), logits.argmax(1).cpu().numpy()

    ce_start, bn_start, _, _ = score()
    opt = torch.optim.Adam([x], lr=lr, betas=(0.5, 0.9), eps=1e-8)
    H, W = image_shape[1:]
    for it in range(iterations):
        for g in opt.param_groups:  # cosine, no warm-up (official lr_cosine_policy(lr, 0, iterations))
            g["lr"] = 0.5 * (1 + math.cos(math.pi * it / iterations)) * lr
        view = x
        if crop is not None or flip:  # one box / flip per step for the whole batch, as the official
            box, f = _views_from_uniforms(rng.random(_U_PER_VIEW), (H, W), crop, RATIO, flip)
            view = resized_crop(view, np.repeat(box[None], n, 0), np.repeat(f, n))
        if jitter:
            dy, dx = (int(v) for v in rng.integers(-jitter, jitter + 1, size=2))
            view = torch.roll(view, shifts=(dy, dx), dims=(2, 3))
        opt.zero_grad(set_to_none=True)
        loss = F.cross_entropy(teacher(view), y) + r_bn * bn.loss()
        loss.backward()
        opt.step()
        with torch.no_grad():  # clip to the valid pixel range
            x.copy_(torch.maximum(torch.minimum(x, hi), lo))
    ce, bn_end, conf, pred = score()  # the last iterate is kept (the official "best" tracking is dead code)
    pixels = (x.detach() * std + mean).clamp(0.0, 1.0)
    full = lambda v: np.full(n, v, np.float32)  # noqa: E731
    return {"images": pixels.float().cpu().numpy(), "labels": np.asarray(batch.classes, np.int64),
            "ipc_index": np.full(n, batch.ipc_index, np.int64), "block": np.full(n, batch.block, np.int64),
            "ce": ce.astype(np.float32), "confidence": conf.astype(np.float32), "predicted": pred.astype(np.int64),
            "bn_loss": full(bn_end), "ce_start": ce_start.astype(np.float32), "bn_loss_start": full(bn_start)}


def recover_pairs(teacher: nn.Module, pairs: Sequence[tuple[int, int]], *, seed: int = 0,
                  num_classes: int | None = None, batch_size: int | None = None,
                  iterations: int = 500,      # brief's CPU experiment; official 1k (CIFAR) / 4k (ImageNet)
                  lr: float = 0.25,           # official recover.sh / recover_cifar.sh (argparse default 0.1)
                  r_bn: float = 0.01,         # official recover.sh (argparse default 0.05)
                  first_bn_multiplier: float = 10.0,  # official: the first BN's term x10
                  jitter: int = 1,            # +-1 px circular roll at 28 px (official 32 px at 224, 4 at 32)
                  crop: tuple[float, float] | None = None,  # random-resized-crop area scale; None: off (CIFAR)
                  flip: bool = False,         # random horizontal flip; off: digits are not mirror-symmetric
                  mean: float | Sequence[float] = 0.0,  # the teacher's input normalisation (x - mean) / std
                  std: float | Sequence[float] = 1.0,
                  image_shape: tuple[int, int, int] = (1, 28, 28)) -> Recovered:
    """Recover one image for each (class, ipc_index) pair, rows in the order of ``pairs``.

    Each distinct pair's image depends only on (teacher, seed, settings, num_classes, batch_size, class,
    ipc_index): the batches are the fixed blocks of ``plan_batches`` and a block is run whole (see the
    module docstring). ``num_classes`` defaults to the teacher's output width.
    """
    image_shape = tuple(int(s) for s in image_shape)  # type: ignore[assignment]
    if len(image_shape) != 3:
        raise ValueError(f"image_shape must be (C, H, W), got {image_shape}")
    if iterations < 1 or lr <= 0 or r_bn < 0 or jitter < 0:
        raise ValueError(f"need iterations >= 1, lr > 0, r_bn >= 0, jitter >= 0; "
                         f"got {iterations}, {lr}, {r_bn}, {jitter}")
    crop = _check_scale(crop, "crop")
    pairs = [(int(c), int(i)) for c, i in pairs]
    device = _device_of(teacher)
    dtype = next(iter(teacher.parameters()), torch.zeros(())).dtype
    mean_t = _channel_tensor(mean, image_shape[0], device, dtype)
    std_t = _channel_tensor(std, image_shape[0], device, dtype)
    if bool((std_t <= 0).any()):
        raise ValueError(f"std must be positive, got {std}")
    with frozen(teacher):
        if num_classes is None:
            num_classes = _infer_num_classes(teacher, image_shape, device)
        bs = num_classes if batch_size is None else int(batch_size)
        if bs < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        for c, i in pairs:
            if not 0 <= c < num_classes or i < 0:
                raise ValueError(f"pair (class={c}, ipc_index={i}) is out of range for {num_classes} classes")
        if not pairs:
            raise ValueError("no (class, ipc_index) pairs to recover")
        needed = sorted({(i, c // bs) for c, i in pairs})
        rows: dict[tuple[int, int], tuple[dict[str, np.ndarray], int]] = {}
        with BNStatLoss(teacher, first_bn_multiplier) as bn:
            for i, b in needed:
                batch = RecoveryBatch(i, b, tuple(range(b * bs, min((b + 1) * bs, num_classes))))
                out = _recover_block(teacher, bn, batch, seed=seed, iterations=iterations, lr=lr, r_bn=r_bn,
                                     jitter=jitter, crop=crop, flip=flip, mean=mean_t, std=std_t,
                                     image_shape=image_shape)
                for k, c in enumerate(batch.classes):
                    rows[(c, i)] = (out, k)
    cols = {f.name: np.stack([rows[p][0][f.name][rows[p][1]] for p in pairs]) for f in fields(Recovered)}
    return Recovered(**cols)


def recover(teacher: nn.Module, classes: Sequence[int] | None = None, *, ipc_index: int | Sequence[int] = 0,
            **settings) -> Recovered:
    """Recover one image per class in ``classes`` (default: every class) at each IPC index; rows ordered
    by IPC index, then by ``classes``. ``settings`` are ``recover_pairs``'s keyword arguments (seed,
    iterations, lr, r_bn, first_bn_multiplier, jitter, crop, flip, mean, std, image_shape, ...)."""
    ipcs = [ipc_index] if isinstance(ipc_index, int) else list(ipc_index)
    if classes is None:
        shape = tuple(settings.get("image_shape", (1, 28, 28)))
        n = settings.get("num_classes")
        if n is None:
            with frozen(teacher):
                n = _infer_num_classes(teacher, shape, _device_of(teacher))
        classes = range(n)
    return recover_pairs(teacher, [(c, i) for i in ipcs for c in classes], **settings)


# ----------------------------------------------------------------------------------------- relabel
@dataclass(frozen=True)
class SoftLabels:
    """Per epoch and image: the view (crop box, flip) the teacher saw and its fp16 logits (FKD-style)."""
    image_ids: np.ndarray   # (N,) int64 the ids the views were seeded with
    boxes: np.ndarray       # (E, N, 4) int16 top, left, height, width in pixels
    flips: np.ndarray       # (E, N) bool
    logits: np.ndarray      # (E, N, C) float16 teacher logits on that view
    seed: int
    scale: tuple[float, float] | None
    ratio: tuple[float, float]
    flip: bool

    @property
    def epochs(self) -> int:
        return self.logits.shape[0]

    def take(self, index: np.ndarray | Sequence[int]) -> "SoftLabels":
        idx = np.asarray(index, dtype=np.int64)
        return SoftLabels(self.image_ids[idx], self.boxes[:, idx], self.flips[:, idx], self.logits[:, idx],
                          self.seed, self.scale, self.ratio, self.flip)

    @staticmethod
    def concat(parts: Sequence["SoftLabels"]) -> "SoftLabels":
        first = parts[0]
        if any((p.seed, p.scale, p.ratio, p.flip, p.epochs) != (first.seed, first.scale, first.ratio, first.flip,
                                                                first.epochs) for p in parts):
            raise ValueError("soft-label stores made with different seeds, views or epochs cannot be joined")
        return SoftLabels(np.concatenate([p.image_ids for p in parts]), np.concatenate([p.boxes for p in parts], 1),
                          np.concatenate([p.flips for p in parts], 1), np.concatenate([p.logits for p in parts], 1),
                          first.seed, first.scale, first.ratio, first.flip)


def _normalised(images: np.ndarray | torch.Tensor, mean, std, device, dtype=torch.float32) -> torch.Tensor:
    x = to_unit(images).to(device=device, dtype=dtype)
    c = x.shape[1]
    return (x - _channel_tensor(mean, c, device, dtype)) / _channel_tensor(std, c, device, dtype)


def relabel(teacher: nn.Module, images: np.ndarray, *, epochs: int = 300, seed: int = 42,
            scale: tuple[float, float] | None = (0.5, 1.0), ratio: tuple[float, float] = RATIO,
            flip: bool = False, mean: float | Sequence[float] = 0.0, std: float | Sequence[float] = 1.0,
            image_ids: Sequence[int] | np.ndarray | None = None, batch_size: int = 256,
            dtype: np.dtype = np.float16) -> SoftLabels:
    """Teacher soft labels on ``epochs`` views per image (uint8 or [0, 1] images, (N, C, H, W)).

    Defaults: 300 epochs and seed 42 as the official relabel (``--epochs 300``, ``--fkd-seed 42``), fp16
    logits (``--use-fp16``); crop area scale (0.5, 1) and no flip at 28 px (see the module docstring).
    """
    scale = _check_scale(scale, "scale")
    n = len(images)
    ids = np.arange(n) if image_ids is None else np.asarray(image_ids, dtype=np.int64)
    if len(ids) != n:
        raise ValueError(f"{len(ids)} image_ids for {n} images")
    hw = tuple(np.asarray(images).shape[2:]) if not isinstance(images, torch.Tensor) else tuple(images.shape[2:])
    boxes, flips = crop_plan(ids, epochs, seed=seed, image_hw=hw, scale=scale, ratio=ratio, flip=flip)
    device = _device_of(teacher)
    out = []
    with frozen(teacher), torch.no_grad():
        x = _normalised(images, mean, std, device)
        for e in range(epochs):
            out.append(torch.cat([teacher(resized_crop(x[s:s + batch_size], boxes[e, s:s + batch_size],
                                                       flips[e, s:s + batch_size])).float().cpu()
                                  for s in range(0, n, batch_size)]).numpy().astype(dtype))
    return SoftLabels(ids, boxes.astype(np.int16), flips, np.stack(out), int(seed), scale, tuple(ratio), bool(flip))


def soft_label_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """KL(softmax(t / T) || softmax(s / T)) summed over classes, averaged over the batch, no T^2:
    ``nn.KLDivLoss('batchmean')(log_softmax(s / T), softmax(t / T))`` of ``validate/train_FKD.py``."""
    return kd_loss(student_logits, teacher_logits, temperature) / temperature**2


def train_student(student: nn.Module, images: np.ndarray, labels: np.ndarray | SoftLabels | None = None, *,
                  teacher: nn.Module | None = None,
                  epochs: int = 300,          # brief's CPU experiment and the official 300
                  temperature: float = 4.0,   # brief's CPU experiment (official: 20 ImageNet, 30 CIFAR)
                  lr: float = 1e-3, weight_decay: float = 0.01,  # AdamW, official validate / relabel_cifar
                  batch_size: int = 32,       # 128 (relabel_cifar) is one step per epoch on 100 images (docstring)
                  seed: int = 0, mean: float | Sequence[float] = 0.0, std: float | Sequence[float] = 1.0,
                  scale: tuple[float, float] | None = (0.5, 1.0), ratio: tuple[float, float] = RATIO,
                  flip: bool = False, image_ids: Sequence[int] | np.ndarray | None = None) -> dict[str, list[float]]:
    """Train ``student`` on a condensed set; returns per-epoch {"loss", "lr"}; the student ends in eval mode.

    ``labels`` picks the target:
    - a ``SoftLabels`` store: replay its views and logits (KL at ``temperature``); its epochs bound ``epochs``;
    - ``None`` with a ``teacher``: online soft labels, the teacher labelling views drawn as ``relabel``
      draws them from (``seed``, ``image_ids``, ``scale``, ``ratio``, ``flip``), so online and stored
      labels of one seed are the same (stored ones rounded to fp16);
    - an int array: hard labels, cross-entropy on views drawn the same way.
    The batch order per epoch and the student's own randomness (dropout) come from ``seed`` too; the
    global torch RNG is left as it was.
    """
    n = len(images)
    if isinstance(labels, SoftLabels):
        if teacher is not None:
            raise ValueError("pass either a SoftLabels store or a teacher for online labels, not both")
        if labels.logits.shape[1] != n:
            raise ValueError(f"the store labels {labels.logits.shape[1]} images, got {n}")
        if epochs > labels.epochs:
            raise ValueError(f"epochs={epochs} exceeds the {labels.epochs} epochs of the store")
        boxes, flips, mode = labels.boxes, labels.flips, "replay"
    else:
        if labels is None and teacher is None:
            raise ValueError("no target: pass hard labels, a SoftLabels store, or a teacher for online labels")
        if labels is not None and teacher is not None:
            raise ValueError("pass hard labels or a teacher, not both")
        ids = np.arange(n) if image_ids is None else np.asarray(image_ids, dtype=np.int64)
        hw = tuple(np.asarray(images).shape[2:]) if not isinstance(images, torch.Tensor) else tuple(images.shape[2:])
        boxes, flips = crop_plan(ids, epochs, seed=seed, image_hw=hw, scale=_check_scale(scale, "scale"),
                                 ratio=ratio, flip=flip)
        mode = "online" if teacher is not None else "hard"
        if mode == "hard":
            hard = torch.as_tensor(np.asarray(labels), dtype=torch.long)
            if len(hard) != n:
                raise ValueError(f"{len(hard)} labels for {n} images")
    device = _device_of(student)
    x_all = _normalised(images, mean, std, device)
    opt = torch.optim.AdamW(student.parameters(), lr=lr, weight_decay=weight_decay)
    history: dict[str, list[float]] = {"loss": [], "lr": []}
    ctx = frozen(teacher) if teacher is not None else _nullcontext()
    with torch.random.fork_rng(devices=[]), ctx:
        torch.manual_seed(hash_seed(seed, 1))
        student.train()
        for e in range(epochs):
            lr_e = 0.5 * (1 + math.cos(math.pi * e / epochs)) * lr  # cosine per epoch (CosineAnnealingLR)
            for g in opt.param_groups:
                g["lr"] = lr_e
            order = np.random.default_rng([seed, e, 1]).permutation(n)
            total = 0.0
            for s in range(0, n, batch_size):
                idx = order[s:s + batch_size]
                view = resized_crop(x_all[idx], boxes[e, idx], flips[e, idx])
                logits = student(view)
                if mode == "hard":
                    loss = F.cross_entropy(logits, hard[idx].to(device))
                else:
                    if mode == "replay":
                        target = torch.from_numpy(labels.logits[e, idx].astype(np.float32)).to(device)
                    else:
                        with torch.no_grad():
                            target = teacher(view).float()
                    loss = soft_label_loss(logits, target, temperature)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                total += float(loss.detach()) * len(idx)
            history["loss"].append(total / n)
            history["lr"].append(lr_e)
    student.eval()
    return history


@contextmanager
def _nullcontext() -> Iterator[None]:
    yield None


def accuracy(model: nn.Module, images: np.ndarray, labels: np.ndarray, *, mean: float | Sequence[float] = 0.0,
             std: float | Sequence[float] = 1.0, batch_size: int = 1000) -> float:
    """Top-1 accuracy of ``model`` (put in eval mode) on uint8 or [0, 1] images."""
    model.eval()
    device = _device_of(model)
    with torch.no_grad():
        pred = np.concatenate([model(_normalised(images[s:s + batch_size], mean, std, device)).argmax(1).cpu().numpy()
                               for s in range(0, len(images), batch_size)])
    return float((pred == np.asarray(labels)).mean())


# ---------------------------------------------------------------------------------------- baselines
def _class_order(labels: np.ndarray, c: int, seed: int) -> np.ndarray:
    """Class ``c``'s image indices in a random order fixed by ``seed``: IPC k takes the first k, so a
    smaller random-real set is a prefix of a larger one (as a recovered set's IPC indices are)."""
    return np.random.default_rng([seed, int(c)]).permutation(np.flatnonzero(labels == c))


def random_real_subset(labels: np.ndarray, ipc: int, seed: int) -> np.ndarray:
    """Indices of ``ipc`` real images per class, drawn without replacement by ``seed``, class by class
    (rows ordered by class, then draw); the draws for IPC k are the first k of those for any larger IPC;
    a class with fewer images raises."""
    labels = np.asarray(labels)
    if ipc < 1:
        raise ValueError(f"ipc must be >= 1, got {ipc}")
    picked = []
    for c in np.unique(labels):
        order = _class_order(labels, c, seed)
        if len(order) < ipc:
            raise ValueError(f"class {c} has {len(order)} images, fewer than ipc={ipc}")
        picked.append(order[:ipc])
    return np.concatenate(picked)


def real_pairs(teacher: nn.Module, images: np.ndarray, labels: np.ndarray, pairs: Sequence[tuple[int, int]], *,
               seed: int, batch_size: int | None = None, first_bn_multiplier: float = 10.0,
               mean: float | Sequence[float] = 0.0, std: float | Sequence[float] = 1.0) -> Recovered:
    """The random-real counterpart of ``recover_pairs``: for each (class, ipc_index) pair the
    ``ipc_index``-th real image of the class in ``random_real_subset``'s seeded order, as a ``Recovered``
    with the same diagnostics (teacher CE / confidence / arg-max, and L_bn of the image's block, the
    batch a recovery would have formed), so a random-real set is stored and read exactly like a
    recovered one. ``images``: the real pool, uint8 or [0, 1] floats (N, C, H, W)."""
    labels = np.asarray(labels)
    pairs = [(int(c), int(i)) for c, i in pairs]
    if not pairs:
        raise ValueError("no (class, ipc_index) pairs to draw")
    num_classes = int(labels.max()) + 1
    bs = num_classes if batch_size is None else int(batch_size)
    orders: dict[int, np.ndarray] = {}
    for c, i in pairs:
        order = orders.setdefault(c, _class_order(labels, c, seed))
        if not 0 <= i < len(order):
            raise ValueError(f"pair (class={c}, ipc_index={i}): class {c} has {len(order)} images")
    index = np.array([orders[c][i] for c, i in pairs])
    ipcs = np.array([i for _, i in pairs], np.int64)
    device = _device_of(teacher)
    dtype = next(iter(teacher.parameters()), torch.zeros(())).dtype
    x = _normalised(images[index], mean, std, device, dtype)
    y = torch.tensor([c for c, _ in pairs], device=device)
    block = np.array([c // bs for c, _ in pairs], np.int64)
    bn_block = np.zeros(len(pairs), np.float32)
    with frozen(teacher), torch.no_grad(), BNStatLoss(teacher, first_bn_multiplier) as bn:
        for i, b in sorted(set(zip(ipcs.tolist(), block.tolist()))):
            rows = np.flatnonzero((ipcs == i) & (block == b))
            teacher(x[rows])
            bn_block[rows] = float(bn.loss())
        logits = teacher(x)
        ce = F.cross_entropy(logits, y, reduction="none").cpu().numpy().astype(np.float32)
        conf = torch.softmax(logits, 1).gather(1, y[:, None])[:, 0].cpu().numpy().astype(np.float32)
    return Recovered(images=to_unit(images[index]).float().numpy(), labels=y.cpu().numpy().astype(np.int64),
                     ipc_index=ipcs, block=block, ce=ce, confidence=conf,
                     predicted=logits.argmax(1).cpu().numpy().astype(np.int64), bn_loss=bn_block,
                     ce_start=ce, bn_loss_start=bn_block)


def random_real_baseline(student: nn.Module, images: np.ndarray, labels: np.ndarray, *, ipc: int, seed: int,
                         teacher: nn.Module | None = None, relabel_kwargs: dict | None = None,
                         **train_kwargs) -> dict[str, list[float]]:
    """The fair baselines: ``ipc`` random real images per class (``random_real_subset``) trained with hard
    labels (``teacher=None``) or with the same ``relabel`` soft labels SRe2L's images get. ``mean``/``std``
    in ``train_kwargs`` are passed to ``relabel`` as well."""
    idx = random_real_subset(labels, ipc, seed)
    if teacher is None:
        return train_student(student, images[idx], labels[idx], seed=seed, **train_kwargs)
    rk = {k: train_kwargs[k] for k in ("mean", "std") if k in train_kwargs} | (relabel_kwargs or {})
    rk.setdefault("epochs", train_kwargs.get("epochs", 300))
    store = relabel(teacher, images[idx], **rk)
    return train_student(student, images[idx], store, seed=seed, **train_kwargs)
