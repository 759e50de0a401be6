"""``llmppl bench gpu``: ms per decode step of plain decoding and Power-SMC on the static-cache path.

For each particle count ``N`` it times, on one model and in one process:

* ``plain_b1``: plain sampling, batch 1 (``StaticHFState.step``, CUDA-graph replay on CUDA);
* ``plain_bN``: plain sampling, batch ``N``;
* ``smc``: Power-SMC with ``N`` particles on the same path — proposal ``q ∝ p^α``, the
  token-independent weight ``log Σ_v p(v)^α`` (Power-SMC, Thm 1), systematic resampling on
  the device when ``ESS < κN`` (every step with ``--force-resample``: no host sync at all),
  finished particles masked;
* ``smc_engine``: ``pp.SMC`` (the library engine, host bookkeeping per step) on the same LM;
* ``dynamic_b1`` / ``dynamic_bN``: the eager ``DynamicCache`` path (``HFState``), for reference;

and reports their ratios, the bandwidth floor ``(bytes of weights read per step + KV bytes) /
measured copy bandwidth`` and the paper's cost model (tokens decoded, forward passes).
``--random-weights CONFIG`` builds a Qwen2-shaped model from a config with random weights
(latency does not depend on the weight values; nothing is downloaded).
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

#: Qwen2 shapes (from the published configs) and a tiny one for CPU smoke runs
RANDOM_CONFIGS: dict[str, dict[str, Any]] = {
    "qwen2-0.5b": dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                       num_attention_heads=14, num_key_value_heads=2, vocab_size=151936,
                       tie_word_embeddings=True, rope_theta=1000000.0),
    "qwen2-1.5b": dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
                       num_attention_heads=12, num_key_value_heads=2, vocab_size=151936,
                       tie_word_embeddings=True, rope_theta=1000000.0),
    "qwen2-7b": dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                     num_attention_heads=28, num_key_value_heads=4, vocab_size=152064,
                     tie_word_embeddings=False, rope_theta=1000000.0),
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, vocab_size=512,
                 tie_word_embeddings=True),
}


def random_lm(name: str, device: str, dtype: torch.dtype, static_cache: bool = True,
              cuda_graph: bool = True, seed: int = 0) -> Any:
    """An :class:`HFLM` over a Qwen2 model of shape ``RANDOM_CONFIGS[name]`` with random weights."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from ..models.hf import HFLM

    if name not in RANDOM_CONFIGS:
        raise ValueError(f"unknown --random-weights config {name!r}; choose from {sorted(RANDOM_CONFIGS)}")
    spec = dict(RANDOM_CONFIGS[name])
    V = spec["vocab_size"]
    config = Qwen2Config(**spec, max_position_embeddings=32768, eos_token_id=V - 1,
                         bos_token_id=V - 2, pad_token_id=V - 1, attn_implementation="sdpa")
    torch.manual_seed(seed)
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = Qwen2ForCausalLM(config)
    finally:
        torch.set_default_dtype(default)
    return HFLM(model, None, name=f"random:{name}", static_cache=static_cache, cuda_graph=cuda_graph)


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


def _timed(device: torch.device, warmup: int, steps: int, body: Callable[[int], None]) -> float:
    """ms per call of ``body(t)`` over ``steps`` calls after ``warmup`` untimed ones."""
    for t in range(warmup):
        body(t)
    _sync(device)
    t0 = time.perf_counter()
    for t in range(warmup, warmup + steps):
        body(t)
    _sync(device)
    return (time.perf_counter() - t0) / steps * 1e3


def time_plain(lm: Any, prompt: list[int], n: int, warmup: int, steps: int,
               gen: torch.Generator) -> dict[str, Any]:
    """Plain ancestral sampling of ``n`` rows on the static path."""
    st = lm.start(prompt, n, max_new_tokens=warmup + steps)

    def body(t: int) -> None:
        tok = torch.multinomial(st.last.exp(), 1, generator=gen).squeeze(1)
        st.step(tok)

    ms = _timed(lm.device, warmup, steps, body)
    return {"ms": ms, "cuda_graph": bool(st.cuda_graph), "graph_error": st.graph_error,
            "forward_passes": st.forward_passes, "tokens_decoded": st.tokens_decoded}


