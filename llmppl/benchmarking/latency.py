"""``llmppl bench latency``: the engines users call, timed against each other in one process.

For ``P`` prompts × ``N`` particles, each row decoding exactly ``T`` tokens (EOS masked),
interleaved over repetitions so drifting machine load hits every run alike:

* ``plain_1``: ``Plain(1).run`` — one sequence;
* ``plain_batch``: ``Plain(N).run_batch`` over the P prompts — plain decoding of the same rows;
* ``smc_batch``: ``pp.SMC(N).run_batch`` (Power-SMC, α = 4, ``q ∝ p^4``, ESS-triggered
  resampling) over the P prompts;
* ``smc_sequential``: ``pp.SMC(N).run`` on each prompt in turn.

With ``compare`` a second backend (``--backend vllm`` compares with ``hf`` by default) runs the
same engines on the same model in the same interleaved repetitions.

Ratios: ``smc_over_plain_same_rows`` = smc_batch / plain_batch (SMC's own overhead),
``batch_speedup_tokens_per_s`` = smc_sequential / smc_batch (what batching prompts buys),
``smc_over_plain_1``.  ``host_syncs_per_step`` comes from the SMC results' stats.
"""

from __future__ import annotations

import argparse
import statistics
from typing import Any

from .engine import NoEOS, emit, machine_info, time_engine, time_sequential

ALPHA = 4.0
PROMPTS = ["Write a short poem about the sea.", "What is 17 times 23?", "Name three primary colors.",
           "Explain recursion to a child.", "List four planets.", "Translate 'good morning' to French.",
           "Give a synonym for happy.", "Why is the sky blue?", "Describe a cat in one sentence.",
           "What is the capital of Italy?", "Count from one to five.", "Suggest a name for a dog.",
           "What does a bee make?", "Say hello in Spanish.", "Name a prime number above 10.",
           "What colour is grass?"]


def engines(lm: Any, N: int, block: int = 1, draft: Any = None) -> dict[str, Any]:
    """Power-SMC (steps of ``block`` tokens; with a ``draft`` LM, its proposal is
    ``FromLM(draft, τ = 1/α)``: the draft draws each block, the target scores it with one
    ``extend``) and the plain decoder (``pp.baselines.Plain``'s engine), EOS masked."""
    import llmppl as pp
    from ..inference.baselines import Decoder
    from ..inference.common import eos_ids

    eos = eos_ids(lm)
    inner = pp.proposals.Temperature(1.0 / ALPHA) if draft is None else pp.proposals.FromLM(draft, tau=1.0 / ALPHA)
    smc = pp.SMC(N, proposal=NoEOS(inner, eos), step=pp.steps.Tokens(block))
    base = NoEOS(pp.proposals.Base(), eos)
    return {"smc": smc, "plain": Decoder("plain", base, N, {}), "plain_1": Decoder("plain", base, 1, {})}


