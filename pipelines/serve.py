"""Serve a logged image classifier over HTTP with Ray Serve: ``POST /classify``; or, when the artifact is
a packed LM (``pipelines.quantize``), text generation at ``POST /generate`` (pipelines/serve_text.py).

    python -m pipelines.serve model_uri=runs:/<run_id>               # blocks; Ctrl-C stops it
    python -m pipelines.serve model_uri=models:/squeezenet-fashion@current port=8000
    serve run pipelines.serve:app_builder model_uri=runs:/<run_id>   # Ray Serve's own CLI
    serve run pipelines/configs/serve_squeezenet.yaml                # a Serve config file

Request:  {"images": [<H x W or C x H x W nested lists of pixel values in 0..255>, ...]}
Answer:   {"predictions": [{"label": 7, "class": "Sneaker", "probabilities": [...]}, ...], "model": {...}}

The deployment loads the model from MLflow (safetensors + model.json; no pickle) by run id or
registered-model alias, and batches images across concurrent requests with ``@serve.batch``. Bad
input - not JSON, no ``images``, empty, too many images or bytes, wrong shape, non-numbers,
NaN/inf, pixels outside 0..255 - gets a 4xx answer with a JSON ``{"error": ...}`` naming the problem.
HTTP binds to 127.0.0.1 unless ``host`` says otherwise.
"""

# no `from __future__ import annotations`: FastAPI must see the real `Request` type in Serve ingress.
import asyncio
import json
import os
import time
from typing import Any, ClassVar

import numpy as np
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from pydantic import Field
from ray import serve

from pipelines.core.config import JobConfig, run_cli

MAX_BODY_BYTES = 8 * 2**20  # ~8 MiB: 64 float 28x28 images are ~0.3 MiB of JSON


class BadRequest(Exception):
    def __init__(self, status: int, reason: str):
        super().__init__(reason)
        self.status, self.reason = status, reason


def json_body(body: bytes, key: str, example: str, max_bytes: int = MAX_BODY_BYTES) -> dict:
    """A request body as a JSON object that holds ``key``; raise BadRequest naming the problem."""
    if not body:
        raise BadRequest(400, f"empty body: send {{\"{key}\": {example}}}")
    if len(body) > max_bytes:
        raise BadRequest(413, f"body of {len(body)} bytes exceeds the limit of {max_bytes}")
    try:
        payload = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        raise BadRequest(400, "body is not valid JSON") from None
    if not isinstance(payload, dict) or key not in payload:
        raise BadRequest(422, f"expected a JSON object with key \"{key}\"")
    return payload


def parse_images(body: bytes, shape: tuple[int, ...], max_images: int, pixel_max: float = 255.0) -> np.ndarray:
    """Validate a request body into a float32 array (n, C, H, W); raise BadRequest naming the problem."""
    images = json_body(body, "images", "[...]")["images"]
    if not isinstance(images, list) or not images:
        raise BadRequest(422, "images: must be a non-empty list of images")
    if len(images) > max_images:
        raise BadRequest(413, f"images: {len(images)} images exceed the limit of {max_images} per request")
    try:
        arr = np.array(images)
    except ValueError:
        raise BadRequest(422, "images: ragged nesting; every image must have the same shape") from None
    if arr.dtype == object:
        raise BadRequest(422, "images: ragged nesting; every image must have the same shape")
    if arr.dtype.kind not in "iuf":
        raise BadRequest(422, f"images: values must be numbers, got {arr.dtype.kind!r} "
                              f"({'booleans' if arr.dtype.kind == 'b' else arr.dtype.name})")
    c, h, w = shape
    sent = "x".join(map(str, arr.shape[1:]))
    if arr.ndim == 3 and c == 1:
        arr = arr[:, None]
    if arr.shape[1:] != (c, h, w):
        want = f"{h}x{w}" + (f" (or 1x{h}x{w})" if c == 1 else f" with {c} channels first")
        raise BadRequest(422, f"images: each image must be {want}, got {sent}")
    arr = arr.astype(np.float32)
    finite = np.isfinite(arr).reshape(len(arr), -1).all(1)
    if not finite.all():
        raise BadRequest(422, f"images: NaN or infinite values in image {int(np.argmin(finite))}")
    if arr.min() < 0 or arr.max() > pixel_max:
        raise BadRequest(422, f"images: pixel values must lie in [0, {pixel_max:g}], "
                              f"got [{arr.min():g}, {arr.max():g}]")
    return arr


