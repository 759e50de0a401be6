"""``SMC``: sequential Monte Carlo over completions (Power-SMC and its generalisations), as a kernel.

Step ``t`` targets ``γ_t(y_≤t) = p(y_≤t)^{a_t} · Π_k φ_k^next(y_≤t) · ψ_t(y_≤t)``.  A
particle that draws ``y_t ~ q_t`` (a token, a block or a segment) gets the incremental log-weight

    log w_t = a_t log p(y_t|y_<t) + log φ^next(y_t) − log q_t(y_t|y_<t)      (the draw)
            + Σ_terms increment                                                (weight terms)

where the terms (:mod:`~llmppl.inference.terms`) are supplied by the parts of the run: the
schedule's bridge ``(a_t − a_{t−1}) log p(y_<t)``, the promotion of a particle that ended to
the final target ``(α − a_t) log p(y) + log φ_complete(y)``, the target's twists
``log ψ_t − log ψ_{t−1}`` and a step kind's own (the segment look-ahead twist).  Then
``log Ẑ += log Σ_i W̄^i_{t−1} w^i_t`` per prompt (unbiased in ``Ẑ``, DESIGN.md §1), and the
prompts whose ``ESS < κN`` resample.

The kernel::

    state = smc.init(target, prompts, max_new_tokens, seed=0)   # SMCState; its plan is frozen
    while not state.done:
        state, info = smc.step(state)                           # SMCInfo: ESS, resampled, a_t, …
    results = smc.results(state)                                # one Result per prompt

``G`` prompts × ``N`` particles are one decoding state of ``G·N`` rows.  Normalisation, ESS, the
resampling decision, resampling (indices within each prompt's rows), the exponent schedule and
``log Ẑ`` are per prompt, on the ``(G, N)`` view of the weights, so prompts never exchange
particles and each prompt's particles are distributed exactly as in its own ``run``.  Every
per-particle quantity is on the LM's device (:class:`~llmppl.inference.particles.Particles`);
a native step does one small host sync; traces move to the host once, at the end.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from ..models.base import LanguageModelError
from ..models.streams import torch_generator
from ..targets.target import Target
from .capabilities import Needs
from .common import AllParticlesDied, Stopwatch, eos_ids, make_generator, peak_memory, prepare_prompts
from .draw import Drawn, draw_step
from .footprint import check_fits, smc_footprint
from .kernel import Engine, Prompt, StepInfo
from .moves import MoveContext
from .native import NATIVE_HINT, block_temperature, needs, require_full_vocabulary
from .particles import CAUSES, Particles, completions
from .proposal import Proposal
from .proposals import Temperature, default_proposal
from .resampling import (draw_ancestors, draw_ancestors_within, get_resampler, needs_resampling,
                         within_class_ess)
from .result import Result
from .schedules import (BridgeStats, Constant, RealisedTokenVariance, Schedule, ScheduleContext, conditional_ess,
                        get_schedule)
from .steps import Step, get_step
from .terms import CUT_CAUSE, WeightTerm, target_terms
from .weights import reweight

CAUSES[CUT_CAUSE] = "cut at max_new_tokens, and truncation='zero' gives cut completions zero weight"


@dataclass(frozen=True)
class SMCPlan:
    """What an SMC run's configuration implies, decided once at :meth:`SMC.init`.

    ``native``: each block is drawn by the backend (``q ∝ p^{1/τ} · masks``, no other token-level
    factor); ``tokenwise``: one token per ``sample_block`` call (a segment step on the token path,
    or a proposal with its own decoding state); ``segments``: the step ends early (``Until``) —
    natively at its ``end_ids``, checked on the host unless ``certain_ends``;
    ``terms``: the weight terms of every step; ``a_const``: the exponent of every step under a
    constant schedule (``None`` when the schedule moves)."""

    G: int
    N: int
    alpha: float
    max_new_tokens: int
    lm: Any
    proposal: Proposal
    needs: Needs                  # needs(proposal, target)
    step: Step
    native: bool
    drafted: bool                 # the proposal's own LM draws each block; the target scores it
    tokenwise: bool
    segments: bool
    end_ids: tuple[int, ...]      # native segment steps: ids at which a block stops (the step's ends)
    certain_ends: bool            # drawing an end id always ends the step (no host check)
    terms: tuple[WeightTerm, ...]
    stop_ids: tuple[int, ...]
    bridging: bool
    a_const: torch.Tensor | None = None         # (G,) float64
    a_const_rows: torch.Tensor | None = None    # (R,) float64

    @property
    def R(self) -> int:
        return self.G * self.N

    def exponent_rows(self, a: torch.Tensor) -> torch.Tensor:
        """``(R,)``: each prompt's exponent on each of its rows."""
        if a is self.a_const and self.a_const_rows is not None:
            return self.a_const_rows
        return a.repeat_interleave(self.N)


