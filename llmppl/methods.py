"""Named sampling methods: the registry shared by ``llmppl sample | run | eval`` and the runners.

``METHODS[name](options) -> Method`` builds an engine from an options object (an
``argparse.Namespace`` or anything with the attributes ``add_engine_arguments`` defines
plus ``particles``, ``alpha``, ``max_new_tokens``).  A :class:`Method` knows its engine,
the keyword arguments its ``run_batch`` needs (MH: ``chains``), whether its target is
sharpened (``p^alpha``) or the base LM (``p``), and the options that define it (its
``config``, stored with every output record and checked on resume).

A new engine is one registry line, not another ``elif``.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any


@dataclass
class Method:
    """An engine plus how to call it.

    ``run_batch(target, prompts, max_new_tokens, seed)`` calls
    ``engine.run_batch(..., **batch_kwargs)``; ``run`` the same for one prompt.
    ``sharpened``: the method samples ``p^alpha`` (so its target is ``Power(alpha)``);
    otherwise its target is the base LM ``Power(1)``.
    """

    name: str
    engine: Any
    config: dict[str, Any]
    sharpened: bool
    batch_kwargs: dict[str, Any] = field(default_factory=dict)

    def run_batch(self, target: Any, prompts: Sequence[Any], max_new_tokens: int,
                  seed: int | None = None) -> list[Any]:
        return self.engine.run_batch(target, prompts, max_new_tokens, seed=seed, **self.batch_kwargs)

    def run(self, target: Any, prompt: Any, max_new_tokens: int, seed: int | None = None) -> Any:
        return self.engine.run(target, prompt, max_new_tokens, seed=seed, **self.batch_kwargs)

    def target_alpha(self, alpha: float) -> float:
        """The exponent of this method's target ``p^a``: ``alpha`` if sharpened, else 1."""
        return float(alpha) if self.sharpened else 1.0


@dataclass(frozen=True)
class MethodEntry:
    """How to build one method: the builder, whether it is sharpened, the options defining it."""

    build: Callable[[Any], Any]
    sharpened: bool
    options: tuple[str, ...]

    def __call__(self, ns: Any, name: str | None = None) -> Method:
        engine, kwargs = self.build(ns)
        config = {"method": name, **{k: getattr(ns, k, None) for k in self.options}}
        return Method(name or "?", engine, config, self.sharpened, kwargs)


def _temperature(proposals: Any, alpha: float) -> Any:
    """The proposal ``q ∝ p^alpha`` (temperature ``1/alpha``)."""
    return proposals.Temperature(1.0 / alpha)


def _smc(ns: Any) -> tuple[Any, dict]:
    from .inference import SMC, proposals

    return SMC(n_particles=ns.particles, proposal=_temperature(proposals, ns.alpha),
               resampling=ns.resampling, ess_threshold=ns.ess_threshold,
               progress=not getattr(ns, "quiet", True)), {}


