"""Training throughput: the Ray Train + DeepSpeed job vs a plain single-process PyTorch loop.

    python benchmarks/train_throughput.py                       # what `make bench` runs
    python benchmarks/train_throughput.py --zero-stage 2 scaling.channels_last=false   # NCHW, ZeRO-2

Same model (the train config's SqueezeNet v1.1), same data (the first N Fashion-MNIST training
images, normalised from uint8 per batch), same global batch and optimizer. The job runs as
`pipelines.train` does (2 workers x 1 thread, ZeRO stage as given) and its steady-state samples/s is
the mean of the epochs after the first, as logged to MLflow; the baseline is one process with 2 torch
threads, timed over the same number of steps after a warm-up. Both run in this one invocation on
this machine. The last line is the ratio job / plain.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def plain_samples_per_s(cfg, images: int, threads: int, epochs: int) -> float:
    import torch
    import torch.nn.functional as F

    from pipelines.core.training import build_optimizer
    from tasks.common.batches import epoch_shard, normalise
    from tasks.common.datasets import load_dataset
    from tasks.common.registry import get_model
    from tasks.common.seeding import seed_everything

    torch.set_num_threads(threads)
    seed_everything(cfg.seed)
    data = load_dataset(cfg.data.name, seed=cfg.seed)
    x_all, y_all = data.train_x[:images], data.train_y[:images]
    kwargs = {**cfg.model.kwargs, "num_classes": data.num_classes, "in_channels": data.input_shape[0]}
    fmt = torch.channels_last if cfg.scaling.channels_last else torch.contiguous_format
    model = get_model(cfg.model.name, **kwargs).to(memory_format=fmt).train()
    batch = cfg.train.batch_size
    steps = images // batch
    opt, sched = build_optimizer(cfg.train, model.parameters(), epochs * steps)  # the job's optimizer + schedule
    rates = []
    for epoch in range(epochs):
        idx = epoch_shard(len(x_all), epoch, cfg.seed, 0, 1, batch, steps)
        t0 = time.perf_counter()
        for s in range(steps):
            b = idx[s * batch:(s + 1) * batch]
            x = normalise(x_all[b], data.mean, data.std).contiguous(memory_format=fmt)
            loss = F.cross_entropy(model(x), torch.from_numpy(y_all[b]))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            loss.item()  # the job reads the loss every step too
        rates.append(steps * batch / (time.perf_counter() - t0))
    return sum(rates[1:]) / len(rates[1:])


def job_samples_per_s(cfg) -> tuple[float, float]:
    from mlflow.tracking import MlflowClient

    from pipelines import train
    from pipelines.core import tracking

    t0 = time.perf_counter()
    run_id = train.main(cfg)
    wall = time.perf_counter() - t0
    hist = sorted(MlflowClient(tracking.tracking_uri()).get_metric_history(run_id, "train/samples_per_s"),
                  key=lambda m: m.step)
    steady = [m.value for m in hist[1:]]
    return sum(steady) / len(steady), wall


def main() -> None:
    from pipelines.core.config import load_config
    from pipelines.train import TrainConfig

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="pipelines/configs/squeezenet_fashion.yaml")
    ap.add_argument("--images", type=int, default=12_800, help="training images per epoch (100 steps of 128)")
    ap.add_argument("--epochs", type=int, default=3, help="the first is warm-up, the rest are averaged")
    ap.add_argument("--zero-stage", type=int, default=None, help="default: the config's")
    ap.add_argument("--plain-threads", type=int, default=2)
    ap.add_argument("overrides", nargs="*", metavar="dotted.key=value",
                    help="train-config overrides applied to both sides, e.g. scaling.channels_last=true")
    args = ap.parse_args()

    store = tempfile.mkdtemp(prefix="squeezelab-bench-")
    os.environ.setdefault("MLFLOW_TRACKING_URI", f"sqlite:///{store}/mlflow.db")
    cfg = load_config(TrainConfig, args.config, [
        f"data.limit_train={args.images}", "data.limit_eval=512", f"train.epochs={args.epochs}",
        f"scaling.storage_path={store}/ray", "register_as=null", "experiment=benchmarks",
        *([f"scaling.zero_stage={args.zero_stage}"] if args.zero_stage is not None else []), *args.overrides,
    ])
    workers, threads = cfg.scaling.num_workers, cfg.scaling.threads_per_worker
    print(f"model {cfg.model.name} {cfg.model.kwargs}, {args.images} images x {args.epochs} epochs, "
          f"global batch {cfg.train.batch_size}, channels_last={cfg.scaling.channels_last}", flush=True)
    plain = plain_samples_per_s(cfg, args.images, args.plain_threads, args.epochs)
    print(f"plain PyTorch, 1 process x {args.plain_threads} threads: {plain:.0f} samples/s", flush=True)
    job, wall = job_samples_per_s(cfg)
    print(f"Ray Train + DeepSpeed ZeRO-{cfg.scaling.zero_stage}, {workers} workers x {threads} thread: "
          f"{job:.0f} samples/s (job wall time {wall:.0f} s incl. start-up)", flush=True)
    print(f"ratio job / plain: {job / plain:.2f}x")


if __name__ == "__main__":
    main()