@dataclass
class Trace:
    """What a run records for its results: the step infos, per-slot token counts, host syncs,
    the conditional-ESS inputs and the moves' host records."""

    infos: list["SMCInfo"] = field(default_factory=list)
    counts: dict[str, torch.Tensor] = field(default_factory=dict)
    syncs: int = 0
    cess: list[tuple[torch.Tensor, ...]] = field(default_factory=list)
    moves: dict[str, list[list[int]]] = field(default_factory=dict)

    def count(self, name: str, per_row: torch.Tensor) -> None:
        """Accumulate ``per_row`` (a bool or count per row) per slot; a prompt's total is the sum
        over its slots at the end (resampling moves particles, not the work already done)."""
        total = self.counts.get(name)
        self.counts[name] = per_row.long() if total is None else total + per_row


@dataclass
class SMCState:
    """One batched SMC run (``G`` prompts × ``N`` particles): what :meth:`SMC.init` makes,
    :meth:`SMC.step` advances and :meth:`SMC.results` reads.

    ``particles`` holds every per-particle quantity as device tensors; ``decoding`` is the LM's
    decoding handle (KV cache, also the one home of the particles' tokens); ``proposal_run``
    what the proposal's ``start`` returned for this run; ``term_data`` the weight terms' run
    data.  Nothing of a run lives on the engine or its parts."""

    plan: SMCPlan
    target: Target
    prompts: list[list[int]]
    decoding: Any
    generator: torch.Generator
    particles: Particles
    proposal_run: Any
    a_prev: torch.Tensor      # (G,) the exponent of the last step (the schedule's start before it)
    clock: Stopwatch          # started at init: Result.stats["wall_time"] is init → results
    seed: int | None = None
    t: int = 0                # steps taken
    done: bool = False        # every particle has ended: no step is left
    live: int | None = None   # rows live at this step, known on the host (None: not known)
    term_data: dict[str, Any] = field(default_factory=dict)
    trace: Trace = field(default_factory=Trace)

    @property
    def max_new_tokens(self) -> int:
        return self.plan.max_new_tokens


@dataclass(frozen=True)
class SMCInfo(StepInfo):
    """What one SMC step did, per prompt (device tensors, ``(G,)`` unless said):
    the exponent ``a_t``, the log-weights after reweighting ``(G, N)``, the ESS, the evidence increment, the live particles,
    whether the prompt resampled, its ancestors ``(G, N)`` and distinct ancestors, and the
    terms' records (``twist``, ``untwist``, ``segment_length``)."""

    exponent: torch.Tensor
    log_weights: torch.Tensor     # (G, N) after reweighting, before resampling
    ess: torch.Tensor
    log_evidence_increment: torch.Tensor
    alive: torch.Tensor
    resampled: torch.Tensor
    ancestors: torch.Tensor
    unique: torch.Tensor
    records: dict[str, torch.Tensor] = field(default_factory=dict)


