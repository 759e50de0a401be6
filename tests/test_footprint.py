"""The memory guard counts what each engine holds at its peak (issue 39, item 2).

A meter wraps the HF decoding states (dynamic and static caches) of tiny Llamas: after every
operation that allocates or frees cache (prefill, forward, reorder, copy, truncate, compact)
it sums, over every live state of an LM (forks and proposal copies included), the KV cells
held (rows × columns of the cache) and the rows of next-token log-probs kept.  Each engine's
declared footprint (``llmppl.inference.footprint``), turned into columns the way the
guard does (:meth:`Footprint.columns`), must be at least the measured peak; the bare
``rows × (prompt + T)`` that ``lm.start`` checks is what MH and look-ahead used to be sized by.
"""

from __future__ import annotations

import functools
import weakref

import pytest
import torch

import llmppl as pp
from llmppl.inference import footprint as fpm
from llmppl.models.hf import HFLM, HFState
from llmppl.models.memory import Footprint, NotEnoughMemory, estimate_memory, kv_bytes_per_token
from llmppl.models.static import StaticHFState

from tiny_models import tiny_model

PROMPTS = [[1, 5, 9, 4], [1, 7]]      # ragged: rows are left-padded to the longest
T = 10


class Meter:
    """Peak KV cells and kept logit rows over the live states of each LM."""

    def __init__(self) -> None:
        self.states: weakref.WeakSet = weakref.WeakSet()
        self.cells: dict[int, int] = {}
        self.logit_rows: dict[int, int] = {}

    def sample(self) -> None:
        cells: dict[int, int] = {}
        logits: dict[int, int] = {}
        for st in list(self.states):
            cache = getattr(st, "_kv", None) or getattr(st, "cache", None)
            layers = getattr(cache, "layers", None)
            if not layers or getattr(layers[0], "keys", None) is None:
                continue
            k = layers[0].keys
            key = id(st.lm)
            cells[key] = cells.get(key, 0) + k.shape[0] * k.shape[2]
            last = getattr(st, "last", None)
            logits[key] = logits.get(key, 0) + (last.shape[0] if last is not None else 0)
        for key, v in cells.items():
            self.cells[key] = max(self.cells.get(key, 0), v)
        for key, v in logits.items():
            self.logit_rows[key] = max(self.logit_rows.get(key, 0), v)


METHODS = {HFState: ("_forward", "reorder", "copy", "truncate", "_compact", "_refresh"),
           StaticHFState: ("_forward", "reorder", "copy", "truncate", "_grow", "_block", "_run")}


@pytest.fixture
def meter(monkeypatch):
    m = Meter()
    for cls, names in METHODS.items():
        init = cls.__init__

        def metered_init(self, *a, __init=init, **kw):
            __init(self, *a, **kw)
            m.states.add(self)
            m.sample()

        monkeypatch.setattr(cls, "__init__", metered_init)
        for name in names:
            if not hasattr(cls, name):
                continue
            fn = getattr(cls, name)

            @functools.wraps(fn)
            def metered(self, *a, __fn=fn, **kw):
                out = __fn(self, *a, **kw)
                if isinstance(out, (HFState, StaticHFState)):
                    m.states.add(out)
                m.sample()
                return out

            monkeypatch.setattr(cls, name, metered)
    return m


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models: one torch thread (two on a loaded 2-core machine only contend)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@functools.lru_cache(maxsize=None)
def _model(seed: int):
    return tiny_model("llama", seed=seed)


def _lm(static: bool = False, seed: int = 0) -> HFLM:
    return HFLM(_model(seed), static_cache=static, cuda_graph=False)


def _declared_cells(lm, fp: Footprint) -> int:
    return fp.rows * fp.columns(bool(lm.static_cache))


def _check(meter: Meter, needs, old_rows: int) -> dict:
    """Every LM's declared footprint covers its measured peak; returns the ratios for the record."""
    out = {}
    for lm, fp in needs:
        measured = meter.cells.get(id(lm), 0)
        assert measured > 0
        declared = _declared_cells(lm, fp)
        assert declared >= measured, f"{fp.what}: declared {declared} KV cells < measured peak {measured}"
        assert fp.logit_rows >= meter.logit_rows[id(lm)], f"{fp.what}: logit rows"
        kv = kv_bytes_per_token(lm)
        assert estimate_memory(lm, fp)["kv_cache"] == declared * kv     # what the guard compares
        old = old_rows * ((max(map(len, PROMPTS)) + T) + (1 if lm.static_cache else 0))
        out[fp.what] = (measured / old, declared / old)
    return out


