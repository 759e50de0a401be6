"""``llmppl bench gpu``: ms per decode step of plain decoding and Power-SMC on the static-cache path.

For each particle count ``N`` it times, on one model and in one process:

* ``plain_b1`` / ``plain_bN``: the plain decoder of ``pp.baselines`` (the SMC engine's token
  loop without weights), batch 1 / ``N``, static cache (CUDA-graph replay on CUDA);
* ``smc``: ``pp.SMC(N)`` itself — Power-SMC, ``q ∝ p^α``, resampling when ``ESS < κN``
  (every step with ``--force-resample``) — on the same LM and cache;
* ``dynamic_b1`` / ``dynamic_bN``: the plain decoder on the eager ``DynamicCache`` path;
* optionally ``run_batch`` over several prompts vs one run per prompt, and transformers'
  own ``generate`` (static cache + ``torch.compile``) as the anchor for plain decoding;

and reports their ratios, the bandwidth floor ``(bytes of weights read per step + KV bytes) /
measured copy bandwidth`` and the paper's cost model (tokens decoded, forward passes).
``--random-weights CONFIG`` builds a model of a published shape (``RANDOM_CONFIGS``: Qwen2, Qwen2.5,
SmolLM2, Llama-2) from a config with random weights (latency does not depend on the weight values;
nothing is downloaded).  ``benchmarks/gpu_suite.sh`` uses :func:`random_model` and
:func:`scale_entropy` (realistic next-token entropy) through :mod:`llmppl.benchmarking.gpu_suite`.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import time
from pathlib import Path
from typing import Any

import torch

#: model shapes from the published configs (``arch``: the transformers family), and tiny ones
#: for CPU smoke runs.  ``smollm2-135m``, ``qwen2.5-1.5b`` and ``llama2-7b`` are the GPU suite's
#: (``benchmarks/gpu_suite.sh``); the ``qwen2-*`` shapes are ``llmppl bench gpu``'s.
RANDOM_CONFIGS: dict[str, dict[str, Any]] = {
    "smollm2-135m": dict(arch="llama", hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                         num_attention_heads=9, num_key_value_heads=3, vocab_size=49152,
                         tie_word_embeddings=True, rope_theta=100000.0, rms_norm_eps=1e-5,
                         max_position_embeddings=8192),
    "qwen2.5-1.5b": dict(arch="qwen2", hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
                         num_attention_heads=12, num_key_value_heads=2, vocab_size=151936,
                         tie_word_embeddings=True, rope_theta=1000000.0, rms_norm_eps=1e-6,
                         max_position_embeddings=32768),
    "llama2-7b": dict(arch="llama", hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                      num_attention_heads=32, num_key_value_heads=32, vocab_size=32000,
                      tie_word_embeddings=False, rope_theta=10000.0, rms_norm_eps=1e-5,
                      max_position_embeddings=4096),
    "qwen2-0.5b": dict(arch="qwen2", hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                       num_attention_heads=14, num_key_value_heads=2, vocab_size=151936,
                       tie_word_embeddings=True, rope_theta=1000000.0),
    "qwen2-1.5b": dict(arch="qwen2", hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
                       num_attention_heads=12, num_key_value_heads=2, vocab_size=151936,
                       tie_word_embeddings=True, rope_theta=1000000.0),
    "qwen2-7b": dict(arch="qwen2", hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                     num_attention_heads=28, num_key_value_heads=4, vocab_size=152064,
                     tie_word_embeddings=False, rope_theta=1000000.0),
    "tiny": dict(arch="qwen2", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, vocab_size=512,
                 tie_word_embeddings=True),
    "tiny-llama": dict(arch="llama", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, vocab_size=512,
                       tie_word_embeddings=True),
}


def random_model(name: str, device: str, dtype: torch.dtype, seed: int = 0) -> Any:
    """A transformers causal LM of shape ``RANDOM_CONFIGS[name]`` with random weights (the family's
    own initialisation, seeded), built directly on ``device`` in ``dtype``; EOS = V−1, BOS = V−2."""
    from transformers import AutoConfig, AutoModelForCausalLM

    if name not in RANDOM_CONFIGS:
        raise ValueError(f"unknown --random-weights config {name!r}; choose from {sorted(RANDOM_CONFIGS)}")
    spec = dict(RANDOM_CONFIGS[name])
    arch = spec.pop("arch")
    V = spec["vocab_size"]
    spec.setdefault("max_position_embeddings", 32768)
    config = AutoConfig.for_model(arch, **spec, eos_token_id=V - 1, bos_token_id=V - 2, pad_token_id=V - 1)
    config._attn_implementation = "sdpa"
    torch.manual_seed(seed)
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    finally:
        torch.set_default_dtype(default)
    return model.eval()


def random_lm(name: str, device: str, dtype: torch.dtype, static_cache: bool = True,
              cuda_graph: bool = True, seed: int = 0, entropy: float | None = None) -> Any:
    """An :class:`HFLM` over :func:`random_model` (``name`` a key of ``RANDOM_CONFIGS``), no tokenizer;
    with ``entropy`` the logits are first scaled by :func:`scale_entropy` to that many nats."""
    from ..models.hf import HFLM

    model = random_model(name, device, dtype, seed)
    if entropy is not None:
        scale_entropy(model, entropy, seed=seed)
    return HFLM(model, None, name=f"random:{name}", static_cache=static_cache, cuda_graph=cuda_graph)


def _final_norm(model: Any) -> torch.nn.Module:
    norm = getattr(getattr(model, "model", None), "norm", None)
    if norm is None or getattr(norm, "weight", None) is None:
        raise ValueError(f"{type(model).__name__}: no final norm with a gain (model.model.norm.weight) to scale")
    return norm


def _entropy(logits: torch.Tensor, scale: float | torch.Tensor = 1.0) -> torch.Tensor:
    """Per row ``H(softmax(s·z)) = −Σ_v π_v log π_v`` in nats (float32)."""
    lp = torch.log_softmax(logits.float() * scale, dim=-1)
    return -(lp.exp() * lp).sum(-1)


@torch.inference_mode()
def _sample_paths(model: Any, prompts: torch.Tensor, steps: int, gen: torch.Generator,
                  temperature: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Continue each prompt row by ``steps`` tokens drawn from ``softmax(z / temperature)`` (full
    forward each step, no cache); returns the logits ``z`` the draws saw, (rows·steps, V) float32,
    and the sequences."""
    ids, seen = prompts, []
    for _ in range(steps):
        z = model(input_ids=ids, logits_to_keep=1).logits[:, -1].float()
        seen.append(z)
        probs = torch.softmax(z / temperature, dim=-1)
        nxt = torch.multinomial(probs.cpu(), 1, generator=gen).to(ids.device)
        ids = torch.cat([ids, nxt], 1)
    return torch.cat(seen), ids


