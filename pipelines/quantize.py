"""Quantize a causal LM's linear layers (SqueezeLLM or a baseline), write the packed artifact, reload it and
log what it cost: perplexity next to the full-precision model's, effective bits and bytes on disk,
quantization time and generation speed.

    python -m pipelines.quantize --config pipelines/configs/quantize_smollm2.yaml
    python -m pipelines.quantize --config pipelines/configs/quantize_smollm2.yaml method=rtn bits=4
    python -m pipelines.quantize --config pipelines/configs/quantize_smollm2.yaml --smoke     # what CI runs
    ray job submit --working-dir . --runtime-env clusters/runtime_env.yaml \\
        -- python -m pipelines.quantize --config pipelines/configs/quantize_smollm2.yaml bits=3
    python -m pipelines.sweep --config pipelines/configs/claims/squeezellm_bits.yaml    # the bit-width frontier

Steps, in this process on ``threads`` CPUs (tasks/squeezellm.py, tasks/llm.py, tasks/packed_lm.py):
1. the base model (``model``): SmolLM2-135M-Instruct from the offline GGUF, or ``tiny_llama`` (random
   weights, byte-level: the smoke run);
2. its perplexity on ``eval`` windows (the reference) and its greedy generation speed on ``prompt``;
3. for ``method: squeezellm`` or ``sensitive_pct > 0``: the Fisher diagonal (per-window squared
   gradients) over ``calibration`` windows, a text the evaluation never sees;
4. every linear layer but the head (tied to the embeddings in SmolLM2) quantized to ``bits``:
   ``rtn`` (uniform per row, or per ``group_size`` columns), ``kmeans``, ``squeezellm`` (Fisher-weighted
   k-means) or ``random_weights`` (k-means weighted by random numbers: the negative control), plus the
   dense-and-sparse part (``outlier_pct`` % largest magnitudes, ``sensitive_pct`` % largest Fisher values);
5. the artifact written (packed layers, the rest in float16, config, tokenizer), read back into a fresh
   model, checked to compute exactly what the quantized model in memory computes, and evaluated: its
   perplexity, generation speed and sample text are what the run reports;
6. unless ``blackbox: null``, the packed model is also scored against the full-precision one from samples
   only (tasks/proper_losses.py: a black-box proper loss over next-token draws at held-out positions).

Effective bits count everything the packed layers store (codes, look-up tables, sparse part) from the
bytes written; ``artifact/bytes`` is the whole directory on disk. Logged as the run's model, the artifact
is what ``pipelines.serve`` loads for text generation (``register_as`` names it in the registry).
SmolLM2's weights were stored at 4 bits (Q4_1) in the only offline copy, so its 4-bit results flatter
every method; tasks/llm.py says more.
"""
from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Any, ClassVar, Literal

from pydantic import Field, model_validator

from pipelines.core import tracking
from pipelines.core.config import JobConfig, Section, run_cli
from pipelines.core.language import BaseLM, CorpusConfig, corpus_windows, load_base, model_label


class BlackBoxConfig(Section):
    # the quantized model's next-token distributions vs the full-precision model's, from draws only, at
    # positions spread over the eval windows (chosen by the seed: the same for every method at a seed)
    contexts: int = Field(128, ge=2)  # positions scored (the rounds)
    m: int = Field(32, ge=2)          # draws from the quantized model at each position
    k: int = Field(32, ge=1)          # draws from the full-precision model (the target) at each position


class QuantizeConfig(JobConfig):
    experiment: str = "llm-quantization"
    run_name: str | None = None
    model: BaseLM = "smollm2"
    method: Literal["rtn", "kmeans", "squeezellm", "random_weights"] = "squeezellm"
    bits: int = Field(3, ge=1, le=8)
    group_size: int | None = Field(None, ge=1)  # rtn/k-means per group of input columns; None: one table per row
    outlier_pct: float = Field(0.0, ge=0, le=100)    # percent of weights kept in the sparse part by magnitude
    sensitive_pct: float = Field(0.0, ge=0, le=100)  # ... and by Fisher value (the paper: 0.45 and 0.05)
    # Fisher from a text the evaluation never sees (the paper: 128 C4 windows of 512; the prototype: 16)
    calibration: CorpusConfig = Field(default_factory=lambda: CorpusConfig(text="austen:emma", windows=16))
    eval: CorpusConfig = Field(default_factory=CorpusConfig)
    prompt: str = "The capital of Italy is"
    max_new_tokens: int = Field(32, ge=1)
    blackbox: BlackBoxConfig | None = Field(default_factory=BlackBoxConfig)  # null: skip the black-box loss
    seed: int = 0  # which windows of each text (block ``seed``), the random-weights control's draws
    threads: int = Field(2, ge=1)  # for perplexity, Fisher and generation (the k-means runs on one)
    log_model: bool = True  # log the artifact (SmolLM2 at 3 bits: ~100 MB) as the run's model
    register_as: str | None = None  # register the artifact under this name, alias "current"

    SMOKE: ClassVar[dict[str, Any]] = {
        "model": "tiny_llama", "calibration.windows": 2, "calibration.window": 64, "eval.windows": 2,
        "eval.window": 64, "max_new_tokens": 8, "register_as": None}

    @model_validator(mode="after")
    def _consistent(self) -> "QuantizeConfig":
        if self.register_as and not self.log_model:
            raise ValueError("register_as: needs log_model: true (there is no artifact to register)")
        return self

    @property
    def needs_fisher(self) -> bool:
        return self.method == "squeezellm" or self.sensitive_pct > 0


