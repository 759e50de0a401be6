"""The one process of ``benchmarks/gpu_suite.sh``: exactness smoke, engine overhead and latency of
Power-SMC against plain decoding on random-weight models, each part under a time guard, every
result written to ``--out`` as soon as it exists.

    python3 -m llmppl.benchmarking.gpu_suite --out DIR          # CUDA: bf16, the shapes below
    python3 -m llmppl.benchmarking.gpu_suite --out DIR --dry    # CPU, tiny shapes (CI)

Parts, in this order (``DIR/gpu_<part>.json`` each, rewritten after every unit of work):

* ``exact`` — SMC (static cache + CUDA graphs, and the dynamic cache) and block MH on a tiny
  Llama (vocabulary 8) against :func:`llmppl.exact.enumerate_target` of ``p^α`` on the same
  device: total-variation distance of the weighted particles below ``threshold``; two
  impostors — plain low-temperature decoding at ``τ = 1/α`` and MH without moves — must land
  *above* it (the check can fail); ``log mean Ẑ`` against ``log Z``; the captured decode and
  reorder graphs against the eager static path on the same tokens.
* ``overhead`` — ``llmppl bench overhead`` (``run_batch`` over the model's own cached forward loop)
  on each ``overhead_models`` entry, static cache (+ graphs on CUDA) on and off.
* ``latency-<model>`` — ``llmppl bench latency`` (``Plain(1)``, ``Plain(N).run_batch`` and
  ``pp.SMC(N).run_batch`` over the same ``P × N`` rows, α = 4, EOS masked so every row decodes
  exactly ``tokens``) for every shape ``P × N``, with the fast path (static cache + CUDA graphs)
  on and off.  The model is built from its config with random weights and its logits scaled to
  ``entropy`` nats (:func:`~llmppl.benchmarking.gpu.scale_entropy`; the measured entropy is in
  the file), so that Power-SMC's weights differ between particles and resampling fires.

``DIR/gpu_suite.json``: the plan, the machine, and each part's status (``ok``; ``failed`` — a
check did not hold; ``error``; ``timed_out``; ``running`` if the process was killed in it;
``pending``), seconds and limit.  Exit status 0 iff every part is ``ok``.

Time guard: a part runs under ``signal.setitimer(ITIMER_REAL, limit)``; the SIGALRM handler raises
:class:`PartTimeout` (a ``BaseException``, so no ``except Exception`` in the library swallows it)
in the main thread at its next bytecode, i.e. within one decode step, since every step returns to
Python.  What the part saved stays; the next part starts on time.  Inside a part a unit is skipped
(recorded as such) when the time left is less than the previous unit took.  A call stuck inside C
is not interrupted: the shell script's ``timeout`` around this process is the last guard.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import signal
import sys
import time
import traceback
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch


@dataclass
class Plan:
    """What one run of the suite does (``gpu_plan`` / ``dry_plan``)."""

    dry: bool
    device: str
    dtype: str
    models: list[str]
    shapes: list[list[int]]                 # [prompts P, particles N]
    tokens: int                             # decoded per row in every timed run
    reps: int
    #: ``smc_sequential`` (P whole runs one by one) only on the fast path with at most this many prompts
    sequential_max_prompts: int
    entropy: float                          # target next-token entropy of the random models, nats
    overhead_models: list[str]
    overhead: dict[str, Any]
    exact: dict[str, Any]
    limits: dict[str, float] = field(default_factory=dict)   # part -> seconds
    threads: int | None = None              # torch.set_num_threads (the dry run: 1, as the CPU tests)

    def parts(self) -> list[str]:
        return ["exact", "overhead"] + [f"latency-{m}" for m in self.models]


EXACT = dict(alpha=4.0, max_new_tokens=4, prompt=[1, 2], threshold=0.05, particles=2000, runs=6,
             chains=3000, mh_runs=2, block_size=2, n_mcmc=8, min_support=10.0, impostor_margin=1.5)


def gpu_plan() -> Plan:
    """The H100 plan: ~7 minutes of parts (limits sum to 420 s), leaving time to import and plot."""
    return Plan(dry=False, device="cuda", dtype="bfloat16",
                models=["smollm2-135m", "qwen2.5-1.5b", "llama2-7b"], shapes=[[8, 8], [32, 16]],
                tokens=64, reps=3, sequential_max_prompts=8, entropy=2.0,
                overhead_models=["tiny", "smollm2-135m"],
                overhead=dict(prompts=16, particles=16, tokens=32, reps=3, blocks=[1, 8]),
                exact=dict(EXACT),
                limits={"exact": 60, "overhead": 40, "latency-smollm2-135m": 75,
                        "latency-qwen2.5-1.5b": 100, "latency-llama2-7b": 145})


def dry_plan() -> Plan:
    """The same parts on the CPU with tiny shapes (float32; no CUDA graphs on a CPU)."""
    return Plan(dry=True, device="cpu", dtype="float32", models=["tiny-llama", "tiny"],
                shapes=[[2, 2], [4, 2]], tokens=6, reps=1, sequential_max_prompts=2, entropy=2.0,
                overhead_models=["tiny"], overhead=dict(prompts=2, particles=4, tokens=6, reps=1, blocks=[1, 3]),
                exact=dict(EXACT, particles=1000, runs=4, chains=1000, mh_runs=1, threshold=0.1),
                limits={"exact": 90, "overhead": 30, "latency-tiny-llama": 30, "latency-tiny": 30}, threads=1)


# ---------------------------------------------------------------------------------------- guard


class PartTimeout(BaseException):
    """Raised in the main thread when a part runs past its limit (see the module docstring)."""


@contextmanager
def time_guard(seconds: float) -> Iterator[None]:
    """Raise :class:`PartTimeout` in the main thread once ``seconds`` have passed inside the block."""
    def fire(signum: int, frame: Any) -> None:
        raise PartTimeout(f"ran past its limit of {seconds:g} s")

    previous = signal.signal(signal.SIGALRM, fire)
    signal.setitimer(signal.ITIMER_REAL, max(float(seconds), 1e-3))
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


class Record:
    """A part's JSON file: ``data`` is rewritten (atomically) on every ``save``."""

    def __init__(self, path: Path, data: dict[str, Any]) -> None:
        self.path, self.data = path, data
        self.deadline = math.inf            # time.monotonic() at which the part's guard fires
        self.save()

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def save(self) -> None:
        tmp = self.path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(self.data, indent=1, default=_jsonable) + "\n")
        tmp.replace(self.path)


