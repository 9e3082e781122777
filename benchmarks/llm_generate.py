"""Generation speed and memory of SmolLM2-135M: full precision vs packed 3/4-bit vs a compressed KV cache,
plus the wall time of quantizing the whole model, in one run.

    python benchmarks/llm_generate.py                      # what `make bench-llm` runs (~10 min on 2 cores)
    python benchmarks/llm_generate.py --new-tokens 16 --bits 3 --report /tmp/llm.md          # a quick look

First the packed artifacts are built in this process (tasks/squeezellm.py: the Fisher pass over 16 x 512
tokens of Emma, then SqueezeLLM with the 0.45% / 0.05% sparse part at each of ``--bits``), timing the
Fisher pass and the quantization. Then each contender runs in a fresh process of its own, one after the
other, so that its peak memory (the kernel's peak RSS of that process: model load included) is its own:

- ``fp32``: the model as loaded (float32, ~540 MB of weights);
- ``packed-<b>bit``: the artifact as ``pipelines.serve`` would load it (tasks/packed_lm.py), each layer
  dequantized once and cached (QuantLinear's default: speed of a float32 layer, RAM above it);
- ``packed-<b>bit-lean``: the same without the cache: every forward unpacks every layer (RAM at the
  packed size plus one layer, time per token far higher);
- ``fp32-kv<f>`` and ``packed-<b>bit-kv<f>``: StreamingLLM (4 sinks) keeping ``--kv-fraction`` of the
  context per layer.

Each contender greedily decodes ``--new-tokens`` tokens after a ``--prompt``-token prompt (the start of
Persuasion); reported: prefill s, decode tokens/s, KV bytes at the end, bytes on disk and peak RSS.
Writes docs/results/llm_generate.md (``--report``). The packed contenders run on the same kernels as
float32 (there is no look-up-table matmul here): the win on a CPU is bytes on disk and, with ``lean``,
RAM, not speed. ``load_packed_lm`` builds the architecture with its parameters on the meta device, so no
float32 copy of the weights is ever allocated for a packed contender (the float16 embedding is widened to
float32 on load; the fp32 contender's peak includes reading the GGUF file).
"""
from __future__ import annotations

import argparse
import json
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
ROOT = Path(__file__).resolve().parents[1]
MB = 2 ** 20


def build(workdir: Path, bits: list[int], threads: int) -> dict:
    """The packed artifacts, one per bit width; returns the build times."""
    import torch

    from pipelines.core.language import CorpusConfig, corpus_windows
    from tasks import llm
    from tasks import squeezellm as sq
    from tasks.packed_lm import round_unpacked_, save_packed_lm

    torch.set_num_threads(threads)
    times = {}
    for b in bits:
        model, tok = llm.load_smollm2()
        calib = corpus_windows(CorpusConfig(text="austen:emma", windows=16), tok, "calibration")
        t0 = time.perf_counter()
        fisher = sq.fisher_diagonal(model, list(calib), lambda m, x: m(input_ids=x[None], labels=x[None]).loss)
        times[f"fisher_s_{b}"] = time.perf_counter() - t0
        torch.set_num_threads(1)  # as pipelines.quantize: the k-means on one thread
        t0 = time.perf_counter()
        stats = sq.quantize_model(model, fisher, bits=b, method="squeezellm", outlier_pct=0.45, sensitive_pct=0.05)
        times[f"quantize_s_{b}"] = time.perf_counter() - t0
        times[f"effective_bits_{b}"] = stats["total"]["effective_bits"]
        torch.set_num_threads(threads)
        round_unpacked_(model)
        save_packed_lm(model, workdir / f"packed-{b}bit", tok, base="smollm2", quantization={"bits": b})
        print(f"[bench] {b}-bit: Fisher {times[f'fisher_s_{b}']:.0f} s, quantization {times[f'quantize_s_{b}']:.0f} s, "
              f"{stats['total']['effective_bits']:.3f} effective bits", flush=True)
        del model, fisher
    return times


