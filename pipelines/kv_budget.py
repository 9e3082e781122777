"""Score a causal LM with a compressed KV cache: next-token loss at a total KV budget, with the budget spread
evenly over the layers, by SqueezeAttention's layer importance, or at random (the control), under one
eviction policy.

    python -m pipelines.kv_budget --config pipelines/configs/kv_budget_smollm2.yaml
    python -m pipelines.kv_budget --config pipelines/configs/kv_budget_smollm2.yaml allocation=uniform policy=h2o
    python -m pipelines.kv_budget --config pipelines/configs/kv_budget_smollm2.yaml --smoke       # what CI runs
    ray job submit --working-dir . --runtime-env clusters/runtime_env.yaml \\
        -- python -m pipelines.kv_budget --config pipelines/configs/kv_budget_smollm2.yaml
    python -m pipelines.sweep --config pipelines/configs/claims/squeeze_attention.yaml     # the claim

For each text window (tasks/squeeze_attention.py ``kv_budget_loss``): the first ``prompt`` tokens are
prefilled with full attention, then the rest of the window is fed one token at a time (teacher forcing:
every allocation and policy is scored on the same tokens) with the cache pruned to the per-layer budgets
after every step. The uniform budget per layer is ``budget_fraction`` x the window length; SqueezeAttention
moves entries from the layers whose hidden state attention changes least (cosine similarity over the
prompt, KMeans(3)) to the others, at the same total; the random control shuffles those same budgets over
the layers. Logged: the loss and perplexity over the fed part, the same with the full cache (one forward
pass), the gap between them, the KV bytes kept against the full cache's, and the budgets per layer.
"""
from __future__ import annotations

import time
from typing import Any, ClassVar, Literal

from pydantic import Field

from pipelines.core import tracking
from pipelines.core.config import ConfigError, JobConfig, run_cli
from pipelines.core.language import BaseLM, CorpusConfig, corpus_windows, load_base, model_label


class KVBudgetConfig(JobConfig):
    experiment: str = "kv-budgets"
    run_name: str | None = None
    model: BaseLM = "smollm2"
    policy: Literal["sliding_window", "streaming_llm", "h2o"] = "streaming_llm"  # which entries a layer keeps
    allocation: Literal["uniform", "squeeze", "random"] = "squeeze"  # how many each layer keeps
    # uniform budget per layer as a fraction of the window (the paper: of the context); the total over the
    # layers is the same for every allocation
    budget_fraction: float = Field(0.2, gt=0, le=1)
    p: float = Field(0.625, gt=0, le=1)  # the least important group's budget / the uniform budget (tasks docstring)
    sinks: int = Field(4, ge=0)          # StreamingLLM's attention sinks (the official start_size)
    text: CorpusConfig = Field(default_factory=lambda: CorpusConfig(windows=4))
    prompt: int = Field(256, ge=1)       # tokens prefilled with full attention; the rest is scored
    seed: int = 0  # which windows (block ``seed`` of the text), the random control's shuffle
    threads: int = Field(2, ge=1)

    SMOKE: ClassVar[dict[str, Any]] = {"model": "tiny_llama", "text.windows": 2, "text.window": 48, "prompt": 24}


def _full_cache_nll(model, windows, prompt: int) -> float:
    """Mean next-token NLL of tokens ``prompt..T-1`` with nothing evicted: one forward pass per window."""
    import torch
    import torch.nn.functional as F

    with torch.inference_mode():
        logits = model(input_ids=windows, use_cache=False).logits[:, prompt - 1:-1].float()
        nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), windows[:, prompt:].reshape(-1))
    return float(nll)


