"""Named sampling methods: the registry shared by ``llmppl sample | run | eval | serve`` and the runners.

``build_method(name, particles=8, alpha=4.0, ...)`` builds a :class:`Method` from typed keyword
arguments (the fields of :class:`MethodOptions`); ``METHODS[name](options, name)`` does the same
from a :class:`MethodOptions` (or an ``argparse.Namespace`` with those attributes, as the CLI
parses them).  A :class:`Method` knows its engine, the keyword arguments its ``run_batch`` needs
(MH: ``chains``), whether its target is sharpened (``p^alpha``) or the base LM (``p``), and the
options that define it (its ``config``, stored with every output record and checked on resume).

A new engine is one registry line (and its name in :data:`llmppl.options.METHOD_NAMES`, the
table the command line reads without importing torch), not another ``elif``.
"""

from __future__ import annotations

import argparse
import dataclasses
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
from .options import (  # noqa: F401  (re-exported: the CLI tables live in llmppl.options)
    SAMPLER_DEFAULTS, SAMPLER_METHODS, TRUNCATION, add_engine_arguments,
)
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
class MethodOptions:
    """Every option a method builder reads, typed, with the command line's defaults.

    ``particles``: SMC particles, MH chains, baseline samples.  ``alpha``: the target's power.
    ``max_new_tokens``: only MH reads it (its default block is ``max_new_tokens // 4``).
    ``resampling`` / ``ess_threshold`` / ``proposal`` / ``schedule`` / ``bridge_steps`` / ``step``:
    SMC (``proposal`` also MH).  ``block_size`` / ``n_mcmc``: MH.  ``top_k`` / ``rollouts`` /
    ``horizon``: look-ahead.  ``tau``: lowtemp's temperature (None: ``1/alpha``).
    ``progress``: the engine draws its own progress bar.
    """

    particles: int = 8
    alpha: float = 4.0
    max_new_tokens: int = 64
    resampling: str = "systematic"
    ess_threshold: float = 0.5
    block_size: int | None = None
    n_mcmc: int = 2
    top_k: int = 4
    rollouts: int = 2
    horizon: int = 8
    tau: float | None = None
    proposal: str = "temperature"
    schedule: str = "constant"
    bridge_steps: int = 16
    step: str = "tokens:1"
    progress: bool = False

    @classmethod
    def from_namespace(cls, ns: Any, **overrides: Any) -> "MethodOptions":
        """The options of an ``argparse.Namespace`` (or any object with these attributes): an
        attribute that is absent or None takes the default; ``progress`` is ``not ns.quiet``."""
        values: dict[str, Any] = {}
        for f in dataclasses.fields(cls):
            v = getattr(ns, f.name, None)
            if v is not None and f.name != "progress":
                values[f.name] = v
        values["progress"] = not getattr(ns, "quiet", True)
        values.update(overrides)
        return cls(**values)

    def get(self, name: str) -> Any:
        return getattr(self, name, None)


def _options(source: Any) -> MethodOptions:
    return source if isinstance(source, MethodOptions) else MethodOptions.from_namespace(source)


@dataclass(frozen=True)
class MethodEntry:
    """How to build one method: the builder, whether it is sharpened, the options defining it."""

    build: Callable[[MethodOptions], tuple[Any, dict[str, Any]]]
    sharpened: bool
    options: tuple[str, ...]

    def __call__(self, source: "MethodOptions | argparse.Namespace | Any", name: str | None = None) -> Method:
        opts = _options(source)
        engine, kwargs = self.build(opts)
        config = {"method": name, **{k: getattr(opts, k) for k in self.options}}
        for k in SAMPLER_DEFAULTS:   # recorded only when not the default (older files still resume)
            if name in SAMPLER_METHODS[k] and getattr(opts, k) != SAMPLER_DEFAULTS[k]:
                config[k] = getattr(opts, k)
        return Method(name or "?", engine, config, self.sharpened, kwargs)


# ------------------------------------------------------- sampler options
#: ``--proposal NAME`` -> the SMC / MH proposal built from the options (``temperature``:
#: ``q ∝ p^alpha``, the Power-SMC proposal and the default)
PROPOSALS: dict[str, Callable[[MethodOptions], Any]] = {
    "temperature": lambda o: proposals.Temperature(1.0 / o.alpha),
    "base": lambda o: proposals.Base(),
    "locally-optimal": lambda o: proposals.LocallyOptimal(),
    "lookahead": lambda o: proposals.Lookahead(top_k=o.top_k, rollouts=o.rollouts, horizon=o.horizon),
}