def run_latency(model: str | None, particles: int, prompts: int, max_new_tokens: int, device: str,
                reps: int, backend: str = "hf", seed: int = 0, lm: Any = None,
                compare: str | None = None, block: int | None = None,
                sequential: bool = True, draft: str | None = None, draft_backend: str = "hf") -> dict[str, Any]:
    """The benchmark itself; returns the JSON-ready dict.  ``compare``: a second backend timed in
    the same interleaved repetitions (its results under ``"compare"``); ``block``: SMC steps of
    ``block`` tokens (``pp.steps.Tokens(block)``, weighed at block boundaries; default: the
    backend's ``lm.native_block``, 1 for transformers and llama.cpp, the KV block for vLLM);
    ``sequential=False`` skips ``smc_sequential`` (P whole runs: the slowest part at large P).
    ``draft``: a model spec for a draft LM (on ``draft_backend``) whose ``FromLM`` proposal SMC uses
    (speculative SMC: blocks drawn by the draft, scored by the target), timed against the target's
    own plain decoding of the same rows.
    An ``lm`` without a tokenizer takes any number of id prompts."""
    from ..models import load_model

    bad_block = block is not None and block < 1
    most = len(PROMPTS) if lm is None or lm.tokenizer is not None else 4096
    if particles < 1 or max_new_tokens < 1 or reps < 1 or bad_block or not 1 <= prompts <= most:
        raise ValueError(f"--particles, --max-new-tokens, --reps, --block must be >= 1 and --prompts in "
                         f"[1, {most}]")
    lms = {backend: lm or load_model(model, device=device, backend=backend)}
    if compare and compare != backend:
        lms[compare] = load_model(model, device=device, backend=compare)
    given, block = block, block or getattr(lms[backend], "native_block", 1)
    draft_lm = None if draft is None else load_model(draft, device=device, backend=draft_backend)
    runs = {name: _Timed(name, x, particles, prompts, max_new_tokens, block, seed, sequential, draft_lm)
            for name, x in lms.items()}
    for r in range(reps):                 # interleaved: every backend's runs in each repetition
        for t in runs.values():
            t.repetition(seed + r)
    out = runs[backend].summary(reps)
    out["command"] = (f"llmppl bench latency --backend {backend} --prompts {prompts} --particles {particles} "
                      f"--max-new-tokens {max_new_tokens} --reps {reps}" + (f" --block {block}" if given else "")
                      + (f" --compare {compare}" if compare and compare != backend else "")
                      + ("" if sequential else " --no-sequential")
                      + (f" --draft {draft} --draft-backend {draft_backend}" if draft else ""))
    if draft_lm is not None:
        out["draft"] = {"model": draft_lm.name, "backend": draft_backend, "proposal": "FromLM(draft, tau=1/alpha)"}
    if compare and compare != backend:
        out["compare"] = runs[compare].summary(reps)
        out["smc_batch_over_compare"] = out["median_seconds"]["smc_batch"] / out["compare"]["median_seconds"]["smc_batch"]
    out["machine"] = machine_info(str(lms[backend].device))
    return out