def _engines(lm: HFLM, draft: HFLM):
    la = pp.proposals.Lookahead(top_k=2, rollouts=2, horizon=3)
    return {
        "smc": (pp.SMC(3), fpm.smc_footprint, {}),
        "smc-lookahead": (pp.SMC(3, proposal=la), fpm.smc_footprint, {}),
        "smc-fromlm": (pp.SMC(3, proposal=pp.proposals.FromLM(draft)), fpm.smc_footprint, {}),
        "smc-rejuvenate": (pp.SMC(3, ess_threshold=1.0, rejuvenate=pp.MH(block_size=4, n_mcmc=1)),
                           fpm.smc_footprint, {}),
        "mh": (pp.MH(block_size=4, n_mcmc=2), fpm.mh_footprint, {"chains": 3}),
        "plain": (pp.baselines.Plain(n=3), fpm.decoder_footprint, {}),
        "bestofn": (pp.baselines.BestOfN(n=3), fpm.decoder_footprint, {}),
        "scalable-power": (pp.samplers.ScalablePower(top_k=2, rollouts=2, horizon=3, n=3),
                           fpm.decoder_footprint, {}),
    }


RATIOS: dict = {}


@pytest.mark.parametrize("static", [False, True], ids=["dynamic", "static"])
@pytest.mark.parametrize("name", ["smc", "smc-lookahead", "smc-fromlm", "smc-rejuvenate", "mh", "plain",
                                  "bestofn", "scalable-power"])
def test_the_declared_footprint_covers_the_measured_peak(meter, name, static):
    lm, draft = _lm(static), _lm(static, seed=1)
    target = pp.Target(lm, pp.Power(2.0))
    engine, fn, kw = _engines(lm, draft)[name]
    if name == "mh":
        engine.run_batch(target, PROMPTS, T, seed=0, **kw)
        needs = fn(engine, target, PROMPTS, T, kw["chains"])
        old_rows = len(PROMPTS) * kw["chains"]
    else:
        engine.run_batch(target, PROMPTS, T, seed=0)
        decoder = engine._decoder() if hasattr(engine, "_decoder") else engine
        needs = fn(decoder, target, PROMPTS, T)
        old_rows = len(PROMPTS) * (engine.n if hasattr(engine, "_decoder") else engine.n_particles)
    RATIOS[(name, static)] = _check(meter, needs, old_rows)
    print(name, "static" if static else "dynamic",
          {k: f"measured {m:.2f}x, declared {d:.2f}x of rows x (prompt + T)" for k, (m, d) in RATIOS[(name, static)].items()})


def test_engines_refuse_what_only_their_footprint_shows(monkeypatch):
    """Free memory between the bare ``rows × (prompt + T)`` estimate and the engine's footprint:
    ``lm.start`` alone would admit the run, the engine refuses it before starting."""
    from llmppl.models import memory

    lm = _lm()
    target = pp.Target(lm, pp.Power(2.0))
    L = max(map(len, PROMPTS)) + T
    cases = [(pp.MH(block_size=4, n_mcmc=1), lambda e: e.init(target, PROMPTS, T, chains=3), 6),
             (pp.samplers.ScalablePower(top_k=2, rollouts=2, horizon=3, n=3),
              lambda e: e.init(target, PROMPTS, T), 6)]
    for engine, init, rows in cases:
        bare = estimate_memory(lm, rows, L)["total"]
        monkeypatch.setattr(memory, "available_memory", lambda device, free=int(bare / memory.HEADROOM) + 1: free)
        lm.start(PROMPTS, rows // len(PROMPTS), max_new_tokens=T)          # the bare start fits
        with pytest.raises(NotEnoughMemory, match=r"needs about .* available"):
            init(engine)


def test_smc_refuses_what_only_its_footprint_shows(monkeypatch):
    """SMC with a look-ahead proposal: the fork's rows, not the particles', decide."""
    from llmppl.models import memory

    lm = _lm()
    target = pp.Target(lm, pp.Power(2.0))
    bare = estimate_memory(lm, 6, max(map(len, PROMPTS)) + T)["total"]
    monkeypatch.setattr(memory, "available_memory", lambda device: int(bare / memory.HEADROOM) + 1)
    smc = pp.SMC(3, proposal=pp.proposals.Lookahead(top_k=2, rollouts=2, horizon=3))
    with pytest.raises(NotEnoughMemory):
        smc.init(target, PROMPTS, T, seed=0)


def test_footprints_on_one_device_are_summed(monkeypatch):
    """A target LM and its FromLM draft on one device share its free memory."""
    from llmppl.models import memory

    lm, draft = _lm(), _lm(seed=1)
    target = pp.Target(lm, pp.Power(2.0))
    needs = fpm.smc_footprint(pp.SMC(3, proposal=pp.proposals.FromLM(draft)), target, PROMPTS, T)
    assert {id(x) for x, _ in needs} == {id(lm), id(draft)}
    each = max(estimate_memory(x, fp)["total"] for x, fp in needs)
    total = sum(estimate_memory(x, fp)["total"] for x, fp in needs)
    free = int(each / memory.HEADROOM) + 1
    assert total > memory.HEADROOM * free
    with pytest.raises(NotEnoughMemory, match="FromLM proposal state"):
        fpm.check_fits(needs, available=free)
    assert fpm.check_fits(needs, available=2 * total)["total"] == total


def test_a_backend_that_sizes_its_own_memory_is_not_checked():
    lm = pp.models.NGramLM(vocab_size=5, seed=1)
    fp = Footprint(10**9, 10**6)
    assert lm.memory_needed(fp) is None
    assert fpm.check_fits([(lm, fp)], available=1)["total"] == 0