def _vm_hwm() -> int:
    """This process' peak RSS in bytes (VmHWM: per address space, so it starts afresh at exec, unlike
    ru_maxrss, which Linux carries over from the parent that forked us)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def child(spec: dict) -> None:
    """One contender, in its own process (``--child``): load, generate, print one JSON line."""
    import torch

    from tasks import llm
    from tasks.common.model_io import artifact_bytes
    from tasks.packed_lm import load_packed_lm
    from tasks.squeezellm import QuantLinear

    torch.set_num_threads(spec["threads"])
    t0 = time.perf_counter()
    if spec["artifact"]:
        model, tok, _ = load_packed_lm(spec["artifact"])
        if spec["lean"]:
            for m in model.modules():
                if isinstance(m, QuantLinear):
                    m.cache = False
        size = artifact_bytes(spec["artifact"])
    else:
        model, tok = llm.load_smollm2()
        size = 4 * sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
    load_s = time.perf_counter() - t0
    ids = tok(llm.austen_texts()["persuasion"], add_special_tokens=False, verbose=False)["input_ids"][: spec["prompt"]]
    policy = None
    if spec["kv_fraction"]:
        window = max(8, int(spec["kv_fraction"] * (spec["prompt"] + spec["new_tokens"])) - 4)
        policy = llm.StreamingLLM(4, window)
    _, stats = llm.generate(model, torch.tensor(ids), spec["new_tokens"], kv_policy=policy)
    peak = _vm_hwm()
    print(json.dumps({"load_s": load_s, "bytes": size, "peak_rss": peak, "prefill_s": stats["prefill_s"],
                      "decode_tokens_per_s": stats["decode_tokens_per_s"], "kv_bytes": stats["kv_bytes"]}))


def contenders(workdir: Path, bits: list[int], kv: float) -> list[tuple[str, dict]]:
    out = [("fp32", {"artifact": None, "lean": False, "kv_fraction": 0.0}),
           (f"fp32-kv{kv:g}", {"artifact": None, "lean": False, "kv_fraction": kv})]
    for b in bits:
        art = str(workdir / f"packed-{b}bit")
        out += [(f"packed-{b}bit", {"artifact": art, "lean": False, "kv_fraction": 0.0}),
                (f"packed-{b}bit-lean", {"artifact": art, "lean": True, "kv_fraction": 0.0}),
                (f"packed-{b}bit-kv{kv:g}", {"artifact": art, "lean": False, "kv_fraction": kv})]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bits", default="3,4", help="bit widths of the packed contenders")
    parser.add_argument("--prompt", type=int, default=512, help="prompt tokens")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--kv-fraction", type=float, default=0.2, help="StreamingLLM budget, of prompt + new")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--report", type=Path, default=ROOT / "docs" / "results" / "llm_generate.md")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(json.loads(args.child))
        return
    bits = [int(b) for b in args.bits.split(",")]
    started = time.strftime("%Y-%m-%d %H:%M")
    rows = []
    with tempfile.TemporaryDirectory(prefix="squeezelab-llm-bench-") as tmp:
        times = build(Path(tmp), bits, args.threads)
        for name, spec in contenders(Path(tmp), bits, args.kv_fraction):
            spec = {**spec, "prompt": args.prompt, "new_tokens": args.new_tokens, "threads": args.threads}
            proc = subprocess.run([sys.executable, __file__, "--child", json.dumps(spec)], cwd=ROOT,
                                  capture_output=True, text=True)
            if proc.returncode != 0:
                raise SystemExit(f"{name} failed:\n{proc.stderr[-3000:]}")
            res = json.loads(proc.stdout.strip().splitlines()[-1])
            rows.append((name, res))
            print(f"[bench] {name}: {res['decode_tokens_per_s']:.1f} tokens/s, prefill {res['prefill_s']:.1f} s, "
                  f"peak RSS {res['peak_rss'] / MB:,.0f} MiB, {res['bytes']:,} bytes, KV {res['kv_bytes']:,}", flush=True)
    base = dict(rows)["fp32"]
    lines = ["# Generation with SmolLM2-135M: full precision vs packed vs a compressed KV cache", "",
             f"Machine: {platform.processor() or platform.machine()}, {args.threads} threads; run {started}. "
             f"Command: `python benchmarks/llm_generate.py {' '.join(sys.argv[1:])}`.", "",
             f"Greedy decoding of {args.new_tokens} tokens after a {args.prompt}-token prompt (Persuasion). "
             "Each contender in a fresh process; peak RSS is that process' (model load included).", "",
             "| contender | bytes on disk / weights | peak RSS MiB | prefill s | decode tokens/s | vs fp32 | KV bytes at the end |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for name, r in rows:
        lines.append(f"| {name} | {r['bytes']:,} | {r['peak_rss'] / MB:,.0f} | {r['prefill_s']:.2f} | "
                     f"{r['decode_tokens_per_s']:.1f} | {r['decode_tokens_per_s'] / base['decode_tokens_per_s']:.2f}x | "
                     f"{r['kv_bytes']:,} |")
    lines += ["", "Quantizing the whole model (SqueezeLLM, 0.45% / 0.05% sparse; 210 linear layers, 106M weights): "
              + "; ".join(f"{b}-bit: Fisher {times[f'fisher_s_{b}']:.0f} s + quantization {times[f'quantize_s_{b}']:.0f} s, "
                          f"{times[f'effective_bits_{b}']:.3f} effective bits" for b in bits) + ".", "",
              "fp32's bytes are its weights' (4 per parameter, the tied embedding once); packed bytes are the "
              "artifact directory on disk (packed layers, the rest in float16, config, tokenizer).", ""]
    args.report.parent.mkdir(parents=True, exist_ok=True)
    args.report.write_text("\n".join(lines))
    print(f"[bench] report: {args.report}")
    lean = [r for n, r in rows if n.endswith("-lean")]
    if lean:
        print(f"[bench] lean packed peak RSS / fp32: {lean[0]['peak_rss'] / base['peak_rss']:.2f}x")


if __name__ == "__main__":
    main()