class _Timed:
    """One backend's engines, timed one repetition at a time (see the module docstring)."""

    def __init__(self, backend: str, lm: Any, N: int, prompts: int, T: int, block: int, seed: int,
                 sequential: bool = True, draft: Any = None) -> None:
        import llmppl as pp

        self.backend, self.lm, self.N, self.T, self.block, self.prompts = backend, lm, N, T, block, prompts
        self.sequential = sequential
        chat = getattr(lm.tokenizer, "chat_template", None) is not None
        self.target = pp.Target(lm, pp.Power(ALPHA), chat=chat)
        self.texts = (PROMPTS[:prompts] if lm.tokenizer is not None       # an LM without a tokenizer: id prompts
                      else [[i % lm.vocab_size, (3 * i + 1) % lm.vocab_size][: 1 + i % 2] for i in range(prompts)])
        self.e = engines(lm, N, block, draft)
        time_engine(self.e["smc"], self.target, self.texts, min(T, 4), seed)      # warm-up (allocator, kernels)
        self.times: dict[str, list[float]] = {"plain_1": [], "plain_batch": [], "smc_batch": []}
        if sequential:
            self.times["smc_sequential"] = []
        self.syncs: list[float] = []
        self.resamplings: list[list[int]] = []

    def repetition(self, seed: int) -> None:
        e, target, texts, T = self.e, self.target, self.texts, self.T
        self.times["plain_1"].append(time_engine(e["plain_1"], target, texts[:1], T, seed)[0])
        self.times["plain_batch"].append(time_engine(e["plain"], target, texts, T, seed)[0])
        sec, res = time_engine(e["smc"], target, texts, T, seed)
        self.times["smc_batch"].append(sec)
        self.syncs.append(res[0].stats["host_syncs"] / res[0].stats["n_steps"])
        self.resamplings.append([x.stats["resampling_count"] for x in res])
        if self.sequential:
            self.times["smc_sequential"].append(time_sequential(e["smc"], target, texts, T, seed)[0])

    def summary(self, reps: int) -> dict[str, Any]:
        med = {k: statistics.median(v) for k, v in self.times.items()}
        P, N, T = self.prompts, self.N, self.T
        seq = med.get("smc_sequential")
        return {
            "benchmark": "latency", "backend": self.backend,
            "model": self.lm.name, "prompts": P, "particles": N, "rows": P * N, "max_new_tokens": T,
            "reps": reps, "alpha": ALPHA, "smc_step": f"Tokens({self.block})",
            "seconds": self.times, "median_seconds": med,
            "per_step_ms": {k: 1000.0 * v / T for k, v in med.items()},
            "tokens_per_s": {"smc_batch": P * N * T / med["smc_batch"],
                             "smc_sequential": None if seq is None else P * N * T / seq},
            "smc_over_plain_same_rows": med["smc_batch"] / med["plain_batch"],
            "batch_speedup_tokens_per_s": None if seq is None else seq / med["smc_batch"],
            "smc_over_plain_1": med["smc_batch"] / med["plain_1"],
            "host_syncs_per_step": statistics.median(self.syncs),
            "resampling_count": self.resamplings,
        }


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help="model spec (default: the bundled SmolLM2-135M-Instruct)")
    p.add_argument("--backend", choices=["hf", "llamacpp", "vllm"], default="hf")
    p.add_argument("--compare", choices=["hf", "llamacpp", "vllm"], default=None,
                   help="a second backend timed in the same interleaved run (default: hf when --backend is not)")
    p.add_argument("--block", type=int, default=None,
                   help="SMC steps of this many tokens (pp.steps.Tokens; default: the backend's native block, "
                        "lm.native_block: 1 for hf and llamacpp, the KV block for vllm)")
    p.add_argument("--prompts", type=int, default=8)
    p.add_argument("--particles", type=int, default=8)
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--no-sequential", action="store_true", help="skip the P sequential SMC runs")
    p.add_argument("--draft", default=None,
                   help="a draft model spec: SMC proposes from FromLM(draft) in blocks (speculative SMC)")
    p.add_argument("--draft-backend", choices=["hf", "llamacpp", "vllm"], default="hf")
    p.add_argument("--json", default=None, help="write the results here")


def run(args: argparse.Namespace) -> int:
    compare = args.compare or ("hf" if args.backend != "hf" else None)
    return emit(run_latency(args.model, args.particles, args.prompts, args.max_new_tokens, args.device,
                            args.reps, backend=args.backend, compare=compare, block=args.block,
                            sequential=not args.no_sequential, draft=args.draft,
                            draft_backend=args.draft_backend), args.json)


