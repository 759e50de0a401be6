"""llmppl's grammar constraints against genlm-control on the same constrained targets (issue 41).

    .venv/bin/python benchmarks/constraints_genlm.py [--genlm-python /tmp/genlm-venv/bin/python]
        [--particles 10] [--seeds 5] [--out benchmarks/results/constraints_genlm_cpu.json]

Both sides run the bundled SmolLM2-135M-Instruct on CPU (genlm-control through its Hugging Face
backend, ``AsyncTransformer``, loading the same safetensors directory llmppl converted under
``~/.cache/llmppl``), the same chat prompt token ids, the same number of particles, ESS threshold
0.5 and token budget, on two targets ``γ(y) = p(y | x) · 1[y ∈ L]``:

* ``regex``: a finite language (six colour words, 67 token paths; tests/test_constraints.py's), whose ``log Z = log Σ_{y ∈ L} p(y, EOS | x)`` over
  every token path is computed exactly (``llmppl.targets.constraints.exact``, a walk of the mask
  tree scored by the LM) — both estimates of ``log Z`` are compared with it;
* ``json``: a small JSON Schema (no exact ``Z``): the two estimates of ``log Z`` are compared
  with each other.

llmppl: ``pp.SMC(N)`` on ``Power(1) * Regex(...)`` / ``JSONSchema(...)`` (default proposal
``q ∝ p · mask``, drawn in native blocks; weight = the masked normaliser).  genlm-control:
``PromptedLLM`` × ``BoolFSA.from_regex`` / ``JsonSchema`` coerced to the LM's byte tokens, its
``SMC`` with ``AWRS`` (adaptive weighted rejection sampling, its recommended sampler for a
boolean constraint) and, for the regex, also ``direct_token_sampler`` on the product (the same
locally optimal proposal llmppl uses).  Time per token is wall time over the tokens sampled by
all particles (EOS included on both sides); ``log Ẑ`` is each side's estimate per seed.

The genlm side runs in its own virtual environment (``--genlm-python``; it pins its own
dependencies), as ``python benchmarks/constraints_genlm.py --side genlm`` printing JSON.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

PROMPT = "Name a primary color. One word."
REGEX = "(red|blue|yellow|Red|Blue|Yellow)"
JSON_PROMPT = "Invent a person. Reply in JSON with name and age."
SCHEMA = {"type": "object",
          "properties": {"name": {"type": "string", "pattern": "^[A-Z][a-z]{1,9}$"},
                         "age": {"type": "integer", "minimum": 0, "maximum": 99}},
          "required": ["name", "age"], "additionalProperties": False}
#: llguidance's JSON options matching genlm-control's JsonSchema: no whitespace, "," and ":" as separators
JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ",", "key_separator": ":"}


def model_dir() -> str:
    from llmppl.models.paths import cache_dir

    return str(cache_dir() / "smollm2-135m-instruct")


# --------------------------------------------------------------------------- genlm-control side
def genlm_side(args: argparse.Namespace) -> int:
    import asyncio
    import random

    import numpy as np
    import torch

    torch.set_num_threads(args.threads)
    from genlm.control import AWRS, BoolFSA, JsonSchema, PromptedLLM, direct_token_sampler

    spec = json.loads(args.spec)
    t0 = time.perf_counter()
    llm = PromptedLLM.from_name(spec["model_dir"], backend="hf")
    load = time.perf_counter() - t0
    out = {"genlm_control": _version("genlm-control"), "genlm_backend": _version("genlm-backend"),
           "load_seconds": load, "arms": {}}
    for case in spec["cases"]:
        llm.prompt_ids = case["prompt_ids"]
        if case.get("exact_paths"):
            # the same target on both sides: log Σ_paths p(path, EOS | x) under genlm-control's own LM
            decode = llm.token_maps.decode
            logp = [float(asyncio.run(llm.complete([decode[t] for t in path]))) for path in case["exact_paths"]]
            out.setdefault("exact_log_Z_under_genlm_lm", {})[case["name"]] = float(
                torch.logsumexp(torch.tensor(logp, dtype=torch.float64), 0))
        if case["kind"] == "regex":
            cond = BoolFSA.from_regex(case["regex"]).coerce(llm, f=b"".join)
        else:
            cond = JsonSchema(case["schema"]).coerce(llm, f=b"".join)
        samplers = {"awrs": lambda: AWRS(llm, cond)}
        if case["kind"] == "regex" and spec.get("direct"):
            samplers["direct"] = lambda: direct_token_sampler(llm * cond)
        for name, make in samplers.items():
            runs = []
            for seed in range(spec["seeds"]):
                random.seed(seed)
                np.random.seed(seed)
                torch.manual_seed(seed)
                sampler = make()
                t0 = time.perf_counter()
                seqs = asyncio.run(sampler.smc(n_particles=spec["particles"], ess_threshold=0.5,
                                               max_tokens=spec["max_new_tokens"]))
                wall = time.perf_counter() - t0
                tokens = sum(len(c) for c in seqs.contexts)     # EOS counted, like llmppl's tokens_sampled
                post = {k: float(v) for k, v in seqs.decoded_posterior.items()}
                runs.append({"seed": seed, "wall_time_s": wall, "tokens_sampled": tokens,
                             "log_Z_hat": float(seqs.log_ml), "posterior": post})
                asyncio.run(sampler.cleanup()) if hasattr(sampler, "cleanup") else None
                print(f"genlm {case['name']}/{name} seed {seed}: {wall:.1f} s, {tokens} tokens, "
                      f"log Ẑ {seqs.log_ml:.4f}", file=sys.stderr)
            out["arms"][f"{case['name']}/{name}"] = runs
    print(json.dumps(out))
    return 0


def _version(name: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(name)
    except PackageNotFoundError:
        return None


# --------------------------------------------------------------------------- llmppl side
def llmppl_side(args: argparse.Namespace, cases: list[dict]) -> dict:
    import torch

    import llmppl as pp
    from llmppl.targets.constraints import exact

    torch.set_num_threads(args.threads)
    lm = pp.models.default_lm()
    out: dict = {"arms": {}, "exact_log_Z": {}}
    for case in cases:
        c = (pp.constraints.Regex(case["regex"]) if case["kind"] == "regex"
             else pp.constraints.JSONSchema(case["schema"], options=JSON_OPTIONS))
        target = pp.Target(lm, pp.Power(1.0) * c)
        if case["kind"] == "regex":
            ex = exact(target, case["prompt_ids"], args.max_new_tokens)
            out["exact_log_Z"][case["name"]] = ex.log_Z
            out.setdefault("exact_posterior", {})[case["name"]] = _by_text(lm, ex.as_dict())
            case["exact_paths"] = [list(map(int, seq)) for seq in ex.as_dict()]   # for genlm's own LM
        smc = pp.SMC(args.particles, ess_threshold=0.5)
        smc.run_batch(target, [case["prompt_ids"]], 4, seed=123)   # warm-up (llguidance tokenizer, memo)
        runs = []
        for seed in range(args.seeds):
            # run_batch: a run whose particles all die (cut mid-object) reports log Ẑ = -inf, not an error
            (res,) = smc.run_batch(target, [case["prompt_ids"]], args.max_new_tokens, seed=seed)
            post: dict[str, float] = {}
            if res.error is None:
                for text, w in zip(res.texts, res.weights.tolist()):
                    post[text] = post.get(text, 0.0) + w
            runs.append({"seed": seed, "wall_time_s": res.stats["wall_time"],
                         "tokens_sampled": res.stats["tokens_sampled"],
                         "log_Z_hat": res.log_evidence if res.error is None else -math.inf,
                         "posterior": post})
            print(f"llmppl {case['name']} seed {seed}: {res.stats['wall_time']:.1f} s, "
                  f"{res.stats['tokens_sampled']} tokens, log Ẑ {res.log_evidence:.4f}", file=sys.stderr)
        out["arms"][f"{case['name']}/smc"] = runs
    return out


def _by_text(lm, probs: dict) -> dict[str, float]:
    out: dict[str, float] = {}
    for seq, p in probs.items():
        text = lm.decode(list(seq))
        out[text] = out.get(text, 0.0) + p
    return out


def summarise(runs: list[dict], exact_log_Z: float | None) -> dict:
    per_tok = [r["wall_time_s"] / max(1, r["tokens_sampled"]) for r in runs]
    z = [r["log_Z_hat"] for r in runs]
    finite = [v for v in z if math.isfinite(v)]
    pooled = (math.log(sum(math.exp(v) for v in finite) / len(z)) if finite else -math.inf)
    out = {"s_per_token_median": statistics.median(per_tok), "log_Z_hat_mean": statistics.fmean(finite) if finite else None,
           "log_Z_hat_sd": statistics.stdev(finite) if len(finite) > 1 else None,
           "log_of_mean_Z_hat": pooled, "runs_with_zero_estimate": len(z) - len(finite)}
    if exact_log_Z is not None:
        out["log_of_mean_Z_hat_minus_exact"] = pooled - exact_log_Z
        # unbiasedness: the mean of Ẑ/Z over seeds and its standard error (1 for an unbiased estimator)
        ratio = [math.exp(v - exact_log_Z) for v in z]
        out["Z_hat_over_Z_mean"] = statistics.fmean(ratio)
        out["Z_hat_over_Z_se"] = statistics.stdev(ratio) / math.sqrt(len(ratio)) if len(ratio) > 1 else None
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--side", choices=["both", "genlm"], default="both")
    p.add_argument("--spec", help=argparse.SUPPRESS)
    p.add_argument("--genlm-python", default="/tmp/genlm-venv/bin/python")
    p.add_argument("--particles", type=int, default=10)
    p.add_argument("--seeds", type=int, default=5)
    p.add_argument("--max-new-tokens", type=int, default=24)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--skip-json", action="store_true")
    p.add_argument("--genlm-direct", action="store_true",
                   help="also genlm-control's direct_token_sampler on llm * fsa (full-vocabulary; slow on CPU)")
    p.add_argument("--out", default="benchmarks/results/constraints_genlm_cpu.json")
    args = p.parse_args(argv)
    if args.side == "genlm":
        return genlm_side(args)

    import llmppl as pp

    lm = pp.models.default_lm()
    cases = [{"name": "regex", "kind": "regex", "regex": REGEX, "prompt_ids": lm.encode_prompt(PROMPT, chat=True)}]
    if not args.skip_json:
        cases.append({"name": "json", "kind": "json", "schema": SCHEMA,
                      "prompt_ids": lm.encode_prompt(JSON_PROMPT, chat=True)})
    ours = llmppl_side(args, cases)
    spec = {"model_dir": model_dir(), "cases": cases, "particles": args.particles, "seeds": args.seeds,
            "max_new_tokens": args.max_new_tokens, "direct": args.genlm_direct}
    genlm: dict = {}
    t0 = time.perf_counter()
    try:
        proc = subprocess.run([args.genlm_python, __file__, "--side", "genlm", "--spec", json.dumps(spec),
                               "--threads", str(args.threads)], capture_output=True, text=True,
                              env={**os.environ, "HF_HUB_OFFLINE": "1"}, timeout=7200)
        if proc.returncode != 0:
            genlm = {"error": f"exit {proc.returncode}: {proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else ''}",
                     "stderr_tail": proc.stderr[-4000:]}
        else:
            genlm = json.loads(proc.stdout.strip().splitlines()[-1])
            sys.stderr.write(proc.stderr)
    except (OSError, subprocess.TimeoutExpired) as exc:
        genlm = {"error": f"{type(exc).__name__}: {exc}"}
    genlm_seconds = time.perf_counter() - t0
    summary = {}
    for name, runs in ours["arms"].items():
        summary[f"llmppl/{name}"] = summarise(runs, ours["exact_log_Z"].get(name.split("/")[0]))
    for name, runs in genlm.get("arms", {}).items():
        summary[f"genlm/{name}"] = summarise(runs, ours["exact_log_Z"].get(name.split("/")[0]))
    import torch

    record = {
        "benchmark": "constraints_genlm", "model": lm.name, "device": "cpu",
        "machine": {"platform": platform.platform(), "processor": platform.processor(), "cpus": os.cpu_count(),
                    "torch_threads": args.threads, "loadavg_at_end": os.getloadavg(), "torch": torch.__version__},
        "particles": args.particles, "seeds": args.seeds, "max_new_tokens": args.max_new_tokens, "ess_threshold": 0.5,
        "cases": [{k: v for k, v in c.items() if k not in ("prompt_ids", "exact_paths")}
                  | {"prompt_tokens": len(c["prompt_ids"]), "exact_paths": len(c.get("exact_paths", []))}
                  for c in cases],
        "prompts": {"regex": PROMPT, "json": JSON_PROMPT}, "llmppl_json_options": JSON_OPTIONS,
        "exact_log_Z": ours["exact_log_Z"], "exact_posterior": ours.get("exact_posterior", {}),
        "summary": summary, "llmppl": ours["arms"], "genlm": genlm, "genlm_side_seconds": genlm_seconds,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(record, indent=2) + "\n")
    print(json.dumps({"exact_log_Z": ours["exact_log_Z"],
                      "exact_log_Z_under_genlm_lm": genlm.get("exact_log_Z_under_genlm_lm"), "summary": summary,
                      "genlm_error": genlm.get("error")}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