def _same_outputs(a, b, window) -> None:
    """The reloaded artifact must compute what the quantized model in memory computes, bit for bit."""
    import torch

    with torch.inference_mode():
        la, lb = a(input_ids=window[None]).logits, b(input_ids=window[None]).logits
    if not torch.equal(la, lb):
        raise RuntimeError(f"the reloaded artifact's logits differ from the quantized model's "
                           f"(max |diff| {float((la - lb).abs().max()):.3g})")


def _blackbox_positions(bb: BlackBoxConfig, seed: int, windows: int, window: int) -> list[tuple[int, int]]:
    """(window, token) pairs: round-robin over the windows, the token uniform over 1..window-2."""
    import numpy as np

    tokens = np.random.default_rng(seed).integers(1, window - 1, bb.contexts)
    return [(i % windows, int(t)) for i, t in enumerate(tokens)]


def _blackbox_metrics(quantized, reference, bb: BlackBoxConfig, seed: int) -> dict[str, float]:
    """The black-box proper loss of Kimpara et al. (tasks/proper_losses.py: the power score with d = 2,
    i.e. Brier, from m model draws and k target draws per position) of the quantized model against the
    full-precision one, and of the full-precision model against itself: the floor, scored on the same
    target draws, so the per-position difference is paired. That gap is unbiased for the mean squared
    distance between the two next-token distributions, which ``sq_distance_exact`` gives from the
    probabilities themselves (a check on the estimate: no black box there)."""
    import math

    import numpy as np

    from tasks import proper_losses as pl

    target = pl.conditional_sampler(reference)
    kw = {"rounds": len(reference), "m": bb.m, "k": bb.k, "rng": seed}
    small = pl.evaluate(pl.conditional_sampler(quantized), target, "power", **kw)
    floor = pl.evaluate(pl.conditional_sampler(reference), target, "power", **kw)
    gap = small.values - floor.values
    exact = float(((quantized.astype(np.float64) - reference) ** 2).sum(1).mean())
    return {"blackbox/power": small.mean, "blackbox/power_reference": floor.mean,
            "blackbox/power_gap": float(gap.mean()), "blackbox/power_gap_se": float(gap.std(ddof=1) / math.sqrt(len(gap))), "blackbox/sq_distance_exact": exact}