def _mh(ns: Any) -> tuple[Any, dict]:
    from .inference import MH, proposals

    block = ns.block_size or max(1, ns.max_new_tokens // 4)
    return MH(block_size=block, n_mcmc=ns.n_mcmc, proposal=_temperature(proposals, ns.alpha)), \
        {"chains": ns.particles}


def _plain(ns: Any) -> tuple[Any, dict]:
    from .inference.baselines import Plain

    return Plain(n=ns.particles), {}


def _lowtemp(ns: Any) -> tuple[Any, dict]:
    from .inference.baselines import LowTemperature

    tau = getattr(ns, "tau", None)
    return LowTemperature(tau=tau if tau is not None else 1.0 / ns.alpha, n=ns.particles), {}


def _greedy(ns: Any) -> tuple[Any, dict]:
    from .inference.baselines import Greedy

    return Greedy(), {}


def _bestofn(ns: Any) -> tuple[Any, dict]:
    from .inference.baselines import BestOfN

    return BestOfN(n=ns.particles), {}


def _reweight(ns: Any) -> tuple[Any, dict]:
    from .inference.reweight import Reweight

    return Reweight(n=ns.particles, progress=not getattr(ns, "quiet", True)), {}


def _lookahead(ns: Any) -> tuple[Any, dict]:
    from .inference.samplers import ScalablePower

    return ScalablePower(top_k=ns.top_k, rollouts=ns.rollouts, horizon=ns.horizon, n=ns.particles), {}


#: method name -> how to build it (``METHODS[name](options, name) -> Method``)
METHODS: dict[str, MethodEntry] = {
    "smc": MethodEntry(_smc, True, ("particles", "alpha", "resampling", "ess_threshold")),
    "mh": MethodEntry(_mh, True, ("particles", "alpha", "block_size", "n_mcmc")),
    "plain": MethodEntry(_plain, False, ("particles",)),
    "lowtemp": MethodEntry(_lowtemp, False, ("particles", "alpha", "tau")),
    "greedy": MethodEntry(_greedy, False, ()),
    "bestofn": MethodEntry(_bestofn, False, ("particles",)),
    # self-normalised importance sampling of p^alpha from the samples plain draws (same seed)
    "reweight": MethodEntry(_reweight, True, ("particles", "alpha")),
    "lookahead": MethodEntry(_lookahead, True, ("particles", "alpha", "top_k", "rollouts", "horizon")),
}


def build_method(name: str, ns: Any) -> Method:
    """``METHODS[name]`` built from ``ns``; an unknown name is a ``ValueError`` listing the known ones."""
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; choose from {', '.join(sorted(METHODS))}")
    return METHODS[name](ns, name)


def add_engine_arguments(p: argparse.ArgumentParser) -> None:
    """The options every ``METHODS`` builder reads (shared by ``sample``, ``run`` and ``eval``)."""
    p.add_argument("--resampling", default="systematic")
    p.add_argument("--ess-threshold", type=float, default=0.5)
    p.add_argument("--block-size", type=int, default=None, help="MH block size (default max_new_tokens/4)")
    p.add_argument("--n-mcmc", type=int, default=2, help="MH steps per block")
    p.add_argument("--top-k", type=int, default=4, help="look-ahead candidates")
    p.add_argument("--rollouts", type=int, default=2, help="look-ahead rollouts per candidate")
    p.add_argument("--horizon", type=int, default=8, help="look-ahead rollout length")
    p.add_argument("--no-chat", action="store_true", help="do not apply the chat template")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default=None)
    p.add_argument("--backend", choices=["hf", "llamacpp"], default="hf",
                   help="inference backend: transformers (hf) or llama.cpp for GGUF files")


# ------------------------------------------------------------------ recipes
_SIMPLE = (str, int, float, bool, type(None))


@dataclass(frozen=True)
class MethodRecipe:
    """A picklable recipe for a :class:`Method`: its name and options (calling it builds one).

    Used wherever the method must be built elsewhere (a Ray actor) or several times.
    """

    name: str
    options: tuple[tuple[str, Any], ...]

    @classmethod
    def from_args(cls, args: Any, name: str | None = None) -> "MethodRecipe":
        opts = {k: v for k, v in vars(args).items() if isinstance(v, _SIMPLE) and k != "method"}
        opts["quiet"] = True  # inside a dataset run, engines show no progress bar of their own
        name = name or args.method
        if name not in METHODS:
            raise ValueError(f"unknown method {name!r}; choose from {', '.join(sorted(METHODS))}")
        return cls(name, tuple(sorted(opts.items())))

    def __call__(self) -> Method:
        return build_method(self.name, argparse.Namespace(**dict(self.options)))

    @property
    def sharpened(self) -> bool:
        return METHODS[self.name].sharpened


@dataclass(frozen=True)
class TargetRecipe:
    """A picklable recipe for the target ``p^alpha`` of a model (calling it loads the model).

    ``chat``: apply the chat template when the tokenizer has one.  ``config(target)``: the
    fields that define the target, stored with every output record.
    """

    model: str | None = None
    alpha: float = 1.0
    chat: bool = True
    device: str = "cpu"
    dtype: str | None = None
    backend: str = "hf"

    @classmethod
    def from_args(cls, args: Any, sharpened: bool = True, device: str | None = None) -> "TargetRecipe":
        return cls(model=args.model, alpha=float(args.alpha) if sharpened else 1.0,
                   chat=not getattr(args, "no_chat", False), device=device or args.device,
                   dtype=args.dtype, backend=getattr(args, "backend", "hf"))

    def __call__(self) -> Any:
        from .models import load_model
        from .targets import Power, Target

        lm = load_model(self.model, device=self.device, dtype=self.dtype, backend=self.backend)
        chat = self.chat and getattr(getattr(lm, "tokenizer", None), "chat_template", None) is not None
        return Target(lm, Power(self.alpha), chat=chat)

    def on_device(self, device: str) -> "TargetRecipe":
        """The same recipe loading the model on ``device`` (a CPU recipe moved to a GPU actor)."""
        import dataclasses

        return self if self.device != "cpu" else dataclasses.replace(self, device=device)

    def config(self, target: Any) -> dict[str, Any]:
        return {"model": self.model or "default", "backend": self.backend, "dtype": self.dtype,
                "target_alpha": self.alpha, "chat": bool(target.chat)}