@torch.inference_mode()
def scale_entropy(model: Any, target: float = 2.0, rows: int = 64, prompt_len: int = 8, steps: int = 16,
                  passes: int = 2, seed: int = 0) -> dict[str, Any]:
    """Scale the logits of a random-weight model so that its next-token entropy is ``target`` nats.

    A random model's logits are near 0 (entropy ≈ log V), so every particle weighs the same and
    SMC never resamples; a trained model's next-token entropy on text is a few nats.  The final
    RMSNorm's gain ``g`` is multiplied by ``s``: ``logits = W (s·g ⊙ h/rms(h)) = s·z`` exactly,
    whether or not ``W`` is tied to the input embedding (scaling ``W`` itself would also scale the
    embeddings of a tied model).  ``H(s) = H(softmax(s·z))`` decreases in ``s > 0``, so ``s`` is
    found by bisection on ``log s`` for ``mean_rows H(s) = target``, where the rows are the
    positions of ``rows`` continuations of ``steps`` tokens drawn from the model itself at the
    current scale (``passes`` times: first at ``s = 1``, then at the scale found so far), so the
    entropy is the one the model has along its own samples, which is what decoding sees.  Measured
    afterwards on fresh draws from ``p`` and from ``p^4`` (``q`` of Power-SMC at α = 4) with
    another seed: ``entropy_nats`` and ``entropy_nats_power4``; with 64 rows the measured mean is
    within ~0.15 nats of ``target`` (the rows' entropies spread widely).  Returns the record.
    """
    norm = _final_norm(model)
    dev = norm.weight.device
    V = model.get_output_embeddings().weight.shape[0]
    gen = torch.Generator().manual_seed(seed)
    prompts = torch.randint(0, V - 2, (rows, prompt_len), generator=gen).to(dev)
    before = float(_entropy(_sample_paths(model, prompts, 1, gen)[0]).mean())
    scale = 1.0
    for _ in range(passes):
        z, _ = _sample_paths(model, prompts, steps, gen)   # logits at the current scale: s on top of it
        lo, hi = -12.0, 12.0                   # log s
        for _ in range(50):
            mid = (lo + hi) / 2
            if float(_entropy(z, math.exp(mid)).mean()) > target:
                lo = mid
            else:
                hi = mid
        s = math.exp((lo + hi) / 2)
        norm.weight.mul_(s)
        scale *= s
    gen = torch.Generator().manual_seed(seed + 1)
    fresh = torch.randint(0, V - 2, (rows, prompt_len), generator=gen).to(dev)
    after = _entropy(_sample_paths(model, fresh, steps, gen)[0])
    power = _entropy(_sample_paths(model, fresh, steps, gen, temperature=0.25)[0])
    return {"target_nats": target, "logit_scale": scale, "entropy_nats_unscaled": before,
            "entropy_nats": float(after.mean()), "entropy_nats_p10_p90": [float(after.quantile(0.1)), float(after.quantile(0.9))],
            "entropy_nats_power4": float(power.mean()), "max_nats": math.log(V),
            "measured_on": f"{rows} draws of {steps} tokens from p (and from p^4), prompts of {prompt_len} random ids"}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def copy_bandwidth(device: torch.device, mib: int = 1024, repeats: int = 10) -> float:
    """Device copy bandwidth in GB/s, counting bytes read and written (the floor divides by it)."""
    n = mib * 2**20 // 4
    a = torch.empty(n, dtype=torch.float32, device=device)
    b = torch.empty_like(a)
    b.copy_(a)
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(repeats):
        b.copy_(a)
    _sync(device)
    return 2 * a.numel() * 4 * repeats / (time.perf_counter() - t0) / 1e9


