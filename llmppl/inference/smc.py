"""``SMC``: sequential Monte Carlo over completions (Power-SMC and its generalisations).

Step ``t`` targets ``γ_t(y_≤t) = p(y_≤t)^{a_t} · Π_k φ_k^next(y_≤t) · ψ_t(y_≤t)``.  A
particle that draws ``y_t ~ q_t`` (a token or a block) gets the incremental log-weight

    log w_t = a_t log p(y_t|y_<t) + log φ^next(y_t) + (a_t − a_{t−1}) log p(y_<t)
            + log ψ_t(y_≤t) − log ψ_{t−1}(y_<t) − log q_t(y_t|y_<t);

a particle that ends (EOS, or cut at ``max_new_tokens``) is promoted to the final
target at once: ``+ (α − a_t) log p(y) + log φ_complete(y) − log ψ_{t−1}``, and carries
increments of 0 afterwards (it is never fed to the LM again).  The evidence estimate
``log Ẑ = Σ_t log Σ_i W̄^i_{t−1} w^i_t`` is unbiased in ``Ẑ`` (DESIGN.md §1).
"""

from __future__ import annotations

import math
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from ..models.base import LanguageModelError
from ..targets.target import Target
from .common import AllParticlesDied, Stopwatch, make_generator, peak_memory, prepare_run, run_each
from .moves import MoveContext
from .proposals import LocallyOptimal, Proposal, ProposalContext, Tempered
from .resampling import ess as ess_of, get_resampler
from .result import Result
from .schedules import Schedule, ScheduleContext, conditional_ess, get_schedule
from .steps import Step, get_step

@dataclass
class _Particles:
    """Per-particle bookkeeping of one run (CPU, float64 accumulators)."""

    n: int
    log_w: torch.Tensor = field(init=False)       # log-weights, LSE(log_w) − log N = log Ẑ so far
    log_p: torch.Tensor = field(init=False)       # log p(y_≤t | x)
    log_other: torch.Tensor = field(init=False)   # Σ_s non-Power token increments
    log_twist: torch.Tensor = field(init=False)   # log ψ_t(y_≤t)  (0 once ended)
    finished: torch.Tensor = field(init=False)    # ended with EOS
    truncated: torch.Tensor = field(init=False)   # cut at max_new_tokens
    dead: torch.Tensor = field(init=False)        # weight −∞: no more compute
    promoted: torch.Tensor = field(init=False)    # ended and promoted to the final target
    tail: list[list[int]] = field(init=False)     # sampled tokens never fed to the LM (the cut token)

    def __post_init__(self) -> None:
        z = torch.zeros(self.n, dtype=torch.float64)
        self.log_w, self.log_p, self.log_other, self.log_twist = z.clone(), z.clone(), z.clone(), z.clone()
        b = torch.zeros(self.n, dtype=torch.bool)
        self.finished, self.truncated, self.dead, self.promoted = b.clone(), b.clone(), b.clone(), b.clone()
        self.tail = [[] for _ in range(self.n)]

    @property
    def done(self) -> torch.Tensor:
        return self.finished | self.truncated | self.dead

    def reorder(self, idx: torch.Tensor) -> None:
        for name in ("log_w", "log_p", "log_other", "log_twist", "finished", "truncated", "dead",
                     "promoted"):
            setattr(self, name, getattr(self, name)[idx].clone())
        self.tail = [list(self.tail[i]) for i in idx.tolist()]


@dataclass
class _Run:
    """Everything one ``SMC.run`` threads through its helper functions."""

    target: Target
    prompt: list[int]
    max_new_tokens: int
    state: Any
    proposal: Proposal
    generator: torch.Generator
    resample_generator: torch.Generator
    parts: _Particles
    alpha: float
    log_Z: float = 0.0
    causes: dict[int, str] = field(default_factory=dict)   # particle -> why its weight is −∞
    steps: dict[str, list] = field(default_factory=dict)
    resampling_count: int = 0
    moves_accepted: int = 0
    tokens_sampled: int = 0

    def record(self, **values: Any) -> None:
        for k, v in values.items():
            self.steps.setdefault(k, []).append(v)


