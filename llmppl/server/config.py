"""``ServerConfig``: the server's defaults (what a request gets when it leaves a field out) and limits."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

from ..options import METHOD_NAMES, PROPOSAL_NAMES, RESAMPLING_NAMES, SAMPLER_DEFAULTS, SCHEDULE_NAMES, TRUNCATION


@dataclass(frozen=True)
class ServerConfig:
    """Defaults and bounds of ``llmppl serve``.

    Defaults (a request's ``extra_body`` overrides them): ``method``, ``alpha``, ``particles``,
    ``resampling``, ``ess_threshold``, ``block_size`` (MH; None: ``max_tokens // 4``), ``n_mcmc``,
    ``top_k`` / ``rollouts`` / ``horizon`` (look-ahead, server-side only), ``max_tokens``.
    Server-side only (``llmppl serve`` flags, shown by ``/health``): ``proposal``, ``schedule``,
    ``bridge_steps``, ``step`` (SMC; ``proposal`` also MH), ``tau`` (lowtemp; None: ``1/alpha``)
    and ``truncation`` (``keep``: a completion cut at ``max_tokens`` weighs ``p(prefix)^alpha``;
    ``zero``: it weighs 0).

    Limits: ``max_particles`` (particles per request), ``max_tokens_limit`` (``max_tokens``),
    ``max_n_mcmc``, ``max_batch_prompts`` (prompts in one ``run_batch``, and in one
    ``/v1/completions`` request), ``queue_size`` (requests waiting for a batch; one more is a 429),
    ``max_body_bytes`` (request body).  ``batch_wait_s``: how long the batcher waits after a
    request reaches an idle server for more to join its batch.  ``api_key``: when set, every
    endpoint but ``/health`` needs ``Authorization: Bearer <api_key>``.  ``model_name``: the
    ``model`` id clients must send (``/v1/models`` lists it).  ``chat``: apply the model's chat
    template to ``/v1/chat/completions`` messages (False: concatenate the message contents).
    """

    model_name: str = "llmppl"
    method: str = "smc"
    alpha: float = 4.0
    particles: int = 8
    resampling: str = "systematic"
    ess_threshold: float = 0.5
    block_size: int | None = None
    n_mcmc: int = 2
    top_k: int = 4
    rollouts: int = 2
    horizon: int = 8
    max_tokens: int = 64
    max_particles: int = 64
    max_tokens_limit: int = 512
    max_n_mcmc: int = 16
    max_batch_prompts: int = 32
    queue_size: int = 64
    max_body_bytes: int = 1 << 20
    batch_wait_s: float = 0.005
    api_key: str | None = None
    chat: bool = True
    proposal: str = SAMPLER_DEFAULTS["proposal"]
    schedule: str = SAMPLER_DEFAULTS["schedule"]
    bridge_steps: int = SAMPLER_DEFAULTS["bridge_steps"]
    step: str = SAMPLER_DEFAULTS["step"]
    tau: float | None = None
    truncation: str = "keep"

    def __post_init__(self) -> None:
        def positive_int(name: str) -> None:
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be an int >= 1, got {v!r}")

        if self.method not in METHOD_NAMES:
            raise ValueError(f"unknown method {self.method!r}; choose from {', '.join(sorted(METHOD_NAMES))}")
        if not (isinstance(self.alpha, (int, float)) and math.isfinite(self.alpha) and self.alpha > 0):
            raise ValueError(f"alpha must be finite and > 0, got {self.alpha!r}")
        if self.resampling not in RESAMPLING_NAMES:
            raise ValueError(f"unknown resampling {self.resampling!r}; choose from {sorted(RESAMPLING_NAMES)}")
        if self.proposal not in PROPOSAL_NAMES:
            raise ValueError(f"unknown proposal {self.proposal!r}; choose from {', '.join(PROPOSAL_NAMES)}")
        if self.schedule not in SCHEDULE_NAMES:
            raise ValueError(f"unknown schedule {self.schedule!r}; choose from {', '.join(SCHEDULE_NAMES)}")
        if self.truncation not in TRUNCATION:
            raise ValueError(f"truncation must be keep or zero, got {self.truncation!r}")
        if self.tau is not None and not (isinstance(self.tau, (int, float)) and math.isfinite(self.tau)
                                         and self.tau > 0):
            raise ValueError(f"tau must be finite and > 0, got {self.tau!r}")
        if not 0.0 <= self.ess_threshold <= 1.0:
            raise ValueError(f"ess_threshold must be in [0, 1], got {self.ess_threshold!r}")
        for name in ("particles", "max_tokens", "max_particles", "max_tokens_limit", "max_batch_prompts",
                     "queue_size", "max_body_bytes", "top_k", "rollouts", "horizon", "bridge_steps"):
            positive_int(name)
        if self.block_size is not None:
            positive_int("block_size")
        if isinstance(self.n_mcmc, bool) or not isinstance(self.n_mcmc, int) or not 0 <= self.n_mcmc:
            raise ValueError(f"n_mcmc must be an int >= 0, got {self.n_mcmc!r}")
        if self.particles > self.max_particles:
            raise ValueError(f"particles={self.particles} exceeds max_particles={self.max_particles}")
        if self.max_tokens > self.max_tokens_limit:
            raise ValueError(f"max_tokens={self.max_tokens} exceeds max_tokens_limit={self.max_tokens_limit}")
        if self.n_mcmc > self.max_n_mcmc:
            raise ValueError(f"n_mcmc={self.n_mcmc} exceeds max_n_mcmc={self.max_n_mcmc}")
        if not (math.isfinite(self.batch_wait_s) and self.batch_wait_s >= 0):
            raise ValueError(f"batch_wait_s must be finite and >= 0, got {self.batch_wait_s!r}")
        if self.api_key is not None and not self.api_key:
            raise ValueError("api_key must be a non-empty string (or None for no authentication)")
        from ..methods import build_method, check_truncation  # the engine these defaults build

        method = build_method(self.method, self.method_options())
        check_truncation(self.truncation, method.sharpened)

    def method_options(self, **overrides: Any) -> Any:
        """The :class:`~llmppl.methods.MethodOptions` of these defaults (``overrides``: a request's)."""
        from ..methods import MethodOptions

        values = {k: getattr(self, k) for k in ("particles", "alpha", "resampling", "ess_threshold", "block_size",
                                                 "n_mcmc", "top_k", "rollouts", "horizon", "tau", "proposal",
                                                 "schedule", "bridge_steps", "step")}
        values["max_new_tokens"] = self.max_tokens
        values.update(overrides)
        return MethodOptions(**values)

    def public(self) -> dict[str, Any]:
        """The configuration without the API key (what ``/health`` shows)."""
        d = asdict(self)
        d.pop("api_key")
        d["auth"] = self.api_key is not None
        return d