def _jsonable(x: Any) -> Any:
    if isinstance(x, torch.Tensor):
        return x.tolist()
    if isinstance(x, (torch.dtype, torch.device, Path)):
        return str(x)
    raise TypeError(f"not JSON serialisable: {type(x).__name__}")


def run_part(name: str, fn: Callable[[Record], str | None], limit: float, record: Record) -> dict[str, Any]:
    """Run ``fn(record)`` under :func:`time_guard`; returns ``{status, seconds, limit_s}`` and
    writes the status into the part's file.  ``fn`` returns ``"failed"`` when a check failed."""
    t0 = time.monotonic()
    record.deadline = t0 + limit
    record.data["status"] = "running"
    record.save()
    status, detail = "ok", None
    try:
        with time_guard(limit):
            status = fn(record) or "ok"
    except PartTimeout as exc:
        status, detail = "timed_out", str(exc)
    except Exception as exc:  # noqa: BLE001 - one part's failure must not stop the others
        status, detail = "error", "".join(traceback.format_exception(exc)[-6:])
    out = {"status": status, "seconds": round(time.monotonic() - t0, 3), "limit_s": limit}
    if detail:
        out["detail"] = detail
    record.data.update(status=status, seconds=out["seconds"], limit_s=limit)
    if detail:
        record.data["detail"] = detail
    record.save()
    _free()
    return out


def _free() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _dtype(name: str) -> torch.dtype:
    return {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}[name]


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


# ---------------------------------------------------------------------------------------- exact


