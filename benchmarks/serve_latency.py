"""Teacher vs distilled student through the serving path: accuracy, bytes on disk, latency.

    python benchmarks/serve_latency.py                         # what `make bench-distill` runs
    python benchmarks/serve_latency.py --teacher runs:/<id> --student runs:/<id> --requests 500

Each model is deployed in turn with the serve app (pipelines/serve.py, the same Ray Serve deployment
users run), all test images are classified through ``POST /classify`` in batches of 64, then
``--requests`` single-image requests are timed one after another. Both run in this one invocation
on this machine. The last line is the ratio of the student's p50 latency to the teacher's.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def measure(model_uri: str, requests: int, port: int) -> dict:
    import numpy as np
    from ray import serve

    from pipelines import serve as serving
    from pipelines.core import tracking
    from tasks.common.datasets import load_dataset
    from tasks.common.model_io import artifact_bytes

    model, spec, local = tracking.load_logged_model(model_uri)
    data = load_dataset(spec["input"]["dataset"])
    url = serving.deploy(serving.ServeConfig(model_uri=model_uri, port=port, block=False))
    try:
        acc = float((serving.endpoint_labels(url, data.test_x[:, 0]) == data.test_y).mean())
        serving.request_latencies(url, data.test_x[:20, 0], 20)  # warm-up
        lat = np.asarray(serving.request_latencies(url, data.test_x[:, 0], requests)) * 1000
    finally:
        serve.shutdown()
    return {"uri": model_uri, "model": spec["model"], "params": sum(p.numel() for p in model.parameters()),
            "bytes": artifact_bytes(local), "acc": acc, "p50": float(np.percentile(lat, 50)),
            "p95": float(np.percentile(lat, 95)), "test_images": len(data.test_y)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--teacher", default="models:/squeezenet-fashion@current")
    parser.add_argument("--student", default="models:/squeezenet-fashion-student@current")
    parser.add_argument("--requests", type=int, default=500)
    parser.add_argument("--port", type=int, default=8011)
    args = parser.parse_args()
    rows = [measure(args.teacher, args.requests, args.port), measure(args.student, args.requests, args.port)]
    print(f"\n{'':8} {'model':<16} {'parameters':>11} {'bytes':>11} {'accuracy':>9} {'p50 ms':>7} {'p95 ms':>7}")
    for name, r in zip(("teacher", "student"), rows):
        print(f"{name:8} {r['model']:<16} {r['params']:>11,} {r['bytes']:>11,} {r['acc']:>9.4f} "
              f"{r['p50']:>7.1f} {r['p95']:>7.1f}")
    t, s = rows
    print(f"({t['test_images']:,} real Fashion-MNIST test images through POST /classify; {args.requests} sequential "
          f"1-image requests; size ratio {s['bytes'] / t['bytes']:.3f}, accuracy gap {t['acc'] - s['acc']:+.4f})")
    print(f"student/teacher p50 latency: {s['p50'] / t['p50']:.2f}")


if __name__ == "__main__":
    main()