def weight_bytes(model: torch.nn.Module) -> int:
    """Bytes of weights read by one decode step: every parameter but an untied input embedding."""
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    emb, head = model.get_input_embeddings().weight, model.get_output_embeddings().weight
    if emb.data_ptr() != head.data_ptr():
        total -= emb.numel() * emb.element_size()
    return total


def kv_bytes(model: torch.nn.Module, n: int, length: int) -> int:
    """Bytes of KV cache read by one decode step of ``n`` rows at ``length`` positions."""
    c = model.config
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    elt = next(model.parameters()).element_size()
    return 2 * c.num_hidden_layers * n * c.num_key_value_heads * length * head_dim * elt


def _engines(lm: Any, n: int, alpha: float, ess_threshold: float) -> dict[str, Any]:
    """The library's own Power-SMC and plain decoder (``Plain``'s engine), EOS masked for timing."""
    import llmppl as pp
    from ..inference.baselines import Decoder
    from ..inference.common import eos_ids
    from .engine import NoEOS

    eos = eos_ids(lm)
    return {"smc": pp.SMC(n, proposal=NoEOS(pp.proposals.Temperature(1.0 / alpha), eos),
                          ess_threshold=ess_threshold),
            "plain": Decoder("plain", NoEOS(pp.proposals.Base(), eos), n, {})}


def time_run(engine: Any, target: Any, prompts: list, steps: int, warmup: int, seed: int) -> dict[str, Any]:
    """ms per step of ``engine.run_batch`` over ``steps`` tokens (a ``warmup``-token run first:
    allocator, kernels, CUDA-graph capture); stats of the timed run."""
    from .engine import time_engine

    time_engine(engine, target, prompts, max(warmup, 1), seed)
    sec, res = time_engine(engine, target, prompts, steps, seed)
    st = res[0].stats
    n_steps = st.get("n_steps", 1)      # a decoder draws the whole completion as one block
    return {"ms": sec / steps * 1e3, "seconds": sec, "steps": n_steps,
            "resampled": sum(r.stats.get("resampling_count", 0) for r in res),
            "forward_passes": st["forward_passes"], "tokens_decoded": sum(r.stats["tokens_decoded"] for r in res),
            "host_syncs_per_step": st.get("host_syncs", 0) / max(n_steps, 1),
            "log_evidence": [r.log_evidence for r in res]}