def time_dynamic(lm: Any, prompt: list[int], n: int, warmup: int, steps: int,
                 gen: torch.Generator) -> float:
    """Plain sampling through the eager ``DynamicCache`` state (``HFState``)."""
    from ..models.hf import HFState

    st = HFState(lm, prompt, n)

    def body(t: int) -> None:
        tok = torch.multinomial(st.logprobs().exp(), 1, generator=gen).squeeze(1)
        st.extend(tok)

    return _timed(lm.device, warmup, steps, body)


def time_power_smc(lm: Any, prompt: list[int], n: int, alpha: float, warmup: int, steps: int,
                   gen: torch.Generator, ess_threshold: float, force: bool) -> dict[str, Any]:
    """Power-SMC with ``n`` particles, every step on the device (see module docstring)."""
    st = lm.start(prompt, n, max_new_tokens=warmup + steps)
    dev = lm.device
    log_w = torch.zeros(n, dtype=torch.float64, device=dev)
    log_z = torch.zeros((), dtype=torch.float64, device=dev)
    resampled = torch.zeros((), dtype=torch.long, device=dev)
    offsets = torch.arange(n, device=dev, dtype=torch.float64)
    eos = lm.eos_token_id

    def body(t: int) -> None:
        nonlocal log_w
        scaled = st.last.double() * alpha                      # (N, V): α log p
        norm = torch.logsumexp(scaled, dim=-1)                 # log Σ_v p(v)^α
        tok = torch.multinomial(torch.softmax(scaled, -1), 1, generator=gen).squeeze(1)
        live = ~st.fin_d
        log_w = log_w + torch.where(live, norm, 0.0)
        st.step(tok)
        st.finish_where(live & (tok == eos))
        lse = torch.logsumexp(log_w, 0)
        ess = torch.exp(2 * lse - torch.logsumexp(2 * log_w, 0))
        if force or bool(ess < ess_threshold * n):             # the one host sync (unless forced)
            w = torch.exp(log_w - lse)
            u = (torch.rand((), generator=gen, device=dev, dtype=torch.float64) + offsets) / n
            idx = torch.searchsorted(torch.cumsum(w, 0), u).clamp_(max=n - 1)
            st.reorder(idx)
            log_z.add_(lse - math.log(n))
            log_w = torch.zeros_like(log_w)
            resampled.add_(1)

    ms = _timed(dev, warmup, steps, body)
    return {"ms": ms, "resampled": int(resampled), "steps": warmup + steps,
            "forward_passes": st.forward_passes, "tokens_decoded": st.tokens_decoded,
            "log_evidence": float(log_z + torch.logsumexp(log_w, 0) - math.log(n)),
            "cuda_graph": bool(st.cuda_graph), "graph_error": st.graph_error}


