"""Serve a packed (quantized) causal LM over HTTP with Ray Serve: ``POST /generate``, optionally with a
compressed KV cache. ``pipelines.serve`` deploys it when the artifact it is given is a packed LM (what
``pipelines.quantize`` logs); this module holds the deployment and the request checks.

    python -m pipelines.serve model_uri=runs:/<quantize run id>
    curl -s 127.0.0.1:8000/generate -d '{"prompt": "The capital of Italy is", "max_new_tokens": 16}'
    curl -s 127.0.0.1:8000/generate -d '{"prompt": "...", "kv": {"policy": "streaming_llm", "budget": 64,
                                                                "allocation": "squeeze"}}'

Request: ``{"prompt": str, "max_new_tokens": 1..limit (32 or the limit), "temperature": 0 = greedy (default) or > 0 to
sample, "top_k": int or null, "seed": int, "kv": {"policy": "full" | "sliding_window" | "streaming_llm",
"budget": KV entries kept per layer (on average), "allocation": "uniform" | "squeeze"}}``. With
``allocation: squeeze`` the per-layer budgets come from SqueezeAttention's layer importance over the
prompt (tasks/squeeze_attention.py) at the same total. H2O is not offered: it needs eager attention.

Answer: ``{"text", "tokens", "prompt_tokens", "finished" ("length" or "eos"), "kv": {"policy", "allocation",
"budgets", "bytes", "bytes_full"}, "tokens_per_s", "server_ms", "model"}``. ``kv.bytes`` is what the
cache held at the end, ``bytes_full`` what the full cache would have held.

Bad input (not JSON, no prompt, a prompt or a request over the limits, an unknown policy, a budget below
the policy's minimum) answers 4xx with ``{"error": ...}`` naming the field. One generation runs at a
time per replica; requests wait for their turn (batched decoding across requests is the serving issue's).
"""

# no `from __future__ import annotations`: FastAPI must see the real `Request` type in Serve ingress.
import asyncio
import os
import threading
import time
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from ray import serve

from pipelines.serve import BadRequest, json_body

MAX_BODY_BYTES = 64 * 2**10  # a prompt of the largest allowed length is far below this
POLICIES = ("full", "sliding_window", "streaming_llm")
ALLOCATIONS = ("uniform", "squeeze")


def _field(payload: dict, key: str, kind: type | tuple[type, ...], default: Any = None) -> Any:
    value = payload.get(key, default)
    if value is not None and (isinstance(value, bool) or not isinstance(value, kind)):  # no field takes a bool
        names = " or ".join(t.__name__ for t in (kind if isinstance(kind, tuple) else (kind,)))
        raise BadRequest(422, f"{key}: must be {names}, got {type(value).__name__}")
    return value


def parse_generate(body: bytes, max_new_tokens: int) -> dict[str, Any]:
    """Validate a ``/generate`` body (all but the token counts, which need the tokenizer) into keyword
    arguments; raise BadRequest naming the field."""
    payload = json_body(body, "prompt", '"..."', MAX_BODY_BYTES)
    unknown = set(payload) - {"prompt", "max_new_tokens", "temperature", "top_k", "seed", "kv"}
    if unknown:
        raise BadRequest(422, f"unknown keys {sorted(unknown)}")
    prompt = _field(payload, "prompt", str)
    if not prompt:
        raise BadRequest(422, "prompt: must be a non-empty string")
    new = _field(payload, "max_new_tokens", int, min(32, max_new_tokens))
    if not 1 <= new <= max_new_tokens:
        raise BadRequest(422, f"max_new_tokens: must be 1..{max_new_tokens}, got {new}")
    temperature = float(_field(payload, "temperature", (int, float), 0))
    if not 0 <= temperature <= 10:
        raise BadRequest(422, f"temperature: must be 0 (greedy) .. 10, got {temperature}")
    top_k = _field(payload, "top_k", int)
    if top_k is not None and top_k < 1:
        raise BadRequest(422, f"top_k: must be >= 1, got {top_k}")
    kv = _field(payload, "kv", dict, {})
    unknown = set(kv) - {"policy", "budget", "allocation"}
    if unknown:
        raise BadRequest(422, f"kv: unknown keys {sorted(unknown)}")
    policy = kv.get("policy", "full")
    if policy not in POLICIES:
        raise BadRequest(422, f"kv.policy: one of {list(POLICIES)}, got {policy!r}")
    allocation = kv.get("allocation", "uniform")
    if allocation not in ALLOCATIONS:
        raise BadRequest(422, f"kv.allocation: one of {list(ALLOCATIONS)}, got {allocation!r}")
    budget = kv.get("budget")
    if policy == "full" and (budget is not None or allocation != "uniform"):
        raise BadRequest(422, "kv: the full cache takes no budget or allocation")
    if policy != "full":
        from tasks.squeeze_attention import policy_min_budget

        low = policy_min_budget(policy)
        if not isinstance(budget, int) or isinstance(budget, bool) or budget < low:
            raise BadRequest(422, f"kv.budget: {policy} needs an integer budget >= {low} entries per layer, "
                                  f"got {budget!r}")
    return {"prompt": prompt, "max_new_tokens": new, "temperature": temperature, "top_k": top_k,
            "seed": _field(payload, "seed", int, 0), "policy": policy, "budget": budget, "allocation": allocation}