class SMC:
    """Sequential Monte Carlo over completions of a :class:`~llmppl.Target`.

    ``proposal``: a :class:`~llmppl.proposals.Proposal` (default ``Tempered()``, i.e.
    ``q ∝ p^{a_t}``, for targets with a ``Power`` factor; ``LocallyOptimal()`` otherwise).
    ``resampling``: a name in ``pp.resampling.RESAMPLERS`` or a callable; resample when
    ``ESS < ess_threshold · N`` (1: every step, 0: never).  ``schedule``: an exponent
    bridge from ``pp.schedules`` (default ``Constant()``).  ``step``: ``"token"``,
    ``pp.steps.Tokens(k)`` or ``pp.steps.Until(delimiter, max_tokens)``.  ``rejuvenate``:
    a kernel with ``move(MoveContext) -> int`` applied after each resampling.
    """

    def __init__(
        self,
        n_particles: int,
        proposal: Proposal | None = None,
        resampling: str | Any = "systematic",
        ess_threshold: float = 0.5,
        schedule: Schedule | None = None,
        step: str | Step = "token",
        rejuvenate: Any = None,
        select: str = "sample",
        progress: bool = False,
    ) -> None:
        if isinstance(n_particles, bool) or not isinstance(n_particles, int) or n_particles < 1:
            raise ValueError(f"n_particles must be an int >= 1, got {n_particles!r}")
        try:
            kappa = float(ess_threshold)
        except (TypeError, ValueError):
            raise ValueError(f"ess_threshold must be a number in [0, 1], got {ess_threshold!r}") from None
        if not 0.0 <= kappa <= 1.0:
            raise ValueError(f"ess_threshold must be in [0, 1], got {ess_threshold!r}")
        if proposal is not None and not isinstance(proposal, Proposal):
            raise ValueError(f"proposal must be a llmppl Proposal, got {type(proposal).__name__}")
        if rejuvenate is not None and not callable(getattr(rejuvenate, "move", None)):
            raise ValueError("rejuvenate must have a move(MoveContext) -> int method")
        if select not in ("sample", "max"):
            raise ValueError(f"select must be 'sample' or 'max', got {select!r}")
        self.n_particles = n_particles
        self.proposal = proposal
        self.resampling = resampling
        self.resampler = get_resampler(resampling)
        self.ess_threshold = kappa
        self.schedule = get_schedule(schedule)
        self.step = get_step(step)
        self.rejuvenate = rejuvenate
        self.select = select
        self.progress = progress

    def __repr__(self) -> str:
        return (f"SMC(n_particles={self.n_particles}, proposal={self.proposal!r}, "
                f"resampling={self.resampling!r}, ess_threshold={self.ess_threshold:g}, "
                f"schedule={self.schedule!r}, step={self.step!r})")

    # ------------------------------------------------------------------ run
    def run(self, target: Target, prompt: str | Sequence[int] | Sequence[dict], max_new_tokens: int,
            seed: int | None = None) -> Result:
        """Run SMC; return the weighted particles, ``log Ẑ`` and per-step traces."""
        prompt_ids, generator = prepare_run(target, prompt, max_new_tokens, seed)
        lm = target.lm
        self.step.check(lm)
        proposal = self.proposal or (Tempered() if target.base_exponent > 0 else LocallyOptimal())
        if self.rejuvenate is not None and type(proposal).on_extend is not Proposal.on_extend:
            raise ValueError(
                f"rejuvenate cannot be combined with the stateful proposal {proposal!r}: moves change "
                "particles behind the proposal's own decoding state")
        resample_gen = generator if generator.device.type == "cpu" else make_generator(
            None if seed is None else seed + 1)
        N = self.n_particles
        with Stopwatch(lm.device) as watch:
            state = lm.start(prompt_ids, N)
            proposal.start(target, prompt_ids, N)
            run = _Run(target, prompt_ids, max_new_tokens, state, proposal, generator, resample_gen,
                       _Particles(N), float(target.base_exponent))
            self._loop(run)
        return self._result(run, prompt_ids, seed, watch.seconds)

    def run_batch(self, target: Target, prompts: Sequence[str | Sequence[int] | Sequence[dict]],
                  max_new_tokens: int, seed: int | None = None) -> list[Result]:
        """One ``Result`` per prompt, in order."""
        return run_each(self.run, target, prompts, max_new_tokens, seed)

    def _loop(self, run: _Run) -> None:
        from tqdm.auto import tqdm

        bar = tqdm(total=run.max_new_tokens, disable=not self.progress, file=sys.stderr,
                   desc="SMC", unit="tok")
        a_prev = self.schedule.initial(run.alpha)
        t, depth = 0, 0
        try:
            while not bool(run.parts.done.all()):
                t += 1
                a = self._exponent(run, t, a_prev)
                log_w_before = run.parts.log_w.clone()
                inc = self._propose_block(run, t, a, a_prev)
                self._promote(run, inc, a)
                self._update_twists(run, inc)
                self._reweight(run, t, a, inc, log_w_before)
                if not bool(run.parts.done.all()):
                    self._maybe_resample(run, t, a)
                else:
                    self._record_no_resampling(run)
                if self.progress:
                    new_depth = max(len(run.state.tokens[i]) + len(run.parts.tail[i])
                                    for i in range(run.parts.n))
                    bar.update(new_depth - depth)
                    bar.set_postfix(ess=f"{run.steps['ess'][-1]:.1f}", a=f"{a:g}")
                    depth = new_depth
                a_prev = a
        finally:
            bar.close()

    # ----------------------------------------------------------- the pieces
    def _exponent(self, run: _Run, t: int, a_prev: float) -> float:
        """``a_t`` from the schedule; the prediction for adaptive schedules is computed lazily."""
        parts = run.parts
        alive = (~parts.done).nonzero().flatten()

        cache: dict[str, torch.Tensor] = {}

        def predict(a: float) -> torch.Tensor:
            if "lp" not in cache:
                lp = run.state.logprobs(alive).double()
                batch = run.target.batch(run.prompt, [run.state.tokens[i] for i in alive.tolist()], lp)
                other = run.target.log_next_other(batch)
                cache["lp"] = lp.cpu()
                cache["other"] = (torch.zeros_like(lp) if other is None else other.double()).cpu()
            out = torch.zeros(parts.n, dtype=torch.float64)
            out[alive] = (a - a_prev) * parts.log_p[alive] + torch.logsumexp(
                a * cache["lp"] + cache["other"], dim=-1)
            return out

        ctx = ScheduleContext(step=t, previous=a_prev, final=run.alpha,
                              log_weights=parts.log_w, predict=predict)
        return float(self.schedule.exponent(ctx))

    def _propose_block(self, run: _Run, t: int, a: float, a_prev: float) -> torch.Tensor:
        """Extend every live particle by one step (a token or a block); return the
        incremental log-weights without promotion and twist terms."""
        parts, state, lm = run.parts, run.state, run.target.lm
        inc = torch.zeros(parts.n, dtype=torch.float64)
        alive = (~parts.done).nonzero().flatten()
        inc[alive] = (a - a_prev) * parts.log_p[alive]          # retroactive exponent change
        segment: dict[int, list[int]] = {i: [] for i in alive.tolist()}
        active = alive
        while len(active):
            v, lp_v, tok_inc = self._propose_token(run, t, a, active)
            rows = active.tolist()
            parts.log_p[active] += lp_v
            inc[active] += tok_inc
            run.tokens_sampled += len(rows)
            toks = v.tolist()
            eos = torch.tensor([x == lm.eos_token_id for x in toks], dtype=torch.bool)
            cut = ~eos & torch.tensor([len(state.tokens[i]) + 1 >= run.max_new_tokens for i in rows],
                                      dtype=torch.bool)
            dead = ~torch.isfinite(inc[active])
            for k in dead.nonzero().flatten().tolist():
                run.causes.setdefault(rows[k], "the drawn token has zero target density "
                                      "(a token mask / constraint excludes it)")
            grow = ~eos & ~cut & ~dead
            if bool(grow.any()):
                sel = grow.nonzero().flatten()
                state.extend(v[sel.to(v.device)], active[sel])
                run.proposal.on_extend([[toks[k]] for k in sel.tolist()], active[sel])
            for k in cut.nonzero().flatten().tolist():
                parts.tail[rows[k]] = [toks[k]]
            parts.finished[active[eos]] = True
            parts.truncated[active[cut]] = True
            parts.dead[active[dead]] = True
            ended = active[eos | cut | dead]
            if len(ended):
                state.finish(ended)
                run.proposal.on_finish(ended)
            nxt = []
            for k in grow.nonzero().flatten().tolist():
                seg = segment[rows[k]]
                seg.append(toks[k])
                if not self.step.ends(seg, lm):
                    nxt.append(rows[k])
            active = torch.tensor(nxt, dtype=torch.long)
        run.steps.setdefault("segment_length", []).append(max((len(s) for s in segment.values()), default=0))
        return inc

    def _propose_token(self, run: _Run, t: int, a: float, active: torch.Tensor
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Draw one token for each ``active`` row; return (tokens, log p of them, weight terms
        ``a_t log p + log φ^next − log q``) — the latter two float64 on the CPU."""
        lp = run.state.logprobs(active)
        _check_logprobs(lp, active, t, run.target.lm.name)
        batch = run.target.batch(run.prompt, [run.state.tokens[i] for i in active.tolist()], lp)
        ctx = ProposalContext(run.target, batch, run.state, active, a, run.generator)
        log_q = run.proposal.log_probs(ctx)
        v = run.proposal.sample(log_q, run.generator)
        col = v.to(lp.device)[:, None]
        lp_v = lp.gather(1, col).squeeze(1).double().cpu()
        lq_v = log_q.gather(1, col.to(log_q.device)).squeeze(1).double().cpu()
        tok_inc = a * lp_v - lq_v
        other = run.target.log_next_other(batch)
        if other is not None:
            other_v = other.gather(1, col.to(other.device)).squeeze(1).double().cpu()
            run.parts.log_other[active] += other_v
            tok_inc = tok_inc + other_v
        return v, lp_v, tok_inc

    def _promote(self, run: _Run, inc: torch.Tensor, a: float) -> None:
        """Particles that ended this step jump to the final target:
        ``+ (α − a_t) log p(y) + log φ_complete(y) − log ψ_{t−1}``."""
        parts = run.parts
        ended = (parts.finished | parts.truncated) & ~parts.dead & ~parts.promoted
        rows = ended.nonzero().flatten()
        untwist = torch.zeros(parts.n, dtype=torch.float64)  # log φ_complete − log ψ removed (diagnostics)
        if len(rows):
            inc[rows] += (run.alpha - a) * parts.log_p[rows] - parts.log_twist[rows]
            untwist[rows] -= parts.log_twist[rows]
            parts.log_twist[rows] = 0.0
        if len(rows) and run.target.has_complete:
            idx = rows.tolist()
            batch = run.target.batch(run.prompt, [run.state.tokens[i] + parts.tail[i] for i in idx], None,
                                     parts.finished[rows].tolist(), parts.truncated[rows].tolist())
            lc = run.target.log_complete(batch)
            inc[rows] += lc
            untwist[rows] += lc
            for k in (~torch.isfinite(lc)).nonzero().flatten().tolist():
                run.causes.setdefault(idx[k], "log_complete is -inf (a constraint or reward on "
                                      "finished completions rejects it)")
        parts.promoted[rows] = True
        if run.target.has_twist:
            run.record(untwist=untwist.tolist())

    def _update_twists(self, run: _Run, inc: torch.Tensor) -> None:
        """``+ log ψ_t(y_≤t) − log ψ_{t−1}(y_<t)`` for particles still running."""
        if not run.target.has_twist:
            return
        parts = run.parts
        rows = (~parts.done).nonzero().flatten()
        if len(rows):
            idx = rows.tolist()
            batch = run.target.batch(run.prompt, [run.state.tokens[i] for i in idx], None,
                                     [False] * len(idx), [False] * len(idx))
            tw = run.target.log_twist(batch)
            inc[rows] += tw - parts.log_twist[rows]
            parts.log_twist[rows] = tw
            for k in (~torch.isfinite(tw)).nonzero().flatten().tolist():
                run.causes.setdefault(idx[k], "the twist log ψ (log_prefix) is -inf")
        run.record(twist=parts.log_twist.tolist())

    def _reweight(self, run: _Run, t: int, a: float, inc: torch.Tensor, log_w_before: torch.Tensor) -> None:
        """``log w += inc``; ``log Ẑ += log Σ_i W̄_i w_i``; kill −∞ particles; record the step."""
        parts = run.parts
        new = parts.log_w + inc
        lse_new = torch.logsumexp(new, 0)
        if not torch.isfinite(lse_new):
            raise AllParticlesDied(_all_dead_message(run, t))
        incr = float(lse_new - torch.logsumexp(log_w_before, 0))
        run.log_Z += incr
        parts.log_w = new
        newly_dead = ~torch.isfinite(new) & ~parts.dead
        if bool(newly_dead.any()):
            rows = newly_dead.nonzero().flatten()
            live = rows[~parts.done[rows]]
            if len(live):
                run.state.finish(live)
                run.proposal.on_finish(live)
            parts.dead[rows] = True
        run.record(
            exponent=a,
            log_weights=new.tolist(),
            ess=ess_of(new),
            conditional_ess=conditional_ess(log_w_before, inc),
            log_evidence_increment=incr,
            alive=int((~parts.done).sum()),
        )

    def _maybe_resample(self, run: _Run, t: int, a: float) -> None:
        """Resample when ``ESS < κ N`` (always for κ = 1); then rejuvenate."""
        parts = run.parts
        N = parts.n
        ess = run.steps["ess"][-1]
        if not (self.ess_threshold >= 1.0 or (self.ess_threshold > 0 and ess < self.ess_threshold * N)):
            self._record_no_resampling(run)
            return
        w = torch.exp(parts.log_w - parts.log_w.max())
        idx = self.resampler(run.resample_generator, w, N).long().cpu()
        run.state.reorder(idx)
        run.proposal.on_reorder(idx)
        parts.reorder(idx)
        # equal weights after resampling, scaled so that LSE(log_w) − log N = log Ẑ
        parts.log_w = torch.full((N,), run.log_Z, dtype=torch.float64)
        run.resampling_count += 1
        run.record(resampled=True, ancestors=idx.tolist(), unique=len(set(idx.tolist())))
        if self.rejuvenate is not None:
            rows = (~parts.done).nonzero().flatten()
            accepted = 0
            if len(rows):
                ctx = MoveContext(run.target, run.state, rows, a, parts.log_p, parts.log_other,
                                  parts.log_twist, run.generator, step=t)
                accepted = int(self.rejuvenate.move(ctx))
            run.moves_accepted += accepted
            run.record(moves_accepted=accepted, unique_after_move=_distinct_sequences(run))

    def _record_no_resampling(self, run: _Run) -> None:
        N = run.parts.n
        run.record(resampled=False, ancestors=list(range(N)), unique=N)
        if self.rejuvenate is not None:
            run.record(moves_accepted=0, unique_after_move=_distinct_sequences(run))

    # --------------------------------------------------------------- result
    def _result(self, run: _Run, prompt_ids: list[int], seed: int | None, seconds: float) -> Result:
        parts, state, lm = run.parts, run.state, run.target.lm
        samples = [list(state.tokens[i]) + list(parts.tail[i]) for i in range(parts.n)]
        texts = [lm.decode(s) for s in samples] if lm.tokenizer is not None else None
        stats = {
            "forward_passes": int(state.forward_passes),
            "tokens_decoded": int(state.tokens_decoded),
            "tokens_sampled": int(run.tokens_sampled),
            "wall_time": seconds,
            "peak_memory": peak_memory(lm.device),
            "resampling_count": run.resampling_count,
            "n_steps": len(run.steps.get("ess", [])),
        }
        if self.rejuvenate is not None:
            stats["moves_accepted"] = run.moves_accepted
        config = {
            "n_particles": parts.n, "proposal": repr(run.proposal), "resampling": str(self.resampling),
            "ess_threshold": self.ess_threshold, "schedule": repr(self.schedule), "step": repr(self.step),
            "rejuvenate": repr(self.rejuvenate) if self.rejuvenate is not None else None,
            "target": repr(run.target), "max_new_tokens": run.max_new_tokens,
        }
        return Result(
            method="smc", prompt_ids=list(prompt_ids), samples=samples,
            log_weights=parts.log_w.tolist(), texts=texts,
            finished=parts.finished.tolist(), truncated=parts.truncated.tolist(),
            log_p=parts.log_p.tolist(), log_evidence=run.log_Z, steps=run.steps, stats=stats,
            config=config, seed=seed, select=self.select,
        )


# ------------------------------------------------------------------ helpers
def _distinct_sequences(run: _Run) -> int:
    """Number of distinct particle sequences (what rejuvenation moves increase)."""
    return len({tuple(run.state.tokens[i]) + tuple(run.parts.tail[i]) for i in range(run.parts.n)})


def _check_logprobs(lp: torch.Tensor, rows: torch.Tensor, t: int, name: str) -> None:
    bad = torch.isnan(lp).any(dim=1) | torch.isposinf(lp).any(dim=1)
    if bool(bad.any()):
        k = int(bad.nonzero()[0, 0])
        raise LanguageModelError(
            f"{name} produced NaN/+inf log-probabilities for particle {int(rows[k])} at SMC step {t}")


def _all_dead_message(run: _Run, t: int) -> str:
    causes: dict[str, int] = {}
    for c in run.causes.values():
        causes[c] = causes.get(c, 0) + 1
    why = "; ".join(f"{n} particle(s): {c}" for c, n in causes.items()) or "unknown cause"
    return (f"SMC step {t}: every particle has weight zero (log-weight -inf), so the target "
            f"{run.target!r} gives zero density to all of them — {why}. A constraint that nothing "
            f"satisfies, or a proposal whose support misses the target's?")


__all__ = ["SMC"]