def time_smc_engine(lm: Any, prompt: list[int], n: int, alpha: float, steps: int,
                    ess_threshold: float, seed: int) -> dict[str, Any] | None:
    """``pp.SMC`` on the same LM: ms per step (wall time / steps), or None if it is not built."""
    import llmppl as pp

    if not hasattr(pp, "SMC"):
        return None
    target = pp.Target(lm, pp.Power(alpha))
    smc = pp.SMC(n_particles=n, proposal=pp.proposals.Temperature(1.0 / alpha),
                 ess_threshold=ess_threshold, progress=False)
    smc.run(target, prompt, max_new_tokens=4, seed=seed)  # warm-up (graph capture)
    _sync(lm.device)
    t0 = time.perf_counter()
    res = smc.run(target, prompt, max_new_tokens=steps, seed=seed)
    _sync(lm.device)
    wall = time.perf_counter() - t0
    n_steps = len(res.steps.get("ess", [])) or steps
    return {"ms": wall / n_steps * 1e3, "steps": n_steps,
            "resampled": int(sum(bool(r) for r in res.steps.get("resampled", []))),
            "forward_passes": res.stats.get("forward_passes"),
            "tokens_decoded": res.stats.get("tokens_decoded")}


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
                   help="a Qwen2-shaped model with random weights (no download): "
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
    p.add_argument("--no-engine", action="store_true", help="skip the pp.SMC engine timing")
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
    gen = torch.Generator(device=device).manual_seed(args.seed)
    prompt = torch.randint(0, lm.vocab_size - 2, (args.prompt_len,),
                           generator=torch.Generator().manual_seed(args.seed)).tolist()
    bw = copy_bandwidth(device, mib=1024 if device.type == "cuda" else 64)
    wbytes = weight_bytes(lm.model)
    length = args.prompt_len + args.warmup + args.steps // 2  # mean KV length over the timed steps
    W, S = args.warmup, args.steps
    b1 = time_plain(lm, prompt, 1, W, S, gen)
    dyn_b1 = None if args.no_dynamic else time_dynamic(lm, prompt, 1, W, S, gen)
    out: dict[str, Any] = {
        "benchmark": "gpu", "command": "llmppl " + " ".join(sys.argv[1:]),
        "model": args.random_weights or lm.name, "random_weights": bool(args.random_weights),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)",
        "torch": torch.__version__, "transformers": __import__("transformers").__version__,
        "dtype": str(dtype).replace("torch.", ""), "steps": S, "warmup": W, "prompt_len": args.prompt_len,
        "alpha": args.alpha, "ess_threshold": args.ess_threshold, "force_resample": args.force_resample,
        "weight_bytes": wbytes, "copy_bandwidth_GBps": bw,
        "plain_b1_ms": b1["ms"], "dynamic_b1_ms": dyn_b1, "cuda_graph": b1["cuda_graph"],
        "graph_error": b1["graph_error"], "runs": [],
    }
    floor1 = (wbytes + kv_bytes(lm.model, 1, length)) / (bw * 1e9) * 1e3  # bytes read once per step
    out["floor_b1_ms"] = floor1
    for n in ns:
        bn = time_plain(lm, prompt, n, W, S, gen)
        smc = time_power_smc(lm, prompt, n, args.alpha, W, S, gen, args.ess_threshold, args.force_resample)
        floor = (wbytes + kv_bytes(lm.model, n, length)) / (bw * 1e9) * 1e3
        row = {
            "n": n, "plain_bN_ms": bn["ms"], "smc_ms": smc["ms"], "floor_ms": floor,
            "smc_over_plain_b1": smc["ms"] / b1["ms"], "plain_bN_over_b1": bn["ms"] / b1["ms"],
            "smc_over_floor": smc["ms"] / floor, "smc_resampled": smc["resampled"],
            "smc_steps": smc["steps"], "smc_log_evidence": smc["log_evidence"],
            "smc_forward_passes": smc["forward_passes"], "smc_tokens_decoded": smc["tokens_decoded"],
            "dynamic_bN_ms": None if args.no_dynamic else time_dynamic(lm, prompt, n, W, S, gen),
            "smc_engine": None if args.no_engine else time_smc_engine(
                lm, prompt, n, args.alpha, S, 1.0 if args.force_resample else args.ess_threshold, args.seed),
            "cost_model": cost_model(n, S, args.prompt_len, args.mh_block, args.mh_steps),
        }
        out["runs"].append(row)
        eng = row["smc_engine"]
        print(f"N={n:4d}  plain b1 {b1['ms']:8.2f} ms  bN {bn['ms']:8.2f} ms  Power-SMC {smc['ms']:8.2f} ms "
              f"({row['smc_over_plain_b1']:.2f}x b1, floor {floor:.2f} ms, resampled {smc['resampled']}/{smc['steps']})"
              + (f"  engine {eng['ms']:.2f} ms" if eng else ""), file=sys.stderr)
    print(json.dumps(out, indent=1))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(out, indent=1))
    return 0