api = FastAPI(title="squeezelab text generation",
              description="Greedy or sampled generation from a packed (quantized) LM logged to MLflow")


@serve.deployment(max_ongoing_requests=16)
@serve.ingress(api)
class TextGenerator:
    def __init__(self, model_uri: str, tracking_uri: str | None = None, max_prompt_tokens: int = 1024,
                 max_new_tokens: int = 256, threads: int = 1):
        import torch

        from pipelines.core.tracking import download_model
        from tasks.common.model_io import artifact_bytes
        from tasks.llm import ByteTokenizer
        from tasks.packed_lm import load_packed_lm

        if tracking_uri:
            os.environ["MLFLOW_TRACKING_URI"] = tracking_uri
        torch.set_num_threads(threads)
        local = download_model(model_uri)
        self.model, tokenizer, spec = load_packed_lm(local)
        self.tokenizer = ByteTokenizer() if spec.get("byte_level") or tokenizer is None else tokenizer
        self.num_layers = self.model.config.get_text_config(decoder=True).num_hidden_layers
        self.max_prompt_tokens, self.max_new_tokens = max_prompt_tokens, max_new_tokens
        self.lock = threading.Lock()  # one generation at a time: SqueezeAttention's hooks are per model
        q = spec.get("quantization", {})
        self.info = {"model_uri": model_uri, "model": spec.get("base"), "bytes": artifact_bytes(local),
                     "method": q.get("method"), "bits": q.get("bits"), "effective_bits": q.get("effective_bits"),
                     "max_prompt_tokens": max_prompt_tokens, "max_new_tokens": max_new_tokens,
                     "kv_policies": list(POLICIES), "kv_allocations": list(ALLOCATIONS)}

    def _kv_policy(self, req: dict, ids):
        from tasks import squeeze_attention as sa

        if req["policy"] == "full":
            return None, None
        budgets = req["budget"]
        if req["allocation"] == "squeeze":
            budgets = sa.squeeze_budgets(self.model, ids[None], req["budget"], sa.DEFAULT_P,
                                         sa.policy_min_budget(req["policy"]), len(ids) + req["max_new_tokens"] - 1)
        return sa.budget_policy(req["policy"], budgets), budgets

    def _generate(self, req: dict, ids) -> dict[str, Any]:
        from tasks.llm import generate

        with self.lock:
            policy, budgets = self._kv_policy(req, ids)
            eos = getattr(self.tokenizer, "eos_token_id", None)
            top_k = req["top_k"] and min(req["top_k"], self.model.config.vocab_size)  # a larger k is every token
            tokens, stats = generate(self.model, ids, req["max_new_tokens"], greedy=req["temperature"] == 0,
                                     temperature=req["temperature"] or 1.0, top_k=top_k, seed=req["seed"],
                                     kv_policy=policy, eos_token_id=eos)
        tokens = tokens.tolist()
        per_entry = stats["kv_bytes"] / max(1, sum(stats["kv_lengths"]))  # one token's K and V in one layer
        seen = len(ids) + len(tokens) - 1  # the last new token is never fed back
        return {"text": self.tokenizer.decode(tokens, skip_special_tokens=True), "tokens": len(tokens),
                "prompt_tokens": len(ids), "finished": "eos" if len(tokens) < req["max_new_tokens"] else "length",
                "kv": {"policy": req["policy"], "allocation": req["allocation"], "budgets": budgets,
                       "bytes": int(stats["kv_bytes"]), "bytes_full": round(per_entry * self.num_layers * seen)},
                "tokens_per_s": round(stats["tokens_per_s"], 2)}

    @api.get("/healthz")
    async def healthz(self) -> dict[str, str]:
        return {"status": "ok"}

    @api.get("/info")
    async def model_info(self) -> dict[str, Any]:
        return self.info

    @api.post("/generate")
    async def generate_text(self, request: Request):
        import torch

        t0 = time.perf_counter()
        try:
            req = parse_generate(await request.body(), self.max_new_tokens)
            ids = torch.as_tensor(self.tokenizer(req["prompt"], add_special_tokens=False)["input_ids"])
            if len(ids) > self.max_prompt_tokens:
                raise BadRequest(413, f"prompt: {len(ids)} tokens exceed the limit of {self.max_prompt_tokens}")
            if len(ids) < 1:
                raise BadRequest(422, "prompt: encodes to no tokens")
        except BadRequest as exc:
            return JSONResponse({"error": exc.reason}, status_code=exc.status)
        out = await asyncio.to_thread(self._generate, req, ids)
        return out | {"model": self.info["model_uri"], "server_ms": round(1000 * (time.perf_counter() - t0), 3)}