def exact_model(device: str, seed: int = 2, head_scale: float = 4.0, eos_logit: float = -1.5) -> Any:
    """A 2-layer Llama of vocabulary 4 (EOS 3) whose ``p^4`` on ``[1, 2]``, 4 new tokens (121
    completions; 1% of the mass on those that end in EOS), is worth ~15 equally likely completions
    (``effective_support``) and is 0.22 (TV) from low-temperature decoding and 0.47 from ``p``.
    (Targets with much mass on very short completions — EOS first — are hard for a token-level
    proposal and for MH's suffix moves alike: a smoke test needs one both sample well at a few
    thousand particles.)  Built on the CPU (the same weights on every device), then moved.

    EOS gets a near-constant logit: dimension 0 of the residual stream is a constant ``c`` (set in
    every embedding; no layer writes it: row 0 of every ``o_proj`` / ``down_proj`` is 0), so after
    the final RMSNorm ``h̃_0 = c / rms(h) > 0``; the head's column 0 is 0 except ``eos_logit`` for
    EOS, whose row is otherwise 0.  The other rows are the random head × ``head_scale``."""
    from transformers import AutoConfig, AutoModelForCausalLM

    V = 4
    config = AutoConfig.for_model("llama", vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                  eos_token_id=V - 1, bos_token_id=1, pad_token_id=0, tie_word_embeddings=False)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    with torch.no_grad():
        emb = model.get_input_embeddings().weight
        emb[:, 0] = 4 * float(emb[:, 1:].abs().mean())
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight[0] = 0
            layer.mlp.down_proj.weight[0] = 0
        head = model.get_output_embeddings().weight
        head.mul_(head_scale)
        head[:, 0] = 0
        head[V - 1] = 0
        head[V - 1, 0] = eos_logit
    return model.to(device)