def time_hf_generate(lm: Any, prompt: list[int], n: int, steps: int, compile_: bool) -> float | None:
    """ms per token of transformers' own ``generate`` (static cache, optionally ``torch.compile``d),
    batch ``n``, exactly ``steps`` new tokens: the anchor for "plain decoding at its best"."""
    model, dev = lm.model, lm.device
    ids = torch.tensor([prompt] * n, device=dev)
    kw = dict(max_new_tokens=steps, min_new_tokens=steps, do_sample=True, cache_implementation="static",
              pad_token_id=lm.pad_token_id)
    if compile_:
        model.forward = torch.compile(model.forward, mode="reduce-overhead", fullgraph=True)
    try:
        model.generate(ids, **{**kw, "max_new_tokens": 4, "min_new_tokens": 4})   # warm-up / compile
        _sync(dev)
        t0 = time.perf_counter()
        model.generate(ids, **kw)
        _sync(dev)
        return (time.perf_counter() - t0) / steps * 1e3
    except Exception as exc:  # pragma: no cover - depends on the transformers build
        print(f"HF generate anchor failed: {type(exc).__name__}: {exc}", file=sys.stderr)
        return None


def cost_model(n: int, steps: int, prompt_len: int, mh_block: int, mh_steps: int) -> dict[str, Any]:
    """The papers' cost accounting in tokens decoded and forward passes for ``T = steps`` tokens.

    Plain: ``T`` tokens, ``T`` passes.  SMC: ``N·T`` tokens in ``T`` batched passes.  MH
    (Karan & Du, Alg. 1) with blocks ``B`` and ``n_mcmc`` moves per stage: each move re-draws
    a suffix of expected length ``kB/2`` at stage ``k``, so ``T + n_mcmc·B·K(K+1)/4`` tokens
    (``K = T/B``) in ``T + n_mcmc·Σ_k kB/2`` sequential passes.
    """
    K = max(1, steps // mh_block)
    mh_tokens = steps + mh_steps * mh_block * K * (K + 1) / 4
    return {
        "prompt_tokens": prompt_len,
        "plain": {"tokens_decoded": steps, "forward_passes": steps},
        "smc": {"tokens_decoded": n * steps, "forward_passes": steps},
        "mh": {"block_size": mh_block, "n_mcmc": mh_steps, "tokens_decoded": mh_tokens,
               "forward_passes": mh_tokens, "vs_plain": mh_tokens / steps},
    }


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--random-weights", metavar="CONFIG", default=None, choices=sorted(RANDOM_CONFIGS),
                   help="a model of this shape with random weights (no download): "
                        + ", ".join(sorted(RANDOM_CONFIGS)))
    p.add_argument("--model", default=None, help="a model spec for load_model (instead of random weights)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default=None, help="default: bfloat16 on CUDA, float32 on CPU")
    p.add_argument("--particles", default="1,4,16,64", help="comma-separated particle counts N")
    p.add_argument("--steps", type=int, default=64, help="timed decode steps")
    p.add_argument("--warmup", type=int, default=8, help="untimed steps first (graph capture)")
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--alpha", type=float, default=4.0)
    p.add_argument("--ess-threshold", type=float, default=0.5)
    p.add_argument("--force-resample", action="store_true", help="resample at every step (worst case)")
    p.add_argument("--no-graph", action="store_true", help="do not capture CUDA graphs")
    p.add_argument("--no-dynamic", action="store_true", help="skip the eager DynamicCache reference")
    p.add_argument("--batch-prompts", type=int, default=0,
                   help="also time run_batch over this many prompts x the largest N vs sequential runs")
    p.add_argument("--hf-generate", action="store_true",
                   help="also time transformers' generate (static cache + torch.compile) at batch 1 and 16")
    p.add_argument("--mh-block", type=int, default=16, help="MH block size in the cost model")
    p.add_argument("--mh-steps", type=int, default=2, help="MH moves per stage in the cost model")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None, help="write the results here")


