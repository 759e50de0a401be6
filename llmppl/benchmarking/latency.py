"""``llmppl bench latency``: Power-SMC against plain decoding, same backend, same tokens.

Measures, in one process: (a) plain decoding of one sequence, (b) plain batched
decoding of N sequences, (c) Power-SMC with N particles (α = 4, proposal τ = 1/4),
each for exactly ``T`` new tokens (EOS is masked in every sampler so all runs decode
the same number of tokens).  Reports medians over repetitions, ``ratio`` = (c)/(a)
and ``ratio_same_batch`` = (c)/(b) (SMC's own overhead over batched decoding).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
from typing import Any

import torch

from ..inference.common import Stopwatch, make_generator
from ..inference.proposals import ProposalContext, Tempered

ALPHA = 4.0


class _TemperedNoEOS(Tempered):
    """``q ∝ p^{1/τ}`` with EOS masked: every particle decodes exactly T tokens (timing only)."""

    def __init__(self, tau: float, eos: int) -> None:
        super().__init__(tau)
        self.eos = eos

    def log_probs(self, ctx: ProposalContext) -> torch.Tensor:
        lp = ctx.batch.base_logprobs.double() / self.tau
        lp[:, self.eos] = -torch.inf
        return torch.log_softmax(lp, dim=-1)


def plain_decode(lm: Any, prompt_ids: list[int], n: int, T: int, seed: int) -> float:
    """Seconds to sample ``T`` tokens for ``n`` rows at temperature 1/α (EOS masked)."""
    gen = make_generator(seed, lm.device)
    prop = _TemperedNoEOS(1.0 / ALPHA, lm.eos_token_id)
    with Stopwatch(lm.device) as w:
        state = lm.start(prompt_ids, n)
        for _ in range(T):
            lp = state.logprobs()
            log_q = prop.log_probs(ProposalContext(None, _Batch(lp)))
            state.extend(prop.sample(log_q, gen))
    return w.seconds


class _Batch:
    def __init__(self, lp: torch.Tensor) -> None:
        self.base_logprobs = lp


def smc_decode(lm: Any, prompt_ids: list[int], n: int, T: int, seed: int) -> tuple[float, Any]:
    import llmppl as pp

    smc = pp.SMC(n, proposal=_TemperedNoEOS(1.0 / ALPHA, lm.eos_token_id))
    target = pp.Target(lm, pp.Power(ALPHA))
    with Stopwatch(lm.device) as w:
        res = smc.run(target, prompt_ids, T, seed=seed)
    return w.seconds, res


def machine_info(device: str) -> dict[str, Any]:
    info = {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(), "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
            "python": sys.version.split()[0], "device": device}
    if device.startswith("cuda") and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    try:
        info["load_average"] = os.getloadavg()
    except OSError:
        pass
    return info


def run_latency(model: str | None, particles: int, max_new_tokens: int, device: str, reps: int,
                prompt: str = "Write a short poem about the sea.", seed: int = 0,
                backend: str = "hf") -> dict[str, Any]:
    """The benchmark itself; returns the JSON-ready dict."""
    from ..models import load_model

    if particles < 1 or max_new_tokens < 1 or reps < 1:
        raise ValueError("--particles, --max-new-tokens and --reps must be >= 1")
    lm = load_model(model, device=device, backend=backend)
    chat = getattr(lm.tokenizer, "chat_template", None) is not None
    ids = lm.encode_prompt(prompt, chat=chat)
    T, N = max_new_tokens, particles
    plain_decode(lm, ids, N, min(T, 4), seed)          # warm-up (allocator, kernels)
    times: dict[str, list[float]] = {"plain_1": [], "plain_batch": [], "smc": []}
    resamplings = []
    for r in range(reps):   # interleaved, so drifting machine load hits all three alike
        times["plain_1"].append(plain_decode(lm, ids, 1, T, seed + r))
        times["plain_batch"].append(plain_decode(lm, ids, N, T, seed + r))
        sec, res = smc_decode(lm, ids, N, T, seed + r)
        times["smc"].append(sec)
        resamplings.append(res.stats["resampling_count"])
        if res.stats["tokens_sampled"] != N * T:
            raise RuntimeError("SMC did not decode N·T tokens; the timing would be unfair")
    med = {k: statistics.median(v) for k, v in times.items()}
    return {
        "benchmark": "latency", "model": lm.name, "backend": backend, "particles": N, "max_new_tokens": T, "reps": reps,
        "alpha": ALPHA, "proposal_tau": 1.0 / ALPHA,
        "seconds": times, "median_seconds": med,
        "per_step_ms": {k: 1000.0 * v / T for k, v in med.items()},
        "ratio": med["smc"] / med["plain_1"],
        "ratio_same_batch": med["smc"] / med["plain_batch"],
        "resampling_count": resamplings,
        "machine": machine_info(str(lm.device)),
    }


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help="model spec (default: the bundled SmolLM2-135M-Instruct)")
    p.add_argument("--particles", type=int, default=8)
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--backend", choices=["hf", "llamacpp"], default="hf",
                   help="inference backend: transformers (hf) or llama.cpp for GGUF files")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--json", default=None, help="write the results here")


def run(args: argparse.Namespace) -> int:
    out = run_latency(args.model, args.particles, args.max_new_tokens, args.device, args.reps,
                      backend=args.backend)
    text = json.dumps(out, indent=2)
    print(text)
    if args.json:
        with open(args.json, "w") as f:
            f.write(text + "\n")
    return 0