def part_exact(plan: Plan, rec: Record) -> str:
    """See the module docstring; every check is a dict with ``passed``."""
    import llmppl as pp
    from llmppl.exact import enumerate_target, tv_distance
    from llmppl.models.hf import HFLM
    from llmppl.models.static import StaticHFState

    cfg = plan.exact
    alpha, T, prompt, thr = cfg["alpha"], cfg["max_new_tokens"], cfg["prompt"], cfg["threshold"]
    lm = HFLM(exact_model(plan.device), None, name="exact-tiny-llama", static_cache=True, cuda_graph=True)
    target = pp.Target(lm, pp.Power(alpha))
    exact = enumerate_target(target, prompt, T)
    law = exact.as_dict()
    away = {"mode": 1.0 - float(exact.probs.max()),
            f"low temperature 1/{alpha:g}": tv_distance(law, enumerate_target(
                pp.Target(lm, pp.Tempered(1.0 / alpha)), prompt, T).as_dict()),
            "base LM": tv_distance(law, enumerate_target(pp.Target(lm), prompt, T).as_dict())}
    checks: list[dict[str, Any]] = []
    rec.data.update(model="exact-tiny-llama (llama, V=4, 2 layers, float32)", device=str(lm.device),
                    target=f"Power({alpha:g}) on prompt {prompt}, {T} new tokens", settings=cfg,
                    log_Z=exact.log_Z, sequences=len(exact.sequences), effective_support=exact.effective_support,
                    truncated_mass=exact.truncated_mass, exact_impostor_tv=away, checks=checks)
    checks.append({"name": "target is a fair test", "effective_support": exact.effective_support,
                   "min_support": cfg["min_support"], "impostor_tv": away,
                   "passed": exact.effective_support >= cfg["min_support"]
                   and all(v > cfg["impostor_margin"] * thr for v in away.values())})
    rec.save()

    def add(name: str, run: Callable[[int], Any], runs: int, should_pass: bool) -> list:
        t0 = time.perf_counter()
        samples, weights, results = [], [], []
        for seed in range(runs):
            res = run(seed)
            results.append(res)
            samples += [tuple(s) for s in res.samples]
            weights += [float(w) / runs for w in res.weights]
        _sync(plan.device)
        tv = exact.tv(samples, weights)
        ok = tv < thr if should_pass else tv > thr
        checks.append({"name": name, "tv": tv, "threshold": thr, "samples": len(samples),
                       "expect": "below threshold" if should_pass else "above threshold (impostor caught)",
                       "passed": bool(ok), "seconds": time.perf_counter() - t0})
        rec.save()
        return results

    # the captured graphs against the eager static path, same tokens and reorders (deterministic)
    t0 = time.perf_counter()
    graphed = lm.start(prompt, 4, max_new_tokens=6)
    eager = StaticHFState(lm, prompt, 4, 6, cuda_graph=False)
    gen = torch.Generator(device=lm.device).manual_seed(0)
    diff = 0.0
    for t in range(10):                     # past the capacity: graphs captured again after growth
        tok = torch.multinomial(eager.last.exp(), 1, generator=gen).squeeze(1)
        diff = max(diff, float((graphed.step(tok) - eager.step(tok)).abs().max()))
        if t % 3 == 2:
            idx = torch.randint(0, 4, (4,), device=lm.device, generator=gen)
            graphed.reorder(idx)
            eager.reorder(idx)
    diff = max(diff, float((graphed.last - eager.last).abs().max()))
    checks.append({"name": "graph replay = eager static path", "max_abs_logprob_diff": diff,
                   "cuda_graph": bool(graphed.cuda_graph), "graph_error": graphed.graph_error,
                   "same_tokens": graphed.tokens == eager.tokens,
                   "passed": diff < 1e-4 and graphed.tokens == eager.tokens
                   and (graphed.graph_error is None or not plan.device.startswith("cuda")),
                   "seconds": time.perf_counter() - t0})
    del graphed, eager
    rec.save()

    N, runs = cfg["particles"], cfg["runs"]
    every = pp.SMC(N, resampling="systematic", ess_threshold=1.0)      # resamples every step: reorder graphs
    res = add(f"SMC N={N} x {runs} runs, resampling every step, static cache"
              + (" + CUDA graphs" if plan.device.startswith("cuda") else ""),
              lambda s: every.run(target, prompt, T, seed=s), runs, True)
    ratio = math.log(sum(math.exp(r.log_evidence - exact.log_Z) for r in res) / len(res))
    checks.append({"name": "SMC evidence: log mean Z_hat - log Z", "value": ratio,
                   "log_evidence": [r.log_evidence for r in res], "log_Z": exact.log_Z,
                   "resampling_count": [r.stats.get("resampling_count") for r in res],
                   "passed": abs(ratio) < 0.05})
    rec.save()
    lm.static_cache = False
    smc = pp.SMC(N, resampling="systematic", ess_threshold=0.5)
    add(f"SMC N={N} x {runs // 2} runs, resampling when ESS < N/2, dynamic cache",
        lambda s: smc.run(target, prompt, T, seed=100 + s), max(runs // 2, 1), True)
    lm.static_cache = True
    C, mh_runs = cfg["chains"], cfg["mh_runs"]
    mh = pp.MH(block_size=cfg["block_size"], n_mcmc=cfg["n_mcmc"])
    add(f"MH B={cfg['block_size']} n_mcmc={cfg['n_mcmc']}, {C} chains x {mh_runs} runs",
        lambda s: mh.run(target, prompt, T, chains=C, seed=s), mh_runs, True)
    lm.static_cache = False                 # the impostors: any path will do
    low = pp.baselines.LowTemperature(1.0 / alpha, n=N)
    add(f"impostor: plain decoding at temperature 1/{alpha:g}, {N} x {runs} draws",
        lambda s: low.run(target, prompt, T, seed=s), runs, False)
    idle = pp.MH(block_size=cfg["block_size"], n_mcmc=0)
    add(f"impostor: MH without moves (n_mcmc=0), {C} chains", lambda s: idle.run(target, prompt, T, chains=C, seed=s),
        1, False)
    lm.static_cache = True
    return "ok" if all(c["passed"] for c in checks) else "failed"


# ---------------------------------------------------------------------------------------- overhead


def part_overhead(plan: Plan, rec: Record) -> str:
    """``run_overhead`` on each model, static cache (+ graphs on CUDA) on, then off."""
    from .gpu import random_lm
    from .latency import run_overhead

    o = plan.overhead
    units: list[dict[str, Any]] = []
    rec.data.update(settings=o, units=units)
    last = 0.0
    for name in plan.overhead_models:
        dtype = torch.float32 if name.startswith("tiny") else _dtype(plan.dtype)
        lm = random_lm(name, plan.device, dtype, static_cache=True, cuda_graph=True, entropy=plan.entropy)
        for static in (True, False):
            unit: dict[str, Any] = {"model": name, "dtype": str(dtype).replace("torch.", ""), "static_cache": static,
                                    "cuda_graph": static and plan.device.startswith("cuda")}
            if rec.left() < last:
                unit["skipped"] = f"time guard: {rec.left():.0f} s left, the previous unit took {last:.0f} s"
                units.append(unit)
                continue
            lm.static_cache = lm.cuda_graph = static
            t0 = time.perf_counter()
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                unit.update(run_overhead(name, o["prompts"], o["particles"], o["tokens"], o["reps"], plan.device,
                                         static, blocks=tuple(o["blocks"]), lm=lm))
            unit["warnings"] = sorted({str(w.message)[:300] for w in caught})[:5]
            last = time.perf_counter() - t0
            unit["unit_seconds"] = last
            units.append(unit)
            rec.save()
        del lm
        _free()
    return None


# ---------------------------------------------------------------------------------------- latency


def part_latency(plan: Plan, rec: Record, name: str) -> str | None:
    """Build ``name`` with random weights on the device, scale its entropy, then ``run_latency`` for
    every shape with the fast path on and off (interleaved: shape by shape)."""
    from ..models.hf import HFLM
    from .gpu import RANDOM_CONFIGS, random_model, scale_entropy, weight_bytes
    from .latency import run_latency

    dtype = _dtype(plan.dtype)
    t0 = time.perf_counter()
    model = random_model(name, plan.device, dtype)
    _sync(plan.device)
    build = time.perf_counter() - t0
    units: list[dict[str, Any]] = []
    rec.data.update(model=name, config=RANDOM_CONFIGS[name], dtype=plan.dtype, device=plan.device,
                    parameters=sum(p.numel() for p in model.parameters()), weight_bytes=weight_bytes(model),
                    build_seconds=build, tokens=plan.tokens, reps=plan.reps, units=units)
    rec.save()
    t0 = time.perf_counter()
    rec.data["entropy"] = scale_entropy(model, plan.entropy)
    rec.data["entropy"]["seconds"] = time.perf_counter() - t0
    lm = HFLM(model, None, name=f"random:{name}", static_cache=True, cuda_graph=True)
    rec.save()
    last = 0.0
    for P, N in plan.shapes:
        for fast in (True, False):
            on_cuda = plan.device.startswith("cuda")
            unit: dict[str, Any] = {"prompts": P, "particles": N, "rows": P * N, "fast_path": fast,
                                    "static_cache": fast, "cuda_graph": fast and on_cuda}
            if rec.left() < last:
                unit["skipped"] = f"time guard: {rec.left():.0f} s left, the previous unit took {last:.0f} s"
                units.append(unit)
                rec.save()
                continue
            lm.static_cache = lm.cuda_graph = fast
            if on_cuda:
                torch.cuda.reset_peak_memory_stats()
            t0 = time.perf_counter()
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                res = run_latency(None, N, P, plan.tokens, plan.device, plan.reps, lm=lm,
                                  sequential=fast and P <= plan.sequential_max_prompts)
            last = time.perf_counter() - t0
            counts = [c for rep in res["resampling_count"] for c in rep]
            unit.update(res)
            unit.update(unit_seconds=last, warnings=sorted({str(w.message)[:300] for w in caught})[:5],
                        resampling_per_step=sum(counts) / max(len(counts), 1) / plan.tokens,
                        peak_memory_GiB=torch.cuda.max_memory_allocated() / 2**30 if on_cuda else None)
            units.append(unit)
            rec.save()
    del lm, model
    _free()
    return None


# ---------------------------------------------------------------------------------------- driver


def run_suite(plan: Plan, out: Path, parts: list[str] | None = None, limit_scale: float = 1.0) -> int:
    """Run ``plan``'s parts (or the listed ones) in order, writing ``out/gpu_*.json``; 0 iff all ok."""
    threads = torch.get_num_threads()
    if plan.threads:
        torch.set_num_threads(plan.threads)
    try:
        return _run_suite(plan, out, parts, limit_scale)
    finally:
        torch.set_num_threads(threads)


def _run_suite(plan: Plan, out: Path, parts: list[str] | None, limit_scale: float) -> int:
    from .engine import machine_info

    out.mkdir(parents=True, exist_ok=True)
    names = [p for p in plan.parts() if parts is None or p in parts]
    unknown = sorted(set(parts or []) - set(plan.parts()))
    if unknown:
        raise ValueError(f"unknown parts {unknown}; this plan has {plan.parts()}")
    import transformers

    summary = Record(out / "gpu_suite.json", {
        "suite": "gpu", "dry": plan.dry, "plan": asdict(plan), "limit_scale": limit_scale,
        "machine": machine_info(plan.device), "transformers": transformers.__version__,
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "parts": {n: {"status": "pending", "file": f"gpu_{n}.json"} for n in names}})
    t_start = time.monotonic()
    print(f"[gpu suite] python {sys.version.split()[0]}, torch {torch.__version__} (CUDA {torch.version.cuda}), "
          f"transformers {transformers.__version__}, device {summary.data['machine'].get('gpu', plan.device)}",
          file=sys.stderr, flush=True)
    if plan.device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError("the GPU plan needs CUDA, and torch sees no CUDA device (GPU_SUITE_DRY=1 runs on the CPU)")
    for name in names:
        rec = Record(out / f"gpu_{name}.json", {"part": name, "dry": plan.dry, "device": plan.device})
        if name == "exact":
            fn: Callable[[Record], str | None] = lambda r: part_exact(plan, r)  # noqa: E731
        elif name == "overhead":
            fn = lambda r: part_overhead(plan, r)  # noqa: E731
        else:
            fn = lambda r, m=name.removeprefix("latency-"): part_latency(plan, r, m)  # noqa: E731
        summary.data["parts"][name].update(status="running")
        summary.save()
        result = run_part(name, fn, plan.limits.get(name, 60.0) * limit_scale, rec)
        summary.data["parts"][name].update(result)
        summary.data["total_seconds"] = round(time.monotonic() - t_start, 3)
        summary.save()
        print(f"[gpu suite] {name}: {result['status']} in {result['seconds']:.1f} s "
              f"(limit {result['limit_s']:.0f} s)", file=sys.stderr, flush=True)
    ok = all(p["status"] == "ok" for p in summary.data["parts"].values())
    summary.data["status"] = "ok" if ok else "not ok"
    summary.save()
    return 0 if ok else 1


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python3 -m llmppl.benchmarking.gpu_suite", description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True, help="folder for gpu_*.json")
    p.add_argument("--dry", action="store_true", help="the CPU plan with tiny shapes")
    p.add_argument("--parts", default=None, help="comma-separated subset of the parts, in plan order")
    p.add_argument("--models", default=None, help="comma-separated random-weight configs for the latency parts")
    p.add_argument("--tokens", type=int, default=None, help="tokens per row in every latency run")
    p.add_argument("--reps", type=int, default=None, help="repetitions of every latency unit")
    p.add_argument("--limit-scale", type=float, default=float(os.environ.get("GPU_SUITE_LIMIT_SCALE", 1.0)),
                   help="multiply every part's time limit")
    args = p.parse_args(argv)
    plan = dry_plan() if args.dry else gpu_plan()
    if args.models:
        plan.models = [m for m in args.models.split(",") if m]
        share = sum(v for k, v in plan.limits.items() if k.startswith("latency-")) / len(plan.models)
        plan.limits = {k: v for k, v in plan.limits.items() if not k.startswith("latency-")}
        plan.limits.update({f"latency-{m}": share for m in plan.models})
    plan.tokens = args.tokens or plan.tokens
    plan.reps = args.reps or plan.reps
    parts = [x for x in args.parts.split(",") if x] if args.parts else None
    return run_suite(plan, Path(args.out), parts, args.limit_scale)


if __name__ == "__main__":
    sys.exit(main())