def run_overhead(config: str, prompts: int, particles: int, max_new_tokens: int, reps: int,
                 device: str = "cpu", static_cache: bool = False, seed: int = 0,
                 blocks: tuple[int, ...] = (1,), lm: Any = None) -> dict[str, Any]:
    """ms/step of ``pp.SMC.run_batch`` over the model's own cached forward loop on a tiny
    random-weight model (the forward is almost free, so the engine's own cost shows), for SMC
    in steps of each of ``blocks`` tokens (``pp.steps.Tokens(k)``: weighed, ESS checked and
    resampled every ``k`` tokens), all timed in the same interleaved repetitions.

    ``smc_batch`` / ``smc_over_model_loop`` are the first block size's; every size is under
    ``by_block``.  ``lm``: an already built :class:`HFLM` to time instead (``config``, ``device``
    and ``static_cache`` then come from it)."""
    import torch

    import llmppl as pp
    from .engine import time_model_loop
    from .gpu import random_lm

    if not blocks or any(k < 1 for k in blocks) or len(set(blocks)) != len(blocks):
        raise ValueError(f"--blocks must list distinct sizes >= 1, got {list(blocks)}")
    if lm is None:
        lm = random_lm(config, device, torch.float32, static_cache=static_cache)
    else:
        config, device, static_cache = lm.name.removeprefix("random:"), str(lm.device), lm.static_cache
    gen = torch.Generator().manual_seed(seed)
    ids = [torch.randint(0, lm.vocab_size - 2, (4 + i % 5,), generator=gen).tolist() for i in range(prompts)]
    target = pp.Target(lm, pp.Power(ALPHA))
    T, N = max_new_tokens, particles
    smcs = {k: engines(lm, N, k)["smc"] for k in blocks}
    for smc in smcs.values():
        time_engine(smc, target, ids, min(T, 4), seed)
    time_model_loop(lm, ids, N, min(T, 4), seed)
    times: dict[str, list[float]] = {"model_loop": [], **{f"smc_block{k}": [] for k in blocks}}
    syncs: dict[int, list[float]] = {k: [] for k in blocks}
    for r in range(reps):
        times["model_loop"].append(time_model_loop(lm, ids, N, T, seed + r))
        for k, smc in smcs.items():
            sec, res = time_engine(smc, target, ids, T, seed + r)
            times[f"smc_block{k}"].append(sec)
            syncs[k].append(res[0].stats["host_syncs"] / res[0].stats["n_steps"])
    med = {name: statistics.median(v) for name, v in times.items()}
    by_block = {str(k): {"ms_per_token": 1000.0 * med[f"smc_block{k}"] / T,
                         "smc_over_model_loop": med[f"smc_block{k}"] / med["model_loop"],
                         "paired_median_ratio": statistics.median(
                             s / f for s, f in zip(times[f"smc_block{k}"], times["model_loop"])),
                         "host_syncs_per_step": statistics.median(syncs[k])} for k in blocks}
    first = str(blocks[0])
    times["smc_batch"] = times.pop(f"smc_block{blocks[0]}")
    return {
        "benchmark": "engine_overhead", "model": f"random:{config}", "static_cache": static_cache,
        "prompts": prompts, "particles": N, "rows": prompts * N, "max_new_tokens": T, "reps": reps,
        "command": (f"llmppl bench overhead --config {config} --prompts {prompts} --particles {N} "
                    f"--max-new-tokens {T} --reps {reps}" + (" --static-cache" if static_cache else "")
                    + (f" --blocks {','.join(map(str, blocks))}" if list(blocks) != [1] else "")),
        "seconds": times,
        "per_step_ms": {"model_loop": 1000.0 * med["model_loop"] / T, "smc_batch": by_block[first]["ms_per_token"]},
        "smc_over_model_loop": by_block[first]["smc_over_model_loop"],
        "host_syncs_per_step": by_block[first]["host_syncs_per_step"],
        "by_block": by_block,
        "machine": machine_info(device),
    }


def add_overhead_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", default="tiny", help="random-weight model shape (llmppl.benchmarking.gpu.RANDOM_CONFIGS)")
    p.add_argument("--prompts", type=int, default=16)
    p.add_argument("--particles", type=int, default=16)
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--static-cache", action="store_true")
    p.add_argument("--blocks", default="1", help="SMC step sizes to time side by side, e.g. 1,8 (default 1: token steps)")
    p.add_argument("--json", default=None, help="write the results here")


def run_overhead_cli(args: argparse.Namespace) -> int:
    return emit(run_overhead(args.config, args.prompts, args.particles, args.max_new_tokens, args.reps,
                             args.device, args.static_cache, blocks=parse_blocks(args.blocks)), args.json)


def parse_blocks(text: str) -> tuple[int, ...]:
    """``"1,8"`` -> ``(1, 8)``; a clear error for anything else."""
    try:
        return tuple(int(x) for x in text.split(","))
    except ValueError:
        raise ValueError(f"--blocks {text!r}: expected comma-separated block sizes, e.g. 1,8") from None
