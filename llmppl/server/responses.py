"""OpenAI response bodies built from ``Result`` s, with the sampler's diagnostics in ``llmppl``.

Choices: with ``n == 1`` the completion is ``Result.best`` (a draw from the weighted particles,
as ``llmppl sample`` prints); with ``n > 1`` the ``n`` *distinct* completions of largest summed
weight (identical particles, which resampling makes, count once, with their weights added; ties
in particle order).  So ``n`` choices are the heaviest points of the one run's weighted
distribution, not ``n`` independent runs: a run whose particles hold fewer than ``n`` distinct
completions returns fewer choices, and ``llmppl.choices[j].mass`` gives each one's weight.  ``finish_reason`` is ``"stop"`` for a completion that ended with EOS and
``"length"`` for one cut at ``max_tokens``.  ``usage.completion_tokens`` counts the tokens really
decoded for the request (every particle, look-ahead rollouts and MH proposals included:
``Result.stats["tokens_decoded"]``), not only the returned ones.
"""

from __future__ import annotations

import json
import math
import time
import uuid
from collections.abc import Iterator
from typing import Any

from ..diagnostics.completions import distinct_completions
from ..inference.result import Result, _jsonable


def _finite(x: Any) -> float | None:
    if x is None:
        return None
    x = float(x)
    return x if math.isfinite(x) else None


def choice_indices(res: Result, n: int) -> list[int]:
    """Which particles answer: ``best_index()`` for n == 1, else the first particle of each of
    the ``n`` heaviest distinct completions (fewer when the run has fewer)."""
    if n == 1:
        return [res.best_index()]
    return [c.particles[0] for c in distinct_completions(res)[:n]]


def _prompt_diagnostics(res: Result, idx: list[int]) -> dict[str, Any]:
    w = res.weights
    mass = {tuple(c.tokens): (c.mass, c.count) for c in distinct_completions(res)}
    resamplings = res.stats.get("resampling_count")
    if resamplings is None and "resampled" in res.steps:
        resamplings = int(sum(bool(r) for r in res.steps["resampled"]))
    return {
        "log_evidence": _finite(res.log_evidence),
        "ess": float(res.final_ess),
        "resampling_count": resamplings,
        "wall_time": _finite(res.stats.get("wall_time")),
        "tokens_decoded": int(res.stats.get("tokens_decoded", 0)),
        "forward_passes": int(res.stats.get("forward_passes", 0)),
        "n_particles": res.n,
        "distinct_completions": len(mass),
        "choices": [{"particle": i, "weight": float(w[i]), "mass": mass[tuple(res.samples[i])][0],
                     "particles_with_it": mass[tuple(res.samples[i])][1],
                     "log_weight": _finite(res.log_weights[i]),
                     "log_p": _finite(res.log_p[i]) if i < len(res.log_p) else None,
                     "tokens": [int(t) for t in res.samples[i]]} for i in idx],
        "stats": _jsonable({k: v for k, v in res.stats.items() if isinstance(v, (int, float, str, bool))}),
    }


def _text(res: Result, i: int) -> str:
    if res.texts is not None and i < len(res.texts) and res.texts[i] is not None:
        return res.texts[i]
    return ""


def build(kind: str, model: str, prompts: list[list[int]], results: list[Result], n: int,
          meta: dict[str, Any]) -> dict[str, Any]:
    """The non-streaming body: ``kind`` is ``"chat"`` or ``"text"``."""
    choices: list[dict[str, Any]] = []
    per_prompt = []
    for p, res in enumerate(results):
        idx = choice_indices(res, n)
        per_prompt.append(_prompt_diagnostics(res, idx))
        for j, i in enumerate(idx):
            finish = "stop" if (i < len(res.finished) and res.finished[i]) else "length"
            c: dict[str, Any] = {"index": len(choices), "finish_reason": finish, "logprobs": None}
            if kind == "chat":
                c["message"] = {"role": "assistant", "content": _text(res, i)}
            else:
                c["text"] = _text(res, i)
            choices.append(c)
    prompt_tokens = sum(len(p) for p in prompts)
    completion_tokens = sum(d["tokens_decoded"] for d in per_prompt)
    llmppl = dict(meta)
    if len(per_prompt) == 1:
        llmppl.update(per_prompt[0])
    else:
        llmppl["prompts"] = per_prompt
    return {
        "id": ("chatcmpl-" if kind == "chat" else "cmpl-") + uuid.uuid4().hex,
        "object": "chat.completion" if kind == "chat" else "text_completion",
        "created": int(time.time()),
        "model": model,
        "system_fingerprint": None,
        "choices": choices,
        "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                  "total_tokens": prompt_tokens + completion_tokens},
        "llmppl": llmppl,
    }


class Stream:
    """Server-sent events of one request (see ``app._stream``): progress events while it waits
    and runs, then the finished body as chunks, [usage], ``[DONE]``; or an error event."""

    def __init__(self, kind: str, model: str, include_usage: bool) -> None:
        self.chat = kind == "chat"
        self.include_usage = include_usage
        self.base = {"id": ("chatcmpl-" if self.chat else "cmpl-") + uuid.uuid4().hex,
                     "object": "chat.completion.chunk" if self.chat else "text_completion",
                     "created": int(time.time()), "model": model, "system_fingerprint": None}

    @staticmethod
    def _event(obj: dict[str, Any]) -> bytes:
        return f"data: {json.dumps(obj)}\n\n".encode()

    def progress(self, info: dict[str, Any]) -> bytes:
        """A chunk with no choices and ``llmppl.progress`` = ``info`` (status, seconds)."""
        return self._event({**self.base, "choices": [], "llmppl": {"progress": info}})

    def answer(self, body: dict[str, Any]) -> Iterator[bytes]:
        body = {**body, **{k: self.base[k] for k in ("id", "created")}}
        yield from stream_events(body, self.include_usage)

    def error(self, status: int, message: str, param: str | None, code: str | None,
              type: str | None) -> Iterator[bytes]:
        from .errors import error_body

        yield self._event(error_body(status, message, param, code, type))
        yield b"data: [DONE]\n\n"


def stream_events(body: dict[str, Any], include_usage: bool) -> Iterator[bytes]:
    """Server-sent events of a finished body: one chunk with every choice, [usage], ``[DONE]``.

    SMC's answer is only known when the run ends (resampling can replace any prefix), so the
    whole completion arrives as a single chunk rather than token by token (``Stream`` sends
    progress events before it).
    """
    chat = body["object"] == "chat.completion"
    base = {"id": body["id"], "object": "chat.completion.chunk" if chat else "text_completion",
            "created": body["created"], "model": body["model"], "system_fingerprint": None}
    choices = []
    for c in body["choices"]:
        if chat:
            choices.append({"index": c["index"], "delta": c["message"], "finish_reason": c["finish_reason"],
                            "logprobs": None})
        else:
            choices.append(dict(c))
    chunk = {**base, "choices": choices, "llmppl": body["llmppl"]}
    if include_usage:
        chunk["usage"] = None
    yield f"data: {json.dumps(chunk)}\n\n".encode()
    if include_usage:
        yield f"data: {json.dumps({**base, 'choices': [], 'usage': body['usage']})}\n\n".encode()
    yield b"data: [DONE]\n\n"