def main(cfg: QuantizeConfig, parent_run_id: str | None = None, report=None) -> str:
    import mlflow
    import torch

    from tasks import llm
    from tasks import squeezellm as sq
    from tasks.common.model_io import artifact_bytes
    from tasks.packed_lm import load_packed_lm, round_unpacked_, save_packed_lm

    tracking.tracking_uri()  # fails early (exit 2) when a submitted job has no store
    torch.set_num_threads(cfg.threads)
    t0 = time.perf_counter()
    model, tokenizer = load_base(cfg.model)
    load_s = time.perf_counter() - t0
    # seed s takes the s-th block of consecutive windows of each text: seeds differ in what the Fisher
    # sees and what is scored, and every method at a seed is scored on the same windows (paired)
    evals = corpus_windows(cfg.eval, tokenizer, "eval", skip=cfg.seed * cfg.eval.windows)
    calib = (corpus_windows(cfg.calibration, tokenizer, "calibration", skip=cfg.seed * cfg.calibration.windows)
             if cfg.needs_fisher else None)
    prompt = torch.as_tensor(tokenizer(cfg.prompt, add_special_tokens=False)["input_ids"], dtype=torch.long)
    params = {id(p): p for p in model.parameters()}.values()  # tied weights once
    numel = sum(p.numel() for p in params)
    name = cfg.run_name or time.strftime(f"quantize-{model_label(cfg.model)}-{cfg.method}-{cfg.bits}b-%Y%m%d-%H%M%S")
    tags = {"model": cfg.model, "method": cfg.method, "bits": str(cfg.bits), "eval.text": cfg.eval.text,
            "model.random_weights": str(cfg.model == "tiny_llama")}
    with tracking.job_run(cfg, "quantize", cfg.experiment, name, parent_run_id=parent_run_id, tags=tags) as run:
        print(f"[quantize] {name}: {cfg.model} ({numel / 1e6:.1f}M parameters, loaded in {load_s:.0f} s), "
              f"{cfg.method} at {cfg.bits} bits; MLflow run {run.info.run_id}", flush=True)
        t0 = time.perf_counter()
        ref_ppl = llm.perplexity(model, evals)
        print(f"[quantize] reference perplexity {ref_ppl:.3f} on {cfg.eval.windows} x {cfg.eval.window} tokens of "
              f"{cfg.eval.text} ({time.perf_counter() - t0:.0f} s)", flush=True)
        _, ref_gen = llm.generate(model, prompt, cfg.max_new_tokens)
        positions = (_blackbox_positions(cfg.blackbox, cfg.seed, len(evals), evals.shape[1])
                     if cfg.blackbox else None)
        ref_probs = llm.next_token_probs(model, evals, positions) if positions else None

        fisher, fisher_s = None, 0.0
        if cfg.needs_fisher:
            t0 = time.perf_counter()
            fisher = sq.fisher_diagonal(model, list(calib), lambda m, x: m(input_ids=x[None], labels=x[None]).loss)
            fisher_s = time.perf_counter() - t0
            print(f"[quantize] Fisher diagonal over {len(calib)} x {cfg.calibration.window} tokens of "
                  f"{cfg.calibration.text}: {fisher_s:.0f} s", flush=True)
        # one thread: the k-means is hundreds of small tensor ops per layer, which a second thread slows
        # down as soon as anything else runs on the box (measured: up to 5x on 2 shared cores)
        torch.set_num_threads(1)
        t0 = time.perf_counter()
        stats = sq.quantize_model(model, fisher, bits=cfg.bits, method=cfg.method, group_size=cfg.group_size,
                                  outlier_pct=cfg.outlier_pct, sensitive_pct=cfg.sensitive_pct, seed=cfg.seed)
        quantize_s = time.perf_counter() - t0
        torch.set_num_threads(cfg.threads)
        total = stats["total"]
        round_unpacked_(model)
        print(f"[quantize] {total['layers']} layers ({total['numel'] / 1e6:.1f}M weights) in {quantize_s:.0f} s: "
              f"{total['effective_bits']:.3f} effective bits", flush=True)
        del fisher

        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / "model"
            save_packed_lm(model, out, tokenizer, base=cfg.model, quantization={
                "method": cfg.method, "bits": cfg.bits, "group_size": cfg.group_size, "outlier_pct": cfg.outlier_pct,
                "sensitive_pct": cfg.sensitive_pct, "calibration": cfg.calibration.model_dump(),
                "effective_bits": total["effective_bits"]}, byte_level=isinstance(tokenizer, llm.ByteTokenizer))
            size = artifact_bytes(out)
            back, _, _ = load_packed_lm(out, tokenizer=False)
            _same_outputs(model, back, evals[0])
            del model
            ppl = llm.perplexity(back, evals)
            tokens, gen = llm.generate(back, prompt, cfg.max_new_tokens)
            sample = tokenizer.decode(tokens.tolist(), skip_special_tokens=True)
            errors = [s["rel_error"] for s in stats["layers"].values()]
            metrics = {
                "reference/perplexity": ref_ppl, "quantized/perplexity": ppl,
                "quantized/ppl_gap": ppl / ref_ppl - 1,  # relative: 0.05 is 5% above full precision
                "bits/effective": total["effective_bits"], "bits/effective_model": 8 * size / numel,
                "artifact/bytes": size, "reference/bytes_fp16": 2 * numel, "reference/bytes_fp32": 4 * numel,
                "quantized/layers": total["layers"], "quantized/weights": total["numel"],
                "quantized/rel_error_mean": sum(errors) / len(errors),
                "time/fisher_s": fisher_s, "time/quantize_s": quantize_s,
                "generation/reference_tokens_per_s": ref_gen["tokens_per_s"],
                "generation/tokens_per_s": gen["tokens_per_s"]}
            if positions:
                metrics |= _blackbox_metrics(llm.next_token_probs(back, evals, positions), ref_probs,
                                             cfg.blackbox, cfg.seed)
            mlflow.log_metrics(metrics)
            mlflow.log_dict(stats, "quantization.json")
            mlflow.log_text(f"{cfg.prompt}{sample}\n", "sample.txt")
            if cfg.log_model:
                mlflow.log_artifacts(str(out), tracking.MODEL_DIR)
        print(f"[quantize] perplexity {ppl:.3f} vs {ref_ppl:.3f} ({metrics['quantized/ppl_gap']:+.1%}) at "
              f"{total['effective_bits']:.3f} effective bits; artifact {size:,} bytes "
              f"({2 * numel / size:.1f}x smaller than float16); {gen['tokens_per_s']:.1f} tokens/s "
              f"(full precision {ref_gen['tokens_per_s']:.1f})", flush=True)
        if positions:
            print(f"[quantize] black-box Brier loss (draws only, {cfg.blackbox.contexts} positions x "
                  f"{cfg.blackbox.m} + {cfg.blackbox.k} draws): {metrics['blackbox/power']:.4f} vs "
                  f"{metrics['blackbox/power_reference']:.4f} for full precision, gap "
                  f"{metrics['blackbox/power_gap']:.4f} +- {metrics['blackbox/power_gap_se']:.4f} (exact squared "
                  f"distance {metrics['blackbox/sq_distance_exact']:.4f})", flush=True)
        print(f"[quantize] sample: {cfg.prompt!r} -> {sample!r}", flush=True)
        if report:
            report(metrics)
    return tracking.finish("quantize", run.info.run_id, cfg.register_as)


if __name__ == "__main__":
    run_cli(QuantizeConfig, main)
