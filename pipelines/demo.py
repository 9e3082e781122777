"""The whole squeeze on one box: train with Ray Train + DeepSpeed, compress, serve with Ray Serve, measure.

    python -m pipelines.demo                 # what `make demo` runs (~13 min on 2 cores)
    python -m pipelines.demo --smoke         # a two-minute version on tiny data

Trains SqueezeNet v1.1 on Fashion-MNIST with 2 DeepSpeed workers (pipelines/configs/
squeezenet_fashion.yaml), compresses the logged model with Deep Compression (pruning, weight sharing,
Huffman coding: pipelines/configs/compress_squeezenet.yaml), and for the dense and the compressed
model each: reloads it from MLflow and scores the test set offline, deploys the same MLflow artifact
with Ray Serve, sends the real test images through the HTTP endpoint, and times single-image
requests. Prints a size / accuracy / latency table, then the command that opens the MLflow UI.
"""
from __future__ import annotations

import time
from typing import Any, ClassVar

import numpy as np
from pydantic import Field

from pipelines.core import tracking
from pipelines.core.config import JobConfig, load_config, run_cli

TARGET_ACC = 0.88  # the backbone's promise for the full demo


class DemoConfig(JobConfig):
    train_config: str = "pipelines/configs/squeezenet_fashion.yaml"
    train_overrides: list[str] = Field(default_factory=list)  # dotted overrides for the train job
    compress_config: str | None = "pipelines/configs/compress_squeezenet.yaml"  # null: skip compression
    compress_overrides: list[str] = Field(default_factory=list)
    smoke_train: bool = False  # train with the job's --smoke settings
    eval_limit: int | None = Field(None, gt=0)  # score only the first N test images
    latency_requests: int = Field(500, ge=1)  # single-image requests timed one after another
    batch_images: int = Field(64, ge=1)  # images per request when scoring the test set via HTTP
    port: int = Field(8000, ge=1, le=65535)

    SMOKE: ClassVar[dict[str, Any]] = {"smoke_train": True, "eval_limit": 512, "latency_requests": 50}


def percentile_ms(samples: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(samples) * 1000.0, q))


def main(cfg: DemoConfig) -> dict[str, Any]:
    from ray import serve

    from pipelines import serve as serving
    from pipelines import train
    from tasks.common.batches import predict_labels
    from tasks.common.datasets import load_dataset
    from tasks.common.model_io import artifact_bytes

    t_start = time.perf_counter()
    train_cfg = load_config(train.TrainConfig, cfg.train_config, cfg.train_overrides, smoke=cfg.smoke_train)
    run_id = train.main(train_cfg)
    t_train = time.perf_counter() - t_start
    uris = {"dense": f"runs:/{run_id}"}
    if cfg.compress_config:
        from pipelines import compress

        print("[demo] compressing the trained model (prune, share weights, Huffman-code)", flush=True)
        compress_cfg = load_config(compress.CompressConfig, cfg.compress_config,
                                   [f"source=runs:/{run_id}", *cfg.compress_overrides], smoke=cfg.smoke_train)
        uris["compressed"] = f"runs:/{compress.main(compress_cfg)}"

    data = load_dataset(train_cfg.data.name, seed=train_cfg.seed, val_fraction=train_cfg.data.val_fraction)
    test_x, test_y = data.test_x[: cfg.eval_limit], data.test_y[: cfg.eval_limit]
    models = {}
    for label, uri in uris.items():
        print(f"[demo] {label}: reloading {uri} from MLflow, scoring offline, then through Ray Serve", flush=True)
        model, spec, local = tracking.load_logged_model(uri)
        offline = predict_labels(model, test_x, spec["input"]["mean"], spec["input"]["std"])
        url = serving.deploy(serving.ServeConfig(model_uri=uri, port=cfg.port, block=False,
                                                 max_images=cfg.batch_images))
        try:
            endpoint_acc = float((serving.endpoint_labels(url, test_x[:, 0], cfg.batch_images) == test_y).mean())
            latencies = serving.request_latencies(url, test_x[:, 0], cfg.latency_requests)
        finally:
            serve.shutdown()
        models[label] = {"uri": uri, "offline_acc": float((offline == test_y).mean()), "endpoint_acc": endpoint_acc,
                         "model_bytes": artifact_bytes(local), "p50_ms": percentile_ms(latencies, 50),
                         "p95_ms": percentile_ms(latencies, 95)}

    summary = {"run_id": run_id, "test_images": len(test_y), **models["dense"], "models": models,
               "train_s": t_train, "total_s": time.perf_counter() - t_start, "dataset": data.name,
               "synthetic": data.synthetic}
    _log(summary, run_id, train_cfg.experiment)
    _print(summary, smoke=cfg.smoke_train)
    return summary


def _log(summary: dict[str, Any], run_id: str, experiment: str) -> None:
    import mlflow

    tracking.setup(experiment)
    with mlflow.start_run(run_id=run_id):
        metrics = {"demo/offline_acc": summary["offline_acc"], "demo/endpoint_acc": summary["endpoint_acc"],
                   "serve/p50_ms": summary["p50_ms"], "serve/p95_ms": summary["p95_ms"],
                   "model/bytes_on_disk": summary["model_bytes"], "demo/total_s": summary["total_s"]}
        for label, m in summary["models"].items():
            if label != "dense":
                metrics.update({f"demo/{label}/{k}": v for k, v in m.items() if k != "uri"})
        mlflow.log_metrics(metrics)
        mlflow.log_dict(summary, "demo_summary.json")


def _print(s: dict[str, Any], smoke: bool) -> None:
    models = s["models"]
    head = ["", *models]
    rows = [("test accuracy, offline (reloaded from MLflow)", [f"{m['offline_acc']:.4f}" for m in models.values()]),
            ("test accuracy, through the HTTP endpoint", [f"{m['endpoint_acc']:.4f}" for m in models.values()]),
            ("bytes on disk (the served artifact)", [f"{m['model_bytes']:,}" for m in models.values()]),
            ("size vs dense", [f"{models['dense']['model_bytes'] / m['model_bytes']:.1f}x" for m in models.values()]),
            ("latency per 1-image request, p50 / p95", [f"{m['p50_ms']:.1f} / {m['p95_ms']:.1f} ms"
                                                        for m in models.values()])]
    width = max(len(k) for k, _ in rows)
    print("\n" + "=" * (width + 40))
    print("squeezelab demo: SqueezeNet v1.1 on Fashion-MNIST, Ray Train + DeepSpeed -> Deep Compression -> "
          "MLflow -> Ray Serve")
    print(f"{s['test_images']:,} test images ({s['dataset']}, {'synthetic' if s['synthetic'] else 'real'}); "
          f"training {s['train_s']:.0f} s, demo {s['total_s']:.0f} s")
    print("=" * (width + 40))
    print(f"{head[0]:<{width}}  " + "  ".join(f"{h:>18}" for h in head[1:]))
    for k, values in rows:
        print(f"{k:<{width}}  " + "  ".join(f"{v:>18}" for v in values))
    if not smoke:
        verdict = "met" if s["endpoint_acc"] >= TARGET_ACC else "NOT met"
        print(f"{'target: dense test accuracy >= 0.88':<{width}}  {verdict}")
    uri = tracking.tracking_uri()
    print(f"\nReview the runs in the MLflow UI (training run {s['run_id']}):\n"
          f"  .venv/bin/mlflow ui --backend-store-uri {uri} --host 127.0.0.1 --port 5000    (or: make mlflow-ui)\n")


if __name__ == "__main__":
    run_cli(DemoConfig, main)