class SMC(Engine[SMCState]):
    """Sequential Monte Carlo over completions of a :class:`~llmppl.Target`.

    ``proposal``: a :class:`~llmppl.proposals.Proposal` (default: ``Temperature()``, i.e.
    ``q ∝ p^{a_t}``, for a pure power target; ``LocallyOptimal()`` when the target has
    token-level factors such as masks).  ``resampling``: a name in
    ``pp.resampling.RESAMPLERS`` or a callable; resample a prompt's particles when their
    ``ESS < ess_threshold · N`` (1: every step, 0: never).  ``schedule``: an exponent
    bridge from ``pp.schedules`` (default ``Constant()``).  ``step``: ``"token"``,
    ``pp.steps.Tokens(k)``, ``pp.steps.Until(delimiter, max_tokens)`` or any
    :class:`~llmppl.steps.Step`.  ``rejuvenate``: a kernel with ``move(MoveContext) -> int``
    applied after each resampling (token steps).
    """

    method = "smc"

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
        self.step_kind = get_step(step)
        if rejuvenate is not None and not needs(self.step_kind).row_wise:
            raise ValueError(
                f"rejuvenate cannot be combined with the segment step {self.step_kind!r}: the MH moves "
                "resample suffixes token by token at a fixed length, which keeps p(y_≤t)^a_t invariant but "
                "not the segment-level target (a segment must end at its delimiter), so the result "
                "would be biased. Use token steps with rejuvenate, or segment steps without it.")
        self.rejuvenate = rejuvenate
        self.select = select
        self.progress = progress

    def __repr__(self) -> str:
        return (f"SMC(n_particles={self.n_particles}, proposal={self.proposal!r}, "
                f"resampling={self.resampling!r}, ess_threshold={self.ess_threshold:g}, "
                f"schedule={self.schedule!r}, step={self.step_kind!r})")

    # ------------------------------------------------------------------ init
    def plan(self, target: Target, G: int, max_new_tokens: int) -> SMCPlan:
        """What this configuration implies for a run of ``G`` prompts on ``target``; refuses, by
        the part's name, a part the backend cannot run (a full-vocabulary part on vLLM)."""
        lm, N = target.lm, self.n_particles
        proposal = self.proposal or default_proposal(target)
        prop_needs = needs(proposal, target)
        if self.rejuvenate is not None and prop_needs.own_state:
            raise ValueError(
                f"rejuvenate cannot be combined with the proposal {proposal!r}, which has its own decoding "
                "state: moves change particles behind it")
        alpha = float(target.base_exponent)
        step_needs = needs(self.step_kind)
        a0 = torch.tensor([self.schedule.initial(alpha)], dtype=torch.float64)
        tau0 = block_temperature(proposal, target, a0)
        native = (not step_needs.full_vocabulary and not prop_needs.full_vocabulary
                  and tau0 is not None and bool(torch.isfinite(tau0).all() and (tau0 >= 0).all()))
        bridging = not isinstance(self.schedule, Constant)
        terms = self.schedule.terms() + self.step_kind.terms() + target_terms(target, bridging)
        a_const = a_const_rows = None
        if not bridging:
            a_const = torch.full((G,), alpha, dtype=torch.float64, device=lm.device)
            a_const_rows = a_const.repeat_interleave(N)
        segments = not step_needs.row_wise
        end_ids, certain = self.step_kind.end_ids(lm) if segments and native else ((), True)
        drafted = bool(proposal.drafts) and not segments and needs(target).full_vocabulary is False
        return SMCPlan(G=G, N=N, alpha=alpha, max_new_tokens=max_new_tokens, lm=lm, proposal=proposal,
                       needs=prop_needs, step=self.step_kind, native=native, drafted=drafted,
                       tokenwise=(segments and not native) or (prop_needs.own_state and not drafted),
                       segments=segments,
                       end_ids=end_ids, certain_ends=certain, terms=terms, stop_ids=eos_ids(lm),
                       bridging=bridging, a_const=a_const, a_const_rows=a_const_rows)

    def _refuse_unnative(self, plan: SMCPlan, target: Target, decoding: Any) -> None:
        """On a backend without full-vocabulary log-probabilities, refuse the first part that
        needs them, by its name."""
        parts = [(needs(self.step_kind), f"SMC with the step {self.step_kind!r}", NATIVE_HINT)]
        parts += [(needs(f), f"SMC with the token-level factor {f!r}", NATIVE_HINT) for f in target.others]
        parts += [(Needs(full_vocabulary=not (plan.native or plan.drafted)), f"SMC with the proposal {plan.proposal!r}",
                   NATIVE_HINT),
                  (needs(self.schedule), f"the schedule {self.schedule!r}",
                   "use pp.schedules.Constant, Linear or Geometric")]
        if self.rejuvenate is not None:      # moves redraw and replay suffixes (forced tokens) in blocks
            parts.append((needs(self.rejuvenate, target), f"rejuvenate={self.rejuvenate!r}",
                          "run SMC without moves, or moves whose proposal is native"))
        for need, what, instead in parts:
            if need.full_vocabulary:
                require_full_vocabulary(decoding, what, instead)

    @torch.inference_mode()
    def init(self, target: Target, prompts: Sequence[Prompt], max_new_tokens: int,
             seed: int | None = None) -> SMCState:
        """The state of a run on ``G`` prompts before its first step: ``N`` particles per prompt
        with ``log w = 0``, ``log Ẑ = 0`` and the empty completion, the LM's decoding state
        started on the prompts (``G·N`` rows), the proposal's and the terms' run state, the
        generator seeded with ``seed``, and the frozen :class:`SMCPlan`.  Bad input (prompts, a
        part the backend cannot run) is refused here, before any decoding."""
        ids = prepare_prompts(target, prompts, max_new_tokens)
        lm = target.lm
        self.step_kind.check(lm)
        G, N, dev = len(ids), self.n_particles, lm.device
        plan = self.plan(target, G, max_new_tokens)
        clock = Stopwatch(dev).start()
        check_fits(smc_footprint(self, target, ids, max_new_tokens))   # the run's peak, before any cache
        decoding = lm.start(ids[0] if G == 1 else ids, N, max_new_tokens=max_new_tokens)
        self._refuse_unnative(plan, target, decoding)
        a0 = torch.full((G,), self.schedule.initial(plan.alpha), dtype=torch.float64, device=dev)
        state = SMCState(plan, target, ids, decoding, make_generator(seed, G * N, dev), Particles(G, N, dev),
                         plan.proposal.start(target, ids, N, max_new_tokens), a0, clock, seed=seed, live=G * N)
        for term in plan.terms:
            term.start(plan, state)
        return state

    # ------------------------------------------------------------------ step
    @torch.inference_mode()
    def step(self, state: SMCState) -> tuple[SMCState, SMCInfo]:
        """One SMC step on every prompt of ``state``: choose ``a_t`` (the schedule) → draw a
        step for every live particle (:func:`~llmppl.inference.draw.draw_step`) → add the weight
        terms → reweight (:func:`~llmppl.inference.weights.reweight`: ``log w``, ``log Ẑ``, ESS
        per prompt) → resample the prompts whose ``ESS < κ·N`` and rejuvenate.  One host sync
        on a native step.  The state is advanced in place and returned with the step's info."""
        if state.done:
            raise ValueError("this SMC run has ended (state.done): call results(state)")
        plan, P = state.plan, state.particles
        state.t += 1
        t, a_prev = state.t, state.a_prev
        a = self._exponent(state, t, a_prev)
        log_w_before = P.log_w      # replaced, never written in place
        drawn = draw_step(plan, state, a, a_prev)
        inc = drawn.inc
        for term in plan.terms:
            inc = inc + term.increment(plan, state, drawn)
        ess, alive, rw_increment = self._reweight(state, inc, log_w_before, t)
        log_w_after = P.log_w       # (resampling replaces it, never writes it in place)
        # classes: resample within them (segment steps: positions); None: every particle competes
        classes = plan.step.resampling_classes(plan, state, drawn) if self.ess_threshold > 0.0 else None
        # the ESS that resampling can raise: within classes, that of the weights relative to their class
        decide = ess if classes is None else within_class_ess(P.log_w, classes)
        need = needs_resampling(decide, alive > 0, self.ess_threshold, P.N)
        # on a CPU device reading ``need`` is free: no ancestors are drawn when no prompt resamples
        resample = self.ess_threshold > 0.0 and (P.device.type != "cpu" or bool(need.any()))
        if resample:
            if classes is None:
                anc, log_w_resampled = draw_ancestors(self.resampler, state.generator, P.log_w, need), None
            else:
                anc, log_w_resampled = draw_ancestors_within(self.resampler, state.generator, P.log_w, need, classes)
            sources = (anc + torch.arange(P.G, device=P.device)[:, None] * P.N).reshape(-1)   # (R,) global rows
            flags = torch.cat([torch.stack([alive.sum(), drawn.bad.any(), need.any()]),
                               P.done.long(), sources]).tolist()   # the step's one host sync
        else:
            flags = torch.stack([alive.sum(), drawn.bad.any()]).tolist()
        state.trace.syncs += 1
        if flags[1]:
            raise self._bad_logprobs_error(state, drawn, t)
        n_alive = flags[0]
        if not resample or not n_alive or not flags[2]:
            resampled = torch.zeros(P.G, dtype=torch.bool, device=P.device)
            ancestors = torch.arange(P.N, device=P.device).expand(P.G, P.N)
            unique = torch.full((P.G,), P.N, device=P.device)
            if self.rejuvenate is not None:
                state.trace.moves.setdefault("moves_accepted", []).append([0] * P.G)
                state.trace.moves.setdefault("unique_after_move", []).append(_distinct(state))
        else:
            done, source_rows = flags[3:3 + P.R], flags[3 + P.R:]
            moved = [r for r, s in enumerate(source_rows) if s != r]
            self._resample(state, need, sources, moved, log_w_resampled)
            n_alive = P.R - sum(done[s] for s in source_rows)
            resampled, ancestors = need, anc
            srt = torch.sort(anc, 1).values
            unique = (srt[:, 1:] != srt[:, :-1]).sum(1) + 1
            if self.rejuvenate is not None:
                self._rejuvenate(state, a, t)
        # rows live at the next step (moves may end particles: then unknown)
        state.live = n_alive if self.rejuvenate is None else None
        state.a_prev = a
        state.done = not n_alive
        info = SMCInfo(step=t, exponent=a, log_weights=log_w_after, ess=ess, log_evidence_increment=rw_increment, alive=alive,
                       resampled=resampled, ancestors=ancestors, unique=unique, records=drawn.records)
        state.trace.infos.append(info)
        return state, info

    # ----------------------------------------------------------------- the pieces
    def _exponent(self, state: SMCState, t: int, a_prev: torch.Tensor) -> torch.Tensor:
        """``a_t`` per prompt, ``(G,)`` float64 on the device."""
        plan, P = state.plan, state.particles
        if plan.a_const is not None:
            return plan.a_const

        def stats() -> BridgeStats:
            alive = (~P.done).view(P.G, P.N)
            lw = torch.where(alive, P.log_w, torch.full_like(P.log_w, -math.inf))
            W = torch.softmax(lw, 1).nan_to_num(0.0)
            log_p = torch.where(alive, P.log_p.view(P.G, P.N), torch.zeros_like(P.log_w))  # no 0 · (−inf)
            mean = (W * log_p).sum(1, keepdim=True)
            spread = (W * (log_p - mean) ** 2).sum(1)
            if not getattr(state.decoding, "full_vocabulary", True):   # native blocks: the realised one
                return BridgeStats(spread=spread, token_var=state.term_data[RealisedTokenVariance.name])
            lp = state.decoding.last_logprobs().double()
            q = lp.exp()   # Var under the base LM: what the whole bridge must cover
            lp = torch.where(q > 0, lp, torch.zeros_like(lp))     # no 0 · ∞ for impossible tokens
            m1 = (q * lp).sum(-1)
            token_var = ((q * lp * lp).sum(-1) - m1 ** 2).clamp_min(0.0).view(P.G, P.N)
            return BridgeStats(spread=spread, token_var=(W * token_var).sum(1))

        alive = (~P.done).view(P.G, P.N)
        position = torch.where(alive, P.length.view(P.G, P.N), torch.zeros_like(P.length.view(P.G, P.N))).amax(1)
        ctx = ScheduleContext(step=t, previous=a_prev, final=plan.alpha, log_weights=P.log_w,
                              horizon=plan.max_new_tokens, stats=stats, position=position)
        a = self.schedule.exponent(ctx)
        return torch.as_tensor(a, dtype=torch.float64, device=P.device).expand(P.G).clone()

    def _reweight(self, state: SMCState, inc: torch.Tensor, log_w_before: torch.Tensor,
                  t: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Apply :func:`~llmppl.inference.weights.reweight` (``log w += inc``, ``log Ẑ += log Σ_i
        W̄_i w_i`` per prompt) and kill −∞ particles and prompts.  Returns the ESS, the live
        particles and the evidence increment per prompt, ``(G,)`` each."""
        P, plan = state.particles, state.plan
        inc_g = inc.view(P.G, P.N)
        rw = reweight(log_w_before, inc_g, P.log_Z, P.failed)
        P.log_Z, P.log_w = rw.log_Z, rw.log_w
        P.failed = P.failed | rw.newly_failed
        P.failed_at = torch.where(rw.newly_failed, t, P.failed_at)
        zero_weight = ~torch.isfinite(rw.log_w.reshape(-1))
        live_dying = zero_weight & ~P.done
        state.decoding.finish(live_dying)
        if plan.needs.own_state:
            state.trace.syncs += 1
            plan.proposal.on_finish(state.proposal_run, live_dying.nonzero().flatten().cpu())
        P.dead = P.dead | zero_weight
        P.done = P.done | zero_weight
        alive = (~P.done).view(P.G, P.N).sum(1)
        # (the conditional ESS, a diagnostic, is computed for every step at once in results)
        state.trace.cess.append((log_w_before, inc_g, rw.lse_old, rw.lse_new, rw.ok))
        return rw.ess, alive, rw.increment

    def _resample(self, state: SMCState, need: torch.Tensor, rows: torch.Tensor, moved: list[int],
                  log_w_resampled: torch.Tensor | None = None) -> None:
        """Row ``r`` becomes a copy of row ``rows[r]`` (within its prompt): only the ``moved`` rows
        (known on the host) are copied in the KV cache; the resampled prompts' weights become
        equal, scaled so that ``LSE(log w) − log N = log Ẑ`` — or, after resampling within classes,
        ``log_w_resampled`` (each offspring carries its class's mean weight; every class keeps its
        total weight, so ``log Ẑ``, set to their ``LSE − log N``, moves by rounding only)."""
        P = state.particles
        if moved:
            state.decoding.reorder(rows, rows=torch.tensor(moved, dtype=torch.long).to(P.device, non_blocking=True))
            if state.plan.needs.own_state:
                state.plan.proposal.on_reorder(state.proposal_run, rows.cpu())
            P.gather(rows)
        if log_w_resampled is None:
            P.log_w = torch.where(need[:, None], P.log_Z[:, None].expand(P.G, P.N), P.log_w)
        else:
            P.log_Z = torch.where(need, torch.logsumexp(log_w_resampled, 1) - math.log(P.N), P.log_Z)
            P.log_w = log_w_resampled

    def _rejuvenate(self, state: SMCState, a: torch.Tensor, t: int) -> None:
        """MH moves on the live rows (they rewrite the rows' tokens in the decoding state, their
        one home, and ``log p``, ``log φ^next``, ``log ψ`` in the particles)."""
        P = state.particles
        rows = (~P.done).nonzero().flatten().cpu()
        accepted = [0] * P.G
        if len(rows):
            a_host = a.cpu()
            exponent = (float(a_host[0]) if bool((a_host == a_host[0]).all())
                        else state.plan.exponent_rows(a).cpu())
            ctx = MoveContext(state.target, state.decoding, rows, exponent, P.log_p, P.log_other,
                              P.log_twist, torch_generator(state.generator), step=t)
            per_row = self.rejuvenate.move(ctx)
            if isinstance(per_row, torch.Tensor) and per_row.numel() == P.R:
                accepted = per_row.view(P.G, P.N).sum(1).tolist()
            else:
                accepted[0] = int(per_row)
        state.trace.moves.setdefault("moves_accepted", []).append(accepted)
        state.trace.moves.setdefault("unique_after_move", []).append(_distinct(state))

    def _bad_logprobs_error(self, state: SMCState, drawn: Drawn, t: int) -> LanguageModelError:
        r = int(drawn.bad.nonzero()[0, 0])
        g, i = divmod(r, state.particles.N)
        where = f"prompt {g}, " if state.particles.G > 1 else ""
        return LanguageModelError(f"{state.target.lm.name} produced NaN/+inf log-probabilities for "
                                  f"{where}particle {i} at SMC step {t}")

    # --------------------------------------------------------------------- results
    @torch.inference_mode()
    def results(self, state: SMCState, raise_on_failure: bool = False) -> list[Result]:
        """One :class:`Result` per prompt of ``state`` (after its last step, or at any step for
        a look at the particles so far), its traces built from the step infos.  A prompt whose
        particles all died gets a Result with ``error`` set, or raises
        :class:`AllParticlesDied` when ``raise_on_failure``."""
        if state.t == 0:
            raise ValueError("no SMC step has been taken on this state: call step(state) first")
        seconds = state.clock.stop()
        plan, P, lm, decoding, trace = state.plan, state.particles, state.target.lm, state.decoding, state.trace
        traces = _stack_infos(trace.infos)
        lw, inc, lse_old, lse_new, ok = (torch.stack(x) for x in zip(*trace.cess))
        traces["conditional_ess"] = torch.where(ok, conditional_ess(lw, inc, (lse_old, lse_new)), 0.0).cpu()
        samples = completions(decoding, P.unfed)
        log_w, log_p = P.log_w.cpu(), P.log_p.cpu().view(P.G, P.N)
        finished, truncated = P.finished.cpu().view(P.G, P.N), P.truncated.cpu().view(P.G, P.N)
        failed, log_Z = P.failed.cpu().tolist(), P.log_Z.cpu().tolist()
        causes = P.cause.cpu().view(P.G, P.N)
        counts = {k: v.view(P.G, P.N).sum(1).cpu().tolist() for k, v in trace.counts.items()}
        config = {
            "n_particles": P.N, "proposal": repr(plan.proposal), "resampling": str(self.resampling),
            "ess_threshold": self.ess_threshold, "schedule": repr(self.schedule), "step": repr(self.step_kind),
            "rejuvenate": repr(self.rejuvenate) if self.rejuvenate is not None else None,
            "target": repr(state.target), "max_new_tokens": plan.max_new_tokens,
        }
        work_name = plan.proposal.work_name
        extra_fp, extra_tok = plan.proposal.work(state.proposal_run)   # the proposal's own LM work
        out = []
        for g in range(P.G):
            rows = slice(g * P.N, (g + 1) * P.N)
            steps = {k: v[:, g].tolist() for k, v in traces.items()}
            for k, per_step in trace.moves.items():
                steps[k] = [x[g] for x in per_step]
            stats = {
                "forward_passes": int(decoding.forward_passes) + extra_fp,
                "tokens_decoded": int(counts.get("tokens_decoded", [0] * P.G)[g]) + extra_tok.get(g, 0),
                "tokens_sampled": int(counts.get("tokens_sampled", [0] * P.G)[g]),
                "wall_time": seconds, "peak_memory": peak_memory(lm.device),
                "resampling_count": int(sum(steps["resampled"])),
                "n_steps": len(steps["ess"]), "batch_prompts": P.G, "host_syncs": trace.syncs,
            }
            if work_name is not None:   # the proposal's own LM work, included in the totals above
                stats[f"{work_name}_tokens_decoded"] = extra_tok.get(g, 0)
                stats[f"{work_name}_forward_passes"] = extra_fp
            if self.rejuvenate is not None:
                stats["moves_accepted"] = int(sum(steps["moves_accepted"]))
            error = _failure_message(state, g, causes[g]) if failed[g] else None
            if error is not None and raise_on_failure:
                raise AllParticlesDied(error)
            sam = samples[rows]
            out.append(Result(
                method=self.method, prompt_ids=list(state.prompts[g]), samples=sam,
                log_weights=log_w[g].tolist(),
                texts=[lm.decode(s) for s in sam] if lm.tokenizer is not None else None,
                finished=finished[g].tolist(), truncated=truncated[g].tolist(), log_p=log_p[g].tolist(),
                log_evidence=log_Z[g], steps=steps, stats=stats, config=config, seed=state.seed,
                select=self.select, error=error,
            ))
        return out


def _stack_infos(infos: list[SMCInfo]) -> dict[str, torch.Tensor]:
    """The per-step traces ``(steps, G, …)`` on the host, from the step infos (one copy each)."""
    names = ("exponent", "log_weights", "log_evidence_increment", "ess", "alive", "resampled", "ancestors",
             "unique")
    out = {name: torch.stack([getattr(i, name) for i in infos]).cpu() for name in names}
    for key in {k for i in infos for k in i.records}:
        out[key] = torch.stack([i.records[key] for i in infos if key in i.records]).cpu()
    return out


@needs.register
def _(engine: SMC, target: Target | None = None) -> Needs:
    """A run of ``engine`` on ``target``: its step, its proposal (the default on ``target``;
    ``Temperature()`` on a pure power target when none is given), its schedule and its moves."""
    proposal = engine.proposal or (default_proposal(target) if target is not None else Temperature())
    out = needs(engine.step_kind) | needs(proposal, target) | needs(engine.schedule)
    if proposal.drafts and not needs(engine.step_kind).row_wise:    # segments: a draft takes the token path
        out = out | Needs(full_vocabulary=True)
    return out | needs(engine.rejuvenate, target) if engine.rejuvenate is not None else out


def _distinct(state: SMCState) -> list[int]:
    """Distinct particle sequences per prompt (what rejuvenation moves increase)."""
    P = state.particles
    toks = completions(state.decoding, P.unfed)
    return [len({tuple(s) for s in toks[g * P.N:(g + 1) * P.N]}) for g in range(P.G)]


def _failure_message(state: SMCState, g: int, causes: torch.Tensor) -> str:
    counts: dict[str, int] = {}
    for c in causes.tolist():
        text = CAUSES.get(c, "unknown cause")
        counts[text] = counts.get(text, 0) + 1
    why = "; ".join(f"{n} particle(s): {c}" for c, n in counts.items())
    where = (f"prompt {g}, " if state.particles.G > 1 else "") + f"SMC step {int(state.particles.failed_at[g])}: "
    cut = state.target.explain_zero_weight([c == CUT_CAUSE for c in causes.tolist()], state.plan.max_new_tokens)
    hint = (f" {cut[0].upper()}{cut[1:]}." if cut else
            " A constraint that nothing satisfies, or a proposal whose support misses the target's?")
    return (f"{where}every particle has weight zero (log-weight -inf), so the target {state.target!r} "
            f"gives zero density to all of them — {why}.{hint}")


__all__ = ["SMC", "SMCState", "SMCPlan", "SMCInfo", "default_proposal"]
