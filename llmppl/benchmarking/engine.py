"""Timing helpers shared by the benchmarks: the library's own engines, fixed token counts.

Every timed run decodes exactly ``T`` tokens per row: :class:`NoEOS` renormalises the
proposal without the EOS ids (timing only — it changes the target), so SMC, the plain
decoder and the reference loop do the same amount of model work.  ``time_engine`` times
``engine.run_batch`` (the code users call); ``time_model_loop`` times the model's own
cached forward loop (``model(ids, past_key_values=cache)`` + sampling), the reference for
the engine's overhead.
"""

from __future__ import annotations

import math
import os
import platform
import subprocess
import sys
from functools import cache
from pathlib import Path
from typing import Any

import torch

from ..inference.common import Stopwatch
from ..inference.proposal import Proposal, ProposalContext, Wrapping
from ..models.hf_common import cache_argument


class NoEOS(Wrapping):
    """``q(v) ∝ inner(v) · 1[v ∉ EOS]``: every row decodes exactly ``max_new_tokens`` (timing only)."""

    def __init__(self, inner: Proposal, eos: tuple[int, ...]) -> None:
        self.inner, self.eos = inner, list(eos)
        self.requires, self.drafts = inner.requires, inner.drafts
        self.draws_from_engine = inner.draws_from_engine

    def draft_block(self, run: Any, rows: torch.Tensor, spec: Any, generator: Any, **kw: Any) -> Any:
        return self.inner.draft_block(run, rows, spec, generator, **kw)      # (spec.allow_stop is False here)

    def log_probs(self, ctx: ProposalContext) -> torch.Tensor:
        lq = self.inner.log_probs(ctx).clone()
        lq[:, self.eos] = -math.inf
        return torch.log_softmax(lq, dim=-1)

    #: natively: the inner proposal's blocks, drawn without the stop ids
    allow_stop = False

    def block_temperature(self, exponent: torch.Tensor) -> torch.Tensor | None:
        return self.inner.block_temperature(exponent)

    def __repr__(self) -> str:
        return f"NoEOS({self.inner!r})"


def time_engine(engine: Any, target: Any, prompts: list, T: int, seed: int) -> tuple[float, list]:
    """Seconds of ``engine.run_batch(target, prompts, T, seed)``; checks that every row decoded T tokens."""
    with Stopwatch(target.lm.device) as w:
        results = engine.run_batch(target, prompts, T, seed=seed)
    for r in results:
        if r.error or any(len(s) != T for s in r.samples):
            raise RuntimeError("a timed run did not decode T tokens per row; the timing would be unfair")
    return w.seconds, results


def time_sequential(engine: Any, target: Any, prompts: list, T: int, seed: int) -> tuple[float, list]:
    """Seconds of one ``engine.run`` per prompt, one after the other."""
    with Stopwatch(target.lm.device) as w:
        results = [engine.run(target, p, T, seed=seed + i) for i, p in enumerate(prompts)]
    return w.seconds, results


@torch.inference_mode()
def time_model_loop(lm: Any, prompt_ids: list[list[int]], n: int, T: int, seed: int) -> float:
    """Seconds of the model's own cached decode loop for ``len(prompt_ids)·n`` rows: one batched
    prefill (left-padded), then ``T`` steps of the model's forward on a ``DynamicCache`` and an
    argmax of the last logits — nothing else (the floor any sampler must pay), no llmppl code."""
    from transformers import DynamicCache

    model, dev = lm.model, lm.device
    rows = [p for p in prompt_ids for _ in range(n)]
    width = max(len(p) for p in rows)
    pad = int(getattr(lm, "pad_token_id", 0) or 0)
    ids = torch.tensor([[pad] * (width - len(p)) + p for p in rows], device=dev)
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in rows], device=dev)
    kv = cache_argument(model)          # ``cache`` (current transformers) or ``past_key_values``
    with Stopwatch(dev) as w:
        cache = DynamicCache()
        pos = (mask.cumsum(1) - 1).clamp_min(0)
        out = model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True, **{kv: cache})
        last_pos = pos[:, -1:]
        for _ in range(T):
            tok = out.logits[:, -1].argmax(-1, keepdim=True)
            mask = torch.cat([mask, torch.ones_like(tok)], 1)
            last_pos = last_pos + 1
            out = model(input_ids=tok, attention_mask=mask, position_ids=last_pos, use_cache=True, **{kv: cache})
    return w.seconds


def emit(result: dict[str, Any], path: str | None) -> int:
    """Print a benchmark's JSON and write it to ``path`` (folders created); exit status 0."""
    from pathlib import Path
    import json

    text = json.dumps(result, indent=2)
    print(text)
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(text + "\n")
    return 0


@cache
def code_version() -> str:
    """The llmppl code that ran: its git commit (12 hex digits, ``+modified`` when the package's
    own files differ from it) in a checkout, else the installed package's version."""
    root = Path(__file__).resolve().parents[2]
    if (root / ".git").exists() and (root / "llmppl").is_dir():
        try:
            head = subprocess.run(["git", "-C", str(root), "rev-parse", "--short=12", "HEAD"],
                                  capture_output=True, text=True, timeout=10)
            clean = subprocess.run(["git", "-C", str(root), "diff", "--quiet", "HEAD", "--", "llmppl"],
                                   capture_output=True, timeout=10)
            if head.returncode == 0:
                return head.stdout.strip() + ("" if clean.returncode == 0 else "+modified")
        except (OSError, subprocess.SubprocessError):
            pass
    from importlib.metadata import PackageNotFoundError, version
    try:
        return version("llmppl")
    except PackageNotFoundError:
        return "unknown"


def machine_info(device: str) -> dict[str, Any]:
    info = {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(), "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
            "python": sys.version.split()[0], "device": device, "llmppl": code_version()}
    if device.startswith("cuda") and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    try:
        with open("/proc/cpuinfo") as f:
            info["cpu_model"] = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), None)
    except OSError:
        pass
    try:
        info["load_average"] = os.getloadavg()
    except OSError:
        pass
    return info