api = FastAPI(title="squeezelab classifier", description="Image classification from an MLflow-logged model")


@serve.deployment(max_ongoing_requests=64)
@serve.ingress(api)
class ImageClassifier:
    def __init__(self, model_uri: str, tracking_uri: str | None = None, max_images: int = 64,
                 max_batch_size: int = 32, batch_wait_timeout_s: float = 0.002, threads: int = 1):
        import torch

        from pipelines.core.tracking import load_logged_model
        from tasks.common.model_io import artifact_bytes

        if tracking_uri:
            os.environ["MLFLOW_TRACKING_URI"] = tracking_uri
        torch.set_num_threads(threads)
        self.model, self.spec, local = load_logged_model(model_uri)
        # NHWC: a 1-image SqueezeNet forward takes ~3.7 ms instead of ~5.5 ms on one CPU thread
        self.model = self.model.to(memory_format=torch.channels_last)
        self.input = self.spec["input"]
        self.shape = tuple(self.input["shape"])
        self.classes = self.input["classes"]
        self.max_images = max_images
        self.info = {"model_uri": model_uri, "model": self.spec["model"], "bytes": artifact_bytes(local),
                     "input_shape": list(self.shape), "classes": self.classes,
                     "dataset": self.input.get("dataset"), "synthetic": self.input.get("synthetic", False)}
        self._predict_batch.set_max_batch_size(max_batch_size)
        self._predict_batch.set_batch_wait_timeout_s(batch_wait_timeout_s)

    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.002)
    async def _predict_batch(self, images: list[np.ndarray]) -> list[np.ndarray]:
        import torch

        from tasks.common.batches import normalise

        x = normalise(np.stack(images), self.input["mean"], self.input["std"], self.input["pixel_max"])
        x = x.contiguous(memory_format=torch.channels_last)
        with torch.no_grad():
            probs = torch.softmax(self.model(x), dim=1).numpy()
        return list(probs)

    @api.get("/healthz")
    async def healthz(self) -> dict[str, str]:
        return {"status": "ok"}

    @api.get("/info")
    async def model_info(self) -> dict[str, Any]:
        return self.info

    @api.post("/classify")
    async def classify(self, request: Request):
        t0 = time.perf_counter()
        try:
            images = parse_images(await request.body(), self.shape, self.max_images,
                                  float(self.input["pixel_max"]))
        except BadRequest as exc:
            return JSONResponse({"error": exc.reason}, status_code=exc.status)
        probs = await asyncio.gather(*(self._predict_batch(img) for img in images))
        predictions = [{"label": int(p.argmax()), "class": self.classes[int(p.argmax())],
                        "probabilities": [round(float(v), 6) for v in p]} for p in probs]
        return {"predictions": predictions, "model": self.info["model_uri"],
                "server_ms": round(1000 * (time.perf_counter() - t0), 3)}


def app_builder(args: dict[str, str]):
    """``serve run pipelines.serve:app_builder model_uri=...``: build the application from CLI args (the
    classifier, or text generation when the artifact is a packed LM)."""
    from pipelines.core.tracking import read_model_spec, tracking_uri

    if "model_uri" not in args:
        raise ValueError("app args: need model_uri")
    store = args.get("tracking_uri") or tracking_uri()
    text = read_model_spec(args["model_uri"], store).get("model") == "packed_lm"
    casts = ({"max_prompt_tokens": int, "max_new_tokens": int, "threads": int} if text else
             {"max_images": int, "max_batch_size": int, "batch_wait_timeout_s": float, "threads": int})
    unknown = set(args) - set(casts) - {"model_uri", "tracking_uri"}
    if unknown:
        raise ValueError(f"app args: unknown {sorted(unknown)}; known {sorted(casts) + ['model_uri', 'tracking_uri']}")
    kwargs = {k: casts.get(k, str)(v) for k, v in args.items()} | {"tracking_uri": store}
    if text:
        from pipelines.serve_text import TextGenerator

        return TextGenerator.bind(**kwargs)
    return ImageClassifier.bind(**kwargs)