#: ``--schedule NAME`` -> the SMC exponent bridge from ``p^1`` to ``p^alpha`` (``--bridge-steps``)
SCHEDULES: dict[str, Callable[[MethodOptions], Any]] = {
    "constant": lambda o: schedules.Constant(),
    "linear": lambda o: schedules.Linear(alpha_from=1.0, steps=o.bridge_steps),
    "geometric": lambda o: schedules.Geometric(alpha_from=1.0, steps=o.bridge_steps),
    "adaptive": lambda o: schedules.AdaptiveESS(target_ess=0.5, alpha_from=1.0),
}


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


def _proposal(o: MethodOptions) -> Any:
    if o.proposal not in PROPOSALS:
        raise ValueError(f"unknown --proposal {o.proposal!r}; choose from {', '.join(PROPOSALS)}")
    return PROPOSALS[o.proposal](o)


def _schedule(o: MethodOptions) -> Any:
    if o.schedule not in SCHEDULES:
        raise ValueError(f"unknown --schedule {o.schedule!r}; choose from {', '.join(SCHEDULES)}")
    return SCHEDULES[o.schedule](o)


def check_sampler_options(source: Any, method: str) -> None:
    """Raise ``ValueError`` (one line) for a sampler option that is malformed or that ``method``
    does not take (e.g. ``--schedule linear`` with ``--method mh``); run before the model loads."""
    o = _options(source)
    for name, methods in SAMPLER_METHODS.items():
        value = getattr(o, name)
        if value != SAMPLER_DEFAULTS[name] and method not in methods:
            flag = "--" + name.replace("_", "-")
            raise ValueError(f"{flag} applies to --method {' or '.join(methods)}, not {method}")
    bridge = o.bridge_steps
    if isinstance(bridge, bool) or not isinstance(bridge, int) or bridge < 1:
        raise ValueError(f"--bridge-steps must be an integer >= 1, got {bridge!r}")
    _proposal(o), _schedule(o), parse_step(o.step)


def _smc(o: MethodOptions) -> tuple[Any, dict]:
    return SMC(n_particles=o.particles, proposal=_proposal(o), schedule=_schedule(o),
               step=parse_step(o.step), resampling=o.resampling, ess_threshold=o.ess_threshold,
               progress=o.progress), {}