def run(args: argparse.Namespace) -> int:
    from ..models.hf import _resolve_dtype
    from ..models.registry import load_model

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda but no CUDA GPU is visible")
    dtype = _resolve_dtype(args.dtype or ("bfloat16" if device.type == "cuda" else "float32"))
    ns = [int(x) for x in str(args.particles).split(",") if x.strip()]
    if not ns or min(ns) < 1:
        raise ValueError(f"--particles must list counts >= 1, got {args.particles!r}")
    if args.random_weights:
        lm = random_lm(args.random_weights, str(device), dtype, cuda_graph=not args.no_graph, seed=args.seed)
    else:
        lm = load_model(args.model, device=str(device), dtype=dtype)
        lm.static_cache, lm.cuda_graph = True, not args.no_graph
    import llmppl as pp

    prompt = torch.randint(0, lm.vocab_size - 2, (args.prompt_len,),
                           generator=torch.Generator().manual_seed(args.seed)).tolist()
    target = pp.Target(lm, pp.Power(args.alpha))
    kappa = 1.0 if args.force_resample else args.ess_threshold
    bw = copy_bandwidth(device, mib=1024 if device.type == "cuda" else 64)
    wbytes = weight_bytes(lm.model)
    length = args.prompt_len + args.steps // 2  # mean KV length over the timed steps
    W, S = args.warmup, args.steps

    def dynamic(n: int) -> float | None:
        if args.no_dynamic:
            return None
        lm.static_cache = False
        try:
            return time_run(_engines(lm, n, args.alpha, kappa)["plain"], target, [prompt], S, W, args.seed)["ms"]
        finally:
            lm.static_cache = True

    b1 = time_run(_engines(lm, 1, args.alpha, kappa)["plain"], target, [prompt], S, W, args.seed)
    out: dict[str, Any] = {
        "benchmark": "gpu", "command": "llmppl " + " ".join(sys.argv[1:]),
        "timed": "pp.SMC.run_batch and the plain decoder (pp.baselines' engine), EOS masked; ms/step = wall/steps",
        "model": args.random_weights or lm.name, "random_weights": bool(args.random_weights),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)",
        "torch": torch.__version__, "transformers": __import__("transformers").__version__,
        "dtype": str(dtype).replace("torch.", ""), "steps": S, "warmup": W, "prompt_len": args.prompt_len,
        "alpha": args.alpha, "ess_threshold": args.ess_threshold, "force_resample": args.force_resample,
        "weight_bytes": wbytes, "copy_bandwidth_GBps": bw,
        "plain_b1_ms": b1["ms"], "dynamic_b1_ms": dynamic(1), "runs": [],
    }
    out["floor_b1_ms"] = (wbytes + kv_bytes(lm.model, 1, length)) / (bw * 1e9) * 1e3
    if args.hf_generate:
        out["hf_generate_compiled_ms"] = {str(b): time_hf_generate(lm, prompt, b, S, True) for b in (1, 16)}
    for n in ns:
        e = _engines(lm, n, args.alpha, kappa)
        bn = time_run(e["plain"], target, [prompt], S, W, args.seed)
        smc = time_run(e["smc"], target, [prompt], S, W, args.seed)
        floor = (wbytes + kv_bytes(lm.model, n, length)) / (bw * 1e9) * 1e3
        row = {
            "n": n, "plain_bN_ms": bn["ms"], "smc_ms": smc["ms"], "floor_ms": floor,
            "smc_over_plain_b1": smc["ms"] / b1["ms"], "smc_over_plain_bN": smc["ms"] / bn["ms"],
            "plain_bN_over_b1": bn["ms"] / b1["ms"], "smc_over_floor": smc["ms"] / floor,
            "smc_resampled": smc["resampled"], "smc_steps": smc["steps"],
            "smc_log_evidence": smc["log_evidence"][0], "smc_host_syncs_per_step": smc["host_syncs_per_step"],
            "smc_forward_passes": smc["forward_passes"], "smc_tokens_decoded": smc["tokens_decoded"],
            "dynamic_bN_ms": dynamic(n),
            "cost_model": cost_model(n, S, args.prompt_len, args.mh_block, args.mh_steps),
        }
        out["runs"].append(row)
        print(f"N={n:4d}  plain b1 {b1['ms']:8.2f} ms  bN {bn['ms']:8.2f} ms  Power-SMC {smc['ms']:8.2f} ms "
              f"({row['smc_over_plain_b1']:.2f}x b1, {row['smc_over_plain_bN']:.2f}x bN, floor {floor:.2f} ms, "
              f"resampled {smc['resampled']}/{smc['steps']})", file=sys.stderr)
    if args.batch_prompts:
        from .engine import time_sequential

        n, P = max(ns), args.batch_prompts
        prompts = [[(t + 7 * i) % (lm.vocab_size - 2) for t in prompt] for i in range(P)]
        smc = _engines(lm, n, args.alpha, kappa)["smc"]
        batched = time_run(smc, target, prompts, S, W, args.seed)
        seq_sec = time_sequential(smc, target, prompts, S, args.seed)[0]
        out["run_batch"] = {"prompts": P, "particles": n, "batched_tokens_per_s": P * n * S / batched["seconds"],
                            "sequential_tokens_per_s": P * n * S / seq_sec,
                            "speedup": seq_sec / batched["seconds"]}
    print(json.dumps(out, indent=1))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(out, indent=1))
    return 0