class ServeConfig(JobConfig):
    model_uri: str  # runs:/<run_id> or models:/<name>@<alias>: an image classifier or a packed LM
    host: str = "127.0.0.1"  # loopback unless you mean to expose it
    port: int = Field(8000, ge=1, le=65535)
    max_images: int = Field(64, ge=1)  # per request
    max_batch_size: int = Field(32, ge=1)  # @serve.batch across requests
    batch_wait_timeout_s: float = Field(0.002, ge=0)  # added latency of a lone request
    threads: int = Field(1, ge=1)  # torch threads per replica
    max_prompt_tokens: int = Field(1024, ge=1)  # packed LM: per request
    max_new_tokens: int = Field(256, ge=1)      # packed LM: per request
    app_name: str | None = None  # default: "classifier" or "text"
    access_log: bool = False  # echo one line per request to this terminal
    block: bool = True  # keep serving until Ctrl-C

    SMOKE: ClassVar[dict[str, Any]] = {"block": False}


def deploy(cfg: ServeConfig) -> str:
    """Start Serve on host:port and deploy the model (the classifier, or text generation for a packed LM,
    chosen from the artifact's model.json); returns the base URL."""
    from pipelines.core import tracking
    from pipelines.core.config import ConfigError
    from pipelines.core.ray_session import ensure_ray

    uri = tracking.tracking_uri()
    try:
        spec = tracking.read_model_spec(cfg.model_uri)
    except Exception as exc:  # MLflow raises several types for a missing run, model, alias or file
        raise ConfigError(f"model_uri: cannot read {cfg.model_uri!r}: {exc}") from exc
    ensure_ray(uri)
    serve.start(http_options={"host": cfg.host, "port": cfg.port})
    if spec.get("model") == "packed_lm":
        from pipelines.serve_text import TextGenerator

        app = TextGenerator.bind(model_uri=cfg.model_uri, tracking_uri=uri, max_prompt_tokens=cfg.max_prompt_tokens,
                                 max_new_tokens=cfg.max_new_tokens, threads=cfg.threads)
    else:
        app = ImageClassifier.bind(model_uri=cfg.model_uri, tracking_uri=uri, max_images=cfg.max_images,
                                   max_batch_size=cfg.max_batch_size,
                                   batch_wait_timeout_s=cfg.batch_wait_timeout_s, threads=cfg.threads)
    # per-request access lines go to the replica's log file, not to the driver's terminal
    serve.run(app, name=cfg.app_name or ("text" if spec.get("model") == "packed_lm" else "classifier"),
              route_prefix="/", blocking=False,
              logging_config={"enable_access_log": cfg.access_log, "log_level": "WARNING"})
    return f"http://{cfg.host}:{cfg.port}"


def endpoint_labels(url: str, images: np.ndarray, batch: int = 64) -> np.ndarray:
    """Labels for uint8 images [N, H, W] through ``POST /classify``, ``batch`` images per request."""
    import requests

    session, labels = requests.Session(), []
    for i in range(0, len(images), batch):
        r = session.post(f"{url}/classify", json={"images": images[i:i + batch].tolist()})
        r.raise_for_status()
        labels += [p["label"] for p in r.json()["predictions"]]
    return np.asarray(labels)


def request_latencies(url: str, images: np.ndarray, n: int) -> list[float]:
    """Seconds per 1-image request, ``n`` requests one after another (cycling through ``images``)."""
    import json

    import requests

    session, out = requests.Session(), []
    for i in range(n):
        body = json.dumps({"images": [images[i % len(images)].tolist()]})
        t0 = time.perf_counter()
        r = session.post(f"{url}/classify", data=body)
        out.append(time.perf_counter() - t0)
        r.raise_for_status()
    return out


def main(cfg: ServeConfig) -> str:
    url = deploy(cfg)
    print(f"[serve] {cfg.model_uri} at {url}  (its routes: {url}/docs)", flush=True)
    if cfg.block:
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            serve.shutdown()
    return url


if __name__ == "__main__":
    run_cli(ServeConfig, main)