def _mh(o: MethodOptions) -> tuple[Any, dict]:
    if o.block_size is not None and (isinstance(o.block_size, bool) or o.block_size < 1):
        raise ValueError(f"--block-size must be >= 1, got {o.block_size}")
    if o.n_mcmc is not None and o.n_mcmc < 0:
        raise ValueError(f"--n-mcmc must be >= 0, got {o.n_mcmc}")
    block = o.block_size if o.block_size is not None else max(1, o.max_new_tokens // 4)
    return MH(block_size=block, n_mcmc=o.n_mcmc, proposal=_proposal(o), progress=o.progress), \
        {"chains": o.particles}


def _plain(o: MethodOptions) -> tuple[Any, dict]:
    return Plain(n=o.particles), {}


def _lowtemp(o: MethodOptions) -> tuple[Any, dict]:
    return LowTemperature(tau=o.tau if o.tau is not None else 1.0 / o.alpha, n=o.particles), {}


def _greedy(o: MethodOptions) -> tuple[Any, dict]:
    return Greedy(), {}


def _bestofn(o: MethodOptions) -> tuple[Any, dict]:
    return BestOfN(n=o.particles), {}


def _reweight(o: MethodOptions) -> tuple[Any, dict]:
    from .inference.reweight import Reweight

    return Reweight(n=o.particles, progress=o.progress), {}


def _lookahead(o: MethodOptions) -> tuple[Any, dict]:
    return ScalablePower(top_k=o.top_k, rollouts=o.rollouts, horizon=o.horizon, n=o.particles), {}


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


def build_method(name: str, source: "MethodOptions | argparse.Namespace | None" = None,
                 **options: Any) -> Method:
    """The method ``name`` built from typed keyword arguments (the fields of
    :class:`MethodOptions`: ``build_method("smc", particles=16, alpha=4.0, schedule="linear")``),
    applied over ``source`` (a :class:`MethodOptions` or a parsed ``argparse.Namespace``) when
    given.  An unknown name or option, or a malformed value, is a one-line ``ValueError``."""
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; choose from {', '.join(sorted(METHODS))}")
    known = {f.name for f in dataclasses.fields(MethodOptions)}
    unknown = sorted(set(options) - known)
    if unknown:
        raise ValueError(f"unknown method option(s) {', '.join(unknown)}; the options are {', '.join(sorted(known))}")
    opts = _options(source) if source is not None else MethodOptions()
    if options:
        opts = dataclasses.replace(opts, **options)
    check_sampler_options(opts, name)
    return METHODS[name](opts, name)


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


# ------------------------------------------------------------------ recipes
@dataclass(frozen=True)
class MethodRecipe:
    """A picklable recipe for a :class:`Method`: its name and options (calling it builds one).

    Used wherever the method must be built elsewhere (a Ray actor) or several times.
    """

    name: str
    options: tuple[tuple[str, Any], ...]

    @classmethod
    def from_args(cls, args: Any, name: str | None = None) -> "MethodRecipe":
        """The recipe of ``args.method`` (or ``name``) with the :class:`MethodOptions` read from
        ``args``; no progress bar of the engine's own (inside a dataset run, the run has one)."""
        name = name or args.method
        if name not in METHODS:
            raise ValueError(f"unknown method {name!r}; choose from {', '.join(sorted(METHODS))}")
        opts = MethodOptions.from_namespace(args, progress=False)
        return cls(name, tuple(sorted(dataclasses.asdict(opts).items())))

    @classmethod
    def of(cls, name: str, **options: Any) -> "MethodRecipe":
        """The recipe of ``build_method(name, **options)`` (typed keyword options, checked now)."""
        method = build_method(name, **options)   # fails here, not inside a remote actor
        del method
        opts = dataclasses.replace(MethodOptions(), **options)
        return cls(name, tuple(sorted(dataclasses.asdict(opts).items())))

    def __call__(self) -> Method:
        return build_method(self.name, MethodOptions(**dict(self.options)))

    @property
    def sharpened(self) -> bool:
        return METHODS[self.name].sharpened


def constraint_args(args: Any) -> tuple[str, str] | None:
    """``--regex PATTERN`` / ``--json-schema FILE`` as ``(kind, text)`` (None without either), checked
    in one line before the model loads: at most one of them, a readable file holding a JSON object,
    a pattern / schema llguidance compiles."""
    regex, path = getattr(args, "regex", None), getattr(args, "json_schema", None)
    if regex is not None and path is not None:
        raise ValueError("--regex and --json-schema are two constraints: give one")
    if regex is not None:
        spec = ("regex", regex)
    elif path is not None:
        import json

        try:
            with open(path, encoding="utf-8") as f:
                text = f.read()
        except OSError as exc:
            raise ValueError(f"--json-schema {path}: {exc.strerror or exc}") from None
        try:
            json.loads(text)
        except json.JSONDecodeError as exc:
            raise ValueError(f"--json-schema {path}: not JSON ({exc.msg} at line {exc.lineno} column {exc.colno})") from None
        spec = ("json_schema", text)
    else:
        return None
    make_constraint(spec)
    return spec


def make_constraint(spec: tuple[str, str]) -> Any:
    """The potential of a ``(kind, text)`` constraint: ``pp.constraints.Regex`` or ``JSONSchema``."""
    from .targets import constraints

    kind, text = spec
    return constraints.Regex(text) if kind == "regex" else constraints.JSONSchema(text)


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
    #: a grammar constraint ``(kind, text)``: ``("regex", pattern)`` or ``("json_schema", schema JSON)``
    constraint: tuple[str, str] | None = None

    @classmethod
    def from_args(cls, args: Any, sharpened: bool = True, device: str | None = None) -> "TargetRecipe":
        from .options import resolve_device

        return cls(model=args.model, alpha=float(args.alpha) if sharpened else 1.0,
                   chat=not getattr(args, "no_chat", False), device=resolve_device(device or args.device),
                   dtype=args.dtype, backend=getattr(args, "backend", "hf"),
                   truncation=getattr(args, "truncation", None) or "keep", constraint=constraint_args(args))

    def __call__(self) -> Any:
        from .options import resolve_dtype

        lm = load_model(self.model, device=self.device, dtype=resolve_dtype(self.dtype, self.device, self.backend),
                        backend=self.backend)
        chat = self.chat and getattr(getattr(lm, "tokenizer", None), "chat_template", None) is not None
        potential = Power(self.alpha) if self.constraint is None else Power(self.alpha) * make_constraint(self.constraint)
        return Target(lm, potential, chat=chat, truncation=self.truncation)

    def on_device(self, device: str) -> "TargetRecipe":
        """The same recipe loading the model on ``device`` (a CPU recipe moved to a GPU actor)."""
        import dataclasses

        return self if self.device != "cpu" else dataclasses.replace(self, device=device)

    def config(self, target: Any = None) -> dict[str, Any]:
        """The fields that define the target; ``chat`` is the loaded ``target``'s (whether the model
        has a chat template is known once it loads), the requested one when ``target`` is None."""
        chat = self.chat if target is None else target.chat
        config = {"model": self.model or "default", "backend": self.backend, "dtype": self.dtype,
                  "target_alpha": self.alpha, "chat": bool(chat)}
        if self.truncation != "keep":  # absent for "keep", so files written before --truncation still resume
            config["truncation"] = self.truncation
        if self.constraint is not None:  # absent without one, so files written before it still resume
            config["constraint"] = list(self.constraint)
        return config