def main(cfg: KVBudgetConfig, parent_run_id: str | None = None, report=None) -> str:
    import math

    import mlflow
    import torch

    from tasks import squeeze_attention as sa

    tracking.tracking_uri()  # fails early (exit 2) when a submitted job has no store
    torch.set_num_threads(cfg.threads)
    if cfg.prompt >= cfg.text.window:
        raise ConfigError(f"prompt: {cfg.prompt} tokens leave nothing to score in windows of {cfg.text.window}")
    # H2O reads attention weights, which only eager attention returns
    model, tokenizer = load_base(cfg.model, "eager" if cfg.policy == "h2o" else None)
    windows = corpus_windows(cfg.text, tokenizer, "text", skip=cfg.seed * cfg.text.windows)
    num_layers = model.config.get_text_config(decoder=True).num_hidden_layers
    low = sa.policy_min_budget(cfg.policy, cfg.sinks)
    budget = sa.fraction_budget(cfg.budget_fraction, cfg.text.window, low)
    if cfg.allocation == "uniform":
        budgets = budget
    elif cfg.allocation == "squeeze":
        def budgets(ids):  # no layer is given more than the window - 1 entries it can ever hold
            return sa.squeeze_budgets(model, ids, budget, cfg.p, low, cfg.text.window - 1)
    else:
        def budgets(ids):
            return sa.random_budgets(sa.squeeze_budgets(model, ids, budget, cfg.p, low, cfg.text.window - 1), cfg.seed)
    name = cfg.run_name or time.strftime(f"kv-{model_label(cfg.model)}-{cfg.policy}-{cfg.allocation}-%Y%m%d-%H%M%S")
    tags = {"model": cfg.model, "policy": cfg.policy, "allocation": cfg.allocation, "text": cfg.text.text,
            "model.random_weights": str(cfg.model == "tiny_llama")}
    with tracking.job_run(cfg, "kv_budget", cfg.experiment, name, parent_run_id=parent_run_id, tags=tags) as run:
        print(f"[kv] {name}: {cfg.model}, {cfg.policy} with {cfg.allocation} budgets, {budget} of "
              f"{cfg.text.window} entries per layer on average ({cfg.budget_fraction:.0%}), {cfg.text.windows} "
              f"windows of {cfg.text.text}; MLflow run {run.info.run_id}", flush=True)
        full = _full_cache_nll(model, windows, cfg.prompt)
        t0 = time.perf_counter()
        out = sa.kv_budget_loss(model, windows, cfg.prompt, budgets, cfg.policy, sinks=cfg.sinks)
        seconds = time.perf_counter() - t0
        scored = windows.numel() - windows.shape[0] * cfg.prompt
        metrics = {"kv/nll": out["nll"], "kv/perplexity": math.exp(out["nll"]), "full/nll": full,
                   "full/perplexity": math.exp(full), "kv/nll_gap": out["nll"] - full,
                   "kv/bytes": out["kv_bytes"], "kv/bytes_full": out["kv_bytes_full"],
                   "kv/kept_fraction": out["kv_bytes"] / out["kv_bytes_full"],
                   "kv/budget_per_layer": budget, "time/seconds": seconds, "time/tokens_per_s": scored / seconds}
        mlflow.log_metrics(metrics)
        per_window = [b if isinstance(b, list) else [b] * num_layers for b in out["budgets"]]
        mlflow.log_dict({"budgets": per_window, "nll_per_window": out["nll_per_window"].tolist(),
                         "kv_lengths_end": out["kv_lengths"]}, "kv_budgets.json")
        print(f"[kv] next-token loss {out['nll']:.4f} vs {full:.4f} with the full cache ({metrics['kv/nll_gap']:+.4f}); "
              f"KV kept {out['kv_bytes']:,.0f} of {out['kv_bytes_full']:,} bytes ({metrics['kv/kept_fraction']:.1%}); "
              f"{seconds:.0f} s", flush=True)
        print(f"[kv] budgets per layer (first window): {per_window[0]}", flush=True)
        if report:
            report(metrics)
    print(f"[kv] done: MLflow run {run.info.run_id}", flush=True)
    return run.info.run_id


if __name__ == "__main__":
    run_cli(KVBudgetConfig, main)
