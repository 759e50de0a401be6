"""``SMC``: sequential Monte Carlo over completions (Power-SMC and its generalisations).

Step ``t`` targets ``γ_t(y_≤t) = p(y_≤t)^{a_t} · Π_k φ_k^next(y_≤t) · ψ_t(y_≤t)``.  A
particle that draws ``y_t ~ q_t`` (a token or a block) gets the incremental log-weight

    log w_t = a_t log p(y_t|y_<t) + log φ^next(y_t) + (a_t − a_{t−1}) log p(y_<t)
            + log ψ_t(y_≤t) − log ψ_{t−1}(y_<t) − log q_t(y_t|y_<t);

a particle that ends (EOS, or cut at ``max_new_tokens``) is promoted to the final
target at once: ``+ (α − a_t) log p(y) + log φ_complete(y) − log ψ_{t−1}``, and carries
increments of 0 afterwards (it is never fed to the LM again).  The evidence estimate
``log Ẑ = Σ_t log Σ_i W̄^i_{t−1} w^i_t`` is unbiased in ``Ẑ`` (DESIGN.md §1).

``run_batch`` runs ``G`` prompts × ``N`` particles as one decoding state of ``G·N``
rows.  Normalisation, ESS, the resampling decision, resampling (indices within each
prompt's rows), the exponent schedule and ``log Ẑ`` are per prompt, computed on the
``(G, N)`` view of the weights, so prompts never exchange particles and each prompt's
particles are distributed exactly as in its own ``run``.  All per-particle state is on
the LM's device (:mod:`~llmppl.inference.particles`); a token step with a vectorised
proposal and no Python potential does one small host sync (are all rows done, does
any prompt resample); traces are moved to the host once, at the end.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from ..models.base import LanguageModelError
from ..models.block import BlockSpec
from ..targets.base import scaled
from ..targets.target import Target
from .common import (
    AllParticlesDied,
    Stopwatch,
    eos_ids,
    make_generator,
    peak_memory,
    prepare_prompts,
)
from .moves import MoveContext
from .native import NATIVE_HINT, Needs, block_temperature, needs, require_full_vocabulary
from .particles import CAUSES, Particles, RowPrefixes, completions
from .proposal import Proposal, ProposalContext
from .proposals import Temperature, default_proposal
from .resampling import draw_ancestors, get_resampler, needs_resampling
from .result import Result
from .schedules import (
    BridgeStats,
    Constant,
    Schedule,
    ScheduleContext,
    conditional_ess,
    get_schedule,
)
from .steps import Step, Tokens, Until, get_step
from .weights import reweight

#: extra cause code: a cut completion under ``Target(truncation="zero")``
_CUT_CAUSE = 4
#: a draw computes on the live rows only once at most this share of the rows is live
COMPACT_BELOW = 0.5
CAUSES[_CUT_CAUSE] = "cut at max_new_tokens, and truncation='zero' gives cut completions zero weight"


@dataclass
class SMCState:
    """The state of one batched SMC run (``G`` prompts × ``N`` particles): what
    :meth:`SMC.init` makes, :meth:`SMC.step` advances and :meth:`SMC.results` reads.

    ``particles`` holds every per-particle quantity as device tensors (weights, ``log p``,
    flags; :class:`~llmppl.inference.particles.Particles`), ``decoding`` is the LM's opaque
    decoding handle (KV cache, :class:`~llmppl.models.base.LMState`), also the one home of the
    particles' tokens; the rest is the
    run's configuration, its step counter and the traces recorded so far.
    """

    target: Target
    prompts: list[list[int]]
    max_new_tokens: int
    decoding: Any             # the LM's decoding state (rows = prompts × particles)
    proposal: Proposal
    generator: torch.Generator
    particles: Particles
    alpha: float
    eos: torch.Tensor
    clock: Stopwatch          # started at init: Result.stats["wall_time"] is init → results
    t: int = 0                # steps taken
    done: bool = False        # every particle has ended: no step is left
    a_prev: torch.Tensor | None = None   # (G,) the exponent of the last step (the schedule's start before it)
    seed: int | None = None
    traces: dict[str, list] = field(default_factory=dict)
    host: dict[str, Any] = field(default_factory=dict)   # per-prompt token counts (device) and move traces (host)
    syncs: int = 0
    bad_logprobs: torch.Tensor | None = None
    step_tokens: torch.Tensor | None = None   # tokens each row drew in the current step
    live: int | None = None   # rows live at this step, known on the host (None: not known)
    native: bool = False      # the backend draws each step's block itself (state.sample_block)
    proposal_needs: Needs = field(default_factory=Needs)   # needs(proposal, target)
    stop_ids: tuple[int, ...] = ()   # the LM's EOS ids (host)
    slope: dict[str, torch.Tensor] = field(default_factory=dict)   # the length twist's c_t (segment steps)
    bridging: bool = True     # the exponent may change between steps (not a Constant schedule)
    twisted: bool = True      # particles may carry a twist (target twists, segment look-ahead)
    unmoved: tuple[torch.Tensor, ...] = ()   # the traces of a step without resampling (constant)
    cess: list[tuple[torch.Tensor, ...]] = field(default_factory=list)   # conditional ESS inputs, per step
    a_const: torch.Tensor | None = None       # (G,) the exponent of every step under a Constant schedule
    a_const_rows: torch.Tensor | None = None  # (R,) the same per row

    def record(self, **values: torch.Tensor) -> None:
        for k, v in values.items():
            self.traces.setdefault(k, []).append(v)

    def a_rows(self, a: torch.Tensor) -> torch.Tensor:
        """``(R,)``: each prompt's exponent on each of its rows."""
        return self.a_const_rows if a is self.a_const else a.repeat_interleave(self.particles.N)


class SMC:
    """Sequential Monte Carlo over completions of a :class:`~llmppl.Target`.

    ``proposal``: a :class:`~llmppl.proposals.Proposal` (default: ``Temperature()``, i.e.
    ``q ∝ p^{a_t}``, for a pure power target; ``LocallyOptimal()`` when the target has
    token-level factors such as masks).  ``resampling``: a name in
    ``pp.resampling.RESAMPLERS`` or a callable; resample a prompt's particles when their
    ``ESS < ess_threshold · N`` (1: every step, 0: never).  ``schedule``: an exponent
    bridge from ``pp.schedules`` (default ``Constant()``).  ``step``: ``"token"``,
    ``pp.steps.Tokens(k)`` or ``pp.steps.Until(delimiter, max_tokens)``.  ``rejuvenate``:
    a kernel with ``move(MoveContext) -> int`` applied after each resampling (token steps).
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
        self.step_kind = get_step(step)
        if rejuvenate is not None and isinstance(self.step_kind, Until):
            raise ValueError(
                "rejuvenate cannot be combined with segment steps (Until): the MH moves resample "
                "suffixes token by token at a fixed length, which keeps p(y_≤t)^a_t invariant but "
                "not the segment-level target (a segment must end at its delimiter), so the result "
                "would be biased. Use token steps with rejuvenate, or segment steps without it.")
        self.rejuvenate = rejuvenate
        self.select = select
        self.progress = progress

    def __repr__(self) -> str:
        return (f"SMC(n_particles={self.n_particles}, proposal={self.proposal!r}, "
                f"resampling={self.resampling!r}, ess_threshold={self.ess_threshold:g}, "
                f"schedule={self.schedule!r}, step={self.step_kind!r})")

    # ------------------------------------------------------------------ entry points
    def run(self, target: Target, prompt: str | Sequence[int] | Sequence[dict], max_new_tokens: int,
            seed: int | None = None) -> Result:
        """Run SMC on one prompt; raises ``AllParticlesDied`` when every particle dies."""
        return self._run(target, [prompt], max_new_tokens, seed, raise_on_failure=True)[0]

    def run_batch(self, target: Target, prompts: Sequence[str | Sequence[int] | Sequence[dict]],
                  max_new_tokens: int, seed: int | None = None) -> list[Result]:
        """Run SMC on ``G`` prompts at once (``G·N`` rows); one ``Result`` per prompt, in order.

        A prompt whose particles all die gets a Result with ``error`` set; the others go on.
        """
        return self._run(target, prompts, max_new_tokens, seed, raise_on_failure=False)

    def _run(self, target: Target, prompts: Sequence[Any], max_new_tokens: int, seed: int | None,
             raise_on_failure: bool) -> list[Result]:
        return self.results(self.drive(self.init(target, prompts, max_new_tokens, seed)), raise_on_failure)

    def drive(self, state: SMCState) -> SMCState:
        """``step(state)`` until ``state.done`` (a progress bar when ``progress``); returns ``state``."""
        from tqdm.auto import tqdm

        G = state.particles.G
        with tqdm(total=state.max_new_tokens, disable=not self.progress, file=sys.stderr,
                  desc=f"SMC ({G} prompt{'s' if G > 1 else ''})", unit="tok") as bar:
            while not state.done:
                self.step(state)
                bar.update(1)
        return state

    # ------------------------------------------------------------------ init / step / results
    # (init, step and results run under torch.inference_mode: no autograd bookkeeping per op)
    @torch.inference_mode()
    def init(self, target: Target, prompts: Sequence[str | Sequence[int] | Sequence[dict]],
             max_new_tokens: int, seed: int | None = None) -> SMCState:
        """The state of a run on ``G`` prompts before its first step: ``N`` particles per prompt
        with ``log w = 0``, ``log Ẑ = 0`` and the empty completion, the LM's decoding state
        started on the prompts (``G·N`` rows), the generator seeded with ``seed``.

        ``run_batch`` is ``state = init(…)``; ``step(state)`` until ``state.done``;
        ``results(state)``.  Bad input (prompts, a proposal or option the backend cannot run)
        is refused here, before any decoding."""
        ids = prepare_prompts(target, prompts, max_new_tokens)
        lm = target.lm
        self.step_kind.check(lm)
        proposal = self.proposal or default_proposal(target)
        if self.rejuvenate is not None and needs(proposal).own_state:
            raise ValueError(
                f"rejuvenate cannot be combined with the stateful proposal {proposal!r}: moves change "
                "particles behind the proposal's own decoding state")
        G, N, dev = len(ids), self.n_particles, lm.device
        clock = Stopwatch(dev).start()
        decoding = lm.start(ids[0] if G == 1 else ids, N, max_new_tokens=max_new_tokens)
        proposal.start(target, ids[0] if G == 1 else ids, N)
        alpha = float(target.base_exponent)
        state = SMCState(target, ids, max_new_tokens, decoding, proposal, make_generator(seed, dev),
                         Particles(G, N, dev), alpha, torch.tensor(eos_ids(lm), device=dev),
                         clock, live=G * N, seed=seed)
        state.a_prev = torch.full((G,), self.schedule.initial(alpha), dtype=torch.float64, device=dev)
        state.proposal_needs = needs(proposal, target)
        state.native, state.stop_ids = self._native(state), eos_ids(lm)
        state.bridging = not isinstance(self.schedule, Constant)
        if not state.bridging:
            state.a_const = torch.full((G,), alpha, dtype=torch.float64, device=dev)
            state.a_const_rows = state.a_const.repeat_interleave(N)
        state.twisted = target.has_twist or isinstance(self.step_kind, Until)
        return state

    @torch.inference_mode()
    def step(self, state: SMCState) -> SMCState:
        """One SMC step on every prompt of ``state`` (advanced in place, and returned):

        choose ``a_t`` (the schedule) → extend every live particle by a token or a block from
        the proposal → promote the particles that ended to the final target, update the
        twists → reweight (:func:`~llmppl.inference.weights.reweight`: ``log w``, ``log Ẑ``,
        ESS per prompt) → resample the prompts whose ``ESS < κ·N``
        (:func:`~llmppl.inference.resampling.draw_ancestors`) and rejuvenate.  One host sync.
        """
        if state.done:
            raise ValueError("this SMC run has ended (state.done): call results(state)")
        run, P = state, state.particles
        run.t += 1
        t, a_prev = run.t, run.a_prev
        a = self._exponent(run, t, a_prev)
        log_w_before = P.log_w      # replaced, never written in place
        inc, seg_inc = self._extend(run, t, a, a_prev)
        self._promote(run, inc, a)
        self._update_twists(run, inc)
        self._length_twist(run, inc, seg_inc, a)
        ess, alive = self._reweight(run, inc, log_w_before, a, t)
        need = needs_resampling(ess, alive > 0, self.ess_threshold, P.N)
        # on a CPU device reading ``need`` is free: no ancestors are drawn when no prompt resamples
        drawn = self.ess_threshold > 0.0 and (P.device.type != "cpu" or bool(need.any()))
        if drawn:
            anc = draw_ancestors(self.resampler, run.generator, P.log_w, need)
            sources = (anc + torch.arange(P.G, device=P.device)[:, None] * P.N).reshape(-1)   # (R,) global rows
            flags = torch.cat([torch.stack([alive.sum(), run.bad_logprobs.any(), need.any()]),
                               P.done.long(), sources]).tolist()   # the step's one host sync
        else:
            flags = torch.stack([alive.sum(), run.bad_logprobs.any()]).tolist()
        run.syncs += 1
        if flags[1]:
            raise self._bad_logprobs_error(run, t)
        n_alive = flags[0]
        if not drawn or not n_alive or not flags[2]:
            self._record_no_resampling(run)
        else:
            done, source_rows = flags[3:3 + P.R], flags[3 + P.R:]
            moved = [r for r, s in enumerate(source_rows) if s != r]
            self._resample(run, need, anc, sources, moved, a, t)
            n_alive = P.R - sum(done[s] for s in source_rows)
        # rows live at the next step (moves may end particles: then unknown)
        run.live = n_alive if self.rejuvenate is None else None
        run.a_prev = a
        run.done = not n_alive
        return state

    # ----------------------------------------------------------------- the pieces
    def _native(self, run: SMCState) -> bool:
        """Whether each step is one ``state.sample_block`` call: neither the step nor the proposal
        on this target (:func:`~llmppl.inference.native.needs`) needs the full vocabulary, at the
        schedule's first exponent too.  On a backend without full-vocabulary log-probabilities, a
        run with a part that needs them is refused here, by the part's name."""
        target, proposal = run.target, run.proposal
        a0 = torch.tensor([self.schedule.initial(run.alpha)], dtype=torch.float64)
        tau0 = block_temperature(proposal, target, a0)
        native = (not needs(self.step_kind).full_vocabulary and not run.proposal_needs.full_vocabulary
                  and tau0 is not None and bool(torch.isfinite(tau0).all() and (tau0 >= 0).all()))
        parts = [(needs(self.step_kind), f"SMC with the step {self.step_kind!r}", NATIVE_HINT)]
        parts += [(needs(f), f"SMC with the token-level factor {f!r}", NATIVE_HINT) for f in target.others]
        parts += [(Needs(full_vocabulary=not native), f"SMC with the proposal {proposal!r}", NATIVE_HINT),
                  (needs(self.schedule), f"the schedule {self.schedule!r}",
                   "use pp.schedules.Constant, Linear or Geometric")]
        if self.rejuvenate is not None:      # moves replay suffixes token by token (forced tokens)
            parts.append((Needs(full_vocabulary=True), f"rejuvenate={self.rejuvenate!r}", "run SMC without moves"))
        for need, what, instead in parts:
            if need.full_vocabulary:
                require_full_vocabulary(run.decoding, what, instead)
        return native

    def _exponent(self, run: SMCState, t: int, a_prev: torch.Tensor) -> torch.Tensor:
        """``a_t`` per prompt, ``(G,)`` float64 on the device."""
        if run.a_const is not None:
            return run.a_const
        P = run.particles

        def stats() -> BridgeStats:
            lp = run.decoding.last_logprobs().double()
            alive = (~P.done).view(P.G, P.N)
            lw = torch.where(alive, P.log_w, torch.full_like(P.log_w, -math.inf))
            W = torch.softmax(lw, 1).nan_to_num(0.0)
            log_p = torch.where(alive, P.log_p.view(P.G, P.N), torch.zeros_like(P.log_w))  # no 0 · (−inf)
            mean = (W * log_p).sum(1, keepdim=True)
            spread = (W * (log_p - mean) ** 2).sum(1)
            q = lp.exp()   # Var under the base LM: what the whole bridge must cover
            lp = torch.where(q > 0, lp, torch.zeros_like(lp))     # no 0 · ∞ for impossible tokens
            m1 = (q * lp).sum(-1)
            token_var = ((q * lp * lp).sum(-1) - m1 ** 2).clamp_min(0.0).view(P.G, P.N)
            return BridgeStats(spread=spread, token_var=(W * token_var).sum(1))

        alive = (~P.done).view(P.G, P.N)
        position = torch.where(alive, P.length.view(P.G, P.N), torch.zeros_like(P.length.view(P.G, P.N))).amax(1)
        ctx = ScheduleContext(step=t, previous=a_prev, final=run.alpha, log_weights=P.log_w,
                              horizon=run.max_new_tokens, stats=stats, position=position)
        a = self.schedule.exponent(ctx)
        return torch.as_tensor(a, dtype=torch.float64, device=P.device).expand(P.G).clone()

    def _extend(self, run: SMCState, t: int, a: torch.Tensor, a_prev: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Extend every live particle by one step (a token or a block); return the incremental
        log-weights ``(R,)`` without promotion and twist terms, and (variable-length segment
        steps) the part of them drawn this step, ``a_t log p + log φ^next − log q`` of the block."""
        P = run.particles
        alive = ~P.done
        inc = (torch.where(alive, scaled(run.a_rows(a - a_prev), P.log_p), torch.zeros_like(P.log_p))
               if run.bridging else None)   # a_t − a_{t−1} = 0 under Constant
        if run.native:
            drawn = self._draw_block(run, run.a_rows(a), alive)
            return (drawn if inc is None else inc + drawn), None
        inc = torch.zeros_like(P.log_p) if inc is None else inc
        retro = inc.clone()
        start = P.length.clone()
        active = alive
        one_token = isinstance(self.step_kind, Tokens) and self.step_kind.k == 1
        while True:
            self._draw(run, t, run.a_rows(a), active, inc)
            if one_token:
                break
            active = active & ~P.done
            if isinstance(self.step_kind, Tokens):
                active = active & (P.length - start < self.step_kind.k)
            else:
                rows = active.nonzero().flatten()
                run.syncs += 1
                segs = completions(run.decoding, P.unfed, rows)
                starts = start[rows].tolist()
                ended = [self.step_kind.ends(s[k:], run.target.lm) for s, k in zip(segs, starts)]
                active = active.clone()
                active[rows[torch.tensor(ended, dtype=torch.bool, device=rows.device)]] = False
            run.syncs += 1
            if not bool(active.any()):
                break
        run.step_tokens = P.length - start
        run.record(segment_length=(P.length - start).view(P.G, P.N).amax(1))
        if one_token or isinstance(self.step_kind, Tokens):
            return inc, None
        return inc, torch.where(alive, inc - retro, torch.zeros_like(inc))

    def _length_twist(self, run: SMCState, inc: torch.Tensor, seg_inc: torch.Tensor | None,
                      a: torch.Tensor) -> None:
        """Variable-length segments: for live particles

            log ψ_t(y) = log Σ_v p(v | y)^{a_t}  [+ c_t · (T − len(y) − 1)  with Until(slope=True)],

        the exact one-token look-ahead mass of the next position (what a token step's next
        incremental weight would be under ``q ∝ p^{a_t}``; from the log-probs the state holds
        for the next step anyway), plus optionally ``c_t`` per token for the rest of the horizon.

        ``p(y_≤t)^a`` compares prefixes of different lengths, and resampling on it alone copies
        prefixes whose next token is costly (they lose their weight at the next step):
        consistent, but with a variance that swamps the estimate.  Like every twist it is
        removed when a particle ends (the target is unchanged).

        **Predictable.** ``ψ_t`` is fixed before step ``t`` draws: the look-ahead mass is a
        function of the prefix and of ``a_t`` (chosen from the past by the schedule), and
        ``c_t`` is the prompt's mean log-increment per token over the tokens drawn at steps
        ``1..t−1`` (``a log p + log φ^next − log q`` of the blocks; 0 at ``t = 1``), so it is
        ``F_{t−1}``-measurable and ``Ẑ`` stays unbiased (the martingale argument only needs
        each step's target to be chosen from the past).
        """
        if seg_inc is None:
            return
        P = run.particles
        live = ~P.done
        lp = run.decoding.last_logprobs().double().to(P.device)        # log p(· | y) of the new prefixes
        new = torch.logsumexp(scaled(run.a_rows(a)[:, None], lp), -1)
        if getattr(self.step_kind, "slope", False):
            if not run.slope:
                zero = torch.zeros(P.G, dtype=torch.float64, device=P.device)
                run.slope.update(c=zero, inc=zero.clone(), tokens=zero.clone())
            c = run.slope["c"].repeat_interleave(P.N)    # F_{t−1}-measurable: fixed before this step
            new = new + c * (run.max_new_tokens - P.length - 1).double().clamp_min(0.0)
            # c_{t+1}: this step's draws join the history
            drawn = torch.where(torch.isfinite(seg_inc), seg_inc, torch.zeros_like(seg_inc))
            n_tok = run.step_tokens.double()
            drew = n_tok > 0
            run.slope["inc"] += torch.where(drew, drawn, torch.zeros_like(drawn)).view(P.G, P.N).sum(1)
            run.slope["tokens"] += torch.where(drew, n_tok, torch.zeros_like(n_tok)).view(P.G, P.N).sum(1)
            seen = run.slope["tokens"] > 0
            run.slope["c"] = torch.where(seen, run.slope["inc"] / run.slope["tokens"].clamp_min(1.0),
                                         run.slope["c"])
        new = torch.where(live & torch.isfinite(new), new, torch.zeros_like(new))
        inc += torch.where(live, new - P.length_twist, torch.zeros_like(inc))
        P.length_twist = new

    def _draw_block(self, run: SMCState, a_rows: torch.Tensor, active: torch.Tensor) -> torch.Tensor:
        """One native block of up to ``k`` tokens for each ``active`` row (``state.sample_block``);
        returns the rows' incremental log-weights ``(R,)``

            Σ_j [a_t log p(y_j | y_<j) − log q(y_j | y_<j)]

        over the drawn tokens (float64), with ``q ∝ p^{1/τ}``; EOS ends a row, reaching
        ``max_new_tokens`` cuts it (its last token is kept in ``particles.unfed``, not fed to the LM)."""
        P, state, proposal = run.particles, run.decoding, run.proposal
        k = self.step_kind.k
        rows = self._rows_to_draw(run, active)      # None: every row (no gathers, no scatters)
        if rows is None:
            remaining, act, a_sel = run.max_new_tokens - P.length, active, a_rows
        else:
            remaining, act, a_sel = run.max_new_tokens - P.length[rows], active[rows], a_rows[rows]
        budget = torch.where(act, remaining.clamp(max=k), 0)
        spec = BlockSpec(budget=budget, width=min(k, run.max_new_tokens), stop_ids=run.stop_ids,
                         temperature=proposal.block_temperature(a_sel), greedy=proposal.greedy,
                         allow_stop=proposal.allow_stop, feed_last=budget < remaining)
        blk = state.sample_block(rows, spec, run.generator)
        # rows with budget 0 drew nothing: totals 0, length 0, not ended (the Block contract)
        lp, lq = blk.total("log_p").to(P.device), blk.total("log_q").to(P.device)
        ended, n = blk.ended.to(P.device), blk.length.to(P.device)
        grown = n - ended.long()                            # tokens that extend the completion
        cut = act & (grown >= remaining)                    # (an ended row has grown < budget <= remaining)
        drawn = a_sel * lp - lq
        last = (blk.tokens[:, 0] if blk.tokens.shape[1] == 1 else
                blk.tokens.gather(1, (n - 1).clamp_min(0)[:, None]).squeeze(1)).to(P.device)

        def full(x: torch.Tensor) -> torch.Tensor:
            if rows is None:
                return x
            return torch.zeros(P.R, dtype=x.dtype, device=P.device).index_copy_(0, rows, x)

        ended, cut, n, grown = full(ended), full(cut), full(n), full(grown)
        P.log_p += full(lp)
        P.log_q += full(lq)
        bad = full(~torch.isfinite(lp - lq))
        run.bad_logprobs = bad if run.bad_logprobs is None else run.bad_logprobs | bad
        self._count(run, "tokens_sampled", n)
        self._count(run, "tokens_decoded", grown - cut.long())
        P.unfed = torch.where(cut, full(last), P.unfed)   # the cut token is not fed
        P.length += grown
        P.finished |= ended
        P.truncated |= cut
        stopped = ended | cut
        P.done |= stopped
        state.finish(stopped)
        return full(drawn)

    def _draw(self, run: SMCState, t: int, a_rows: torch.Tensor, active: torch.Tensor,
              inc: torch.Tensor) -> None:
        """Draw one token for each ``active`` row and do all the per-token bookkeeping.

        The draw is a one-token ``state.sample_block`` whose hook is the proposal (``log q``) and
        the target's non-``Power`` token factors (``log φ^next``); it feeds nothing
        (``feed_last=False``): the token is fed here once weighed, so dead rows never are.
        The proposal, the sampler and the potentials see only the rows of
        :meth:`_rows_to_draw` (all rows, or the live ones once few are left), so rows that
        ended cost nothing but their slot in the ``(R,)`` vectors.
        """
        P, state, target, proposal = run.particles, run.decoding, run.target, run.proposal
        rows = self._rows_to_draw(run, active)
        a_sub = a_rows if rows is None else a_rows.index_select(0, rows)
        row_wise = run.proposal_needs.row_wise
        if row_wise:
            exponent: float | torch.Tensor = a_sub[:, None]
        else:  # a float when every row shares it (proposals that are not row-wise may need one)
            exponent = (float(a_sub[0]) if len(a_sub) and bool((a_sub == a_sub[0]).all()) else a_sub[:, None])
        ctx_rows = None if rows is None else rows if row_wise else rows.cpu()  # (no sync when row-wise)
        seen: dict[str, torch.Tensor] = {}

        def propose(k: torch.Tensor, sub_lp: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
            """Every row of the one-token block: ``log q`` and the target's non-``Power`` token factors."""
            seen["bad"] = (torch.isnan(sub_lp).any(1) | torch.isposinf(sub_lp).any(1)).to(P.device)
            batch = RowPrefixes(target.lm, run.prompts, P, state, rows, sub_lp)
            ctx = ProposalContext(target, batch, state, ctx_rows, exponent, run.generator, run.max_new_tokens)
            return proposal.log_probs(ctx), target.log_next_other(batch)

        if len(a_sub):
            # one token from q, drawn and recorded by state.sample_block; fed below, once weighed
            budget = active.long() if rows is None else active.index_select(0, rows).long()
            spec = BlockSpec(budget=budget, width=1, temperature=torch.ones_like(a_sub), stop_ids=run.stop_ids,
                             feed_last=False, propose=propose, sample=proposal.sample)
            blk = state.sample_block(rows, spec, run.generator)
            v, lp_v, lq_v = (x[:, 0].to(P.device) for x in (blk.tokens, blk.log_p, blk.log_q))
            other_v = None if blk.log_inc is None else blk.log_inc[:, 0].to(P.device)
            bad = seen["bad"]
        else:
            v = torch.zeros(0, dtype=torch.long, device=P.device)
            lp_v = lq_v = torch.zeros(0, dtype=torch.float64, device=P.device)
            other_v, bad = None, torch.zeros(0, dtype=torch.bool, device=P.device)
        if rows is not None:  # back to one entry per row (rows not drawn: masked below)
            def full(x: torch.Tensor) -> torch.Tensor:
                return torch.zeros(P.R, dtype=x.dtype, device=P.device).index_copy_(0, rows, x)

            v, lp_v, lq_v, bad = full(v), full(lp_v), full(lq_v), full(bad)
            other_v = None if other_v is None else full(other_v)
        bad = bad & active
        run.bad_logprobs = bad if run.bad_logprobs is None else run.bad_logprobs | bad
        v = torch.where(active, v, torch.zeros_like(v))
        tok_inc = scaled(a_rows, lp_v) - lq_v          # 0 · log 0 = 0 at a_t = 0
        zero = torch.zeros_like(P.log_p)
        if other_v is not None:
            P.log_other += torch.where(active, other_v, zero)
            tok_inc = tok_inc + other_v
        inc += torch.where(active, tok_inc, zero)
        P.log_p += torch.where(active, lp_v, zero)
        P.log_q += torch.where(active, lq_v, zero)
        self._count(run, "tokens_sampled", active)
        is_eos = active & torch.isin(v, run.eos)
        cut = active & ~is_eos & (P.length + 1 >= run.max_new_tokens)
        dead = active & ~torch.isfinite(inc)
        P.cause = torch.where(dead & (P.cause == 0), torch.ones_like(P.cause), P.cause)
        grow = active & ~is_eos & ~cut & ~dead
        P.length += (active & ~is_eos & ~dead).long()
        P.unfed = torch.where(cut & ~dead, v, P.unfed)           # the cut token is not fed
        state.step(v, grow)
        self._count(run, "tokens_decoded", grow)
        P.finished |= is_eos
        P.truncated |= cut
        P.dead |= dead
        ended = is_eos | cut | dead
        P.done |= ended
        state.finish(ended)
        if run.proposal_needs.own_state:
            run.syncs += 1
            rows = grow.nonzero().flatten().cpu()
            proposal.on_extend([[int(x)] for x in v[grow].tolist()], rows)
            proposal.on_finish(ended.nonzero().flatten().cpu())

    def _rows_to_draw(self, run: SMCState, active: torch.Tensor) -> torch.Tensor | None:
        """The rows a draw computes on: ``None`` (all ``R``) while most rows are live, else a
        superset of the ``active`` rows of size ``run.live`` (counted on the host at the last
        sync, so no extra sync).  Proposals that are not row-wise get exactly the active rows."""
        P = run.particles
        if not run.proposal_needs.row_wise:
            run.syncs += 1
            return active.nonzero().flatten()
        if run.live is None or run.live > COMPACT_BELOW * P.R:
            return None
        # stable sort: the active rows first, in order; run.live >= their number
        return torch.argsort((~active).to(torch.uint8), stable=True)[:run.live]

    @staticmethod
    def _count(run: SMCState, name: str, per_row: torch.Tensor) -> None:
        """Accumulate ``per_row`` (a bool or count per row) per slot; a prompt's total is the sum
        over its slots at the end (resampling moves particles, not the work already done)."""
        total = run.host.get(name)
        run.host[name] = per_row.long() if total is None else total + per_row

    def _promote(self, run: SMCState, inc: torch.Tensor, a: torch.Tensor) -> None:
        """Particles that ended this step jump to the final target:
        ``+ (α − a_t) log p(y) + log φ_complete(y) − log ψ_{t−1}``."""
        P, target = run.particles, run.target
        if not (run.bridging or run.twisted or target.has_complete or target.has_twist):
            return      # a_t = α, ψ = 1 and no φ_complete: the jump is 0
        ended = (P.finished | P.truncated) & ~P.dead & ~P.promoted
        zero = torch.zeros_like(P.log_p)
        untwist = torch.where(ended, -P.log_twist, zero) if target.has_twist else None
        if run.bridging or run.twisted:     # else a_t = α and ψ = 1: the jump is 0 (or log φ_complete)
            jump = scaled(run.alpha - run.a_rows(a), P.log_p) if run.bridging else zero
            inc += torch.where(ended, jump - P.log_twist - P.length_twist, zero)
            P.log_twist = torch.where(ended, zero, P.log_twist)
            P.length_twist = torch.where(ended, zero, P.length_twist)
        if target.has_complete:
            rows = ended.nonzero().flatten()
            run.syncs += 1
            if len(rows):
                batch = RowPrefixes(target.lm, run.prompts, P, run.decoding, rows, None,
                                    P.finished[rows].tolist(), P.truncated[rows].tolist())
                lc = target.log_complete(batch).to(device=P.device, dtype=torch.float64)
                inc[rows] += lc
                if untwist is not None:
                    untwist[rows] += lc
                rejected = ~torch.isfinite(lc) & (P.cause[rows] == 0)
                zero_cut = getattr(target, "truncation", "keep") == "zero"
                code = torch.where(P.truncated[rows] & zero_cut, _CUT_CAUSE, 2).to(P.cause.dtype)
                P.cause[rows] = torch.where(rejected, code, P.cause[rows])
        P.promoted |= ended
        if target.has_twist:
            run.record(untwist=untwist.view(P.G, P.N))

    def _update_twists(self, run: SMCState, inc: torch.Tensor) -> None:
        """``+ log ψ_t(y_≤t) − log ψ_{t−1}(y_<t)`` for particles still running."""
        P, target = run.particles, run.target
        if not target.has_twist:
            return
        rows = (~P.done).nonzero().flatten()
        run.syncs += 1
        if len(rows):
            n = len(rows)
            batch = RowPrefixes(target.lm, run.prompts, P, run.decoding, rows, None, [False] * n, [False] * n)
            tw = target.log_twist(batch).to(device=P.device, dtype=torch.float64)
            inc[rows] += tw - P.log_twist[rows]
            P.log_twist[rows] = tw
            bad = ~torch.isfinite(tw) & (P.cause[rows] == 0)
            P.cause[rows] = torch.where(bad, torch.full_like(P.cause[rows], 3), P.cause[rows])
        run.record(twist=P.log_twist.view(P.G, P.N).clone())

    def _reweight(self, run: SMCState, inc: torch.Tensor, log_w_before: torch.Tensor,
                  a: torch.Tensor, t: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Apply :func:`~llmppl.inference.weights.reweight` to the particles (``log w += inc``,
        ``log Ẑ += log Σ_i W̄_i w_i`` per prompt), kill −∞ particles and prompts, record the
        step.  Returns the ESS and the number of live particles per prompt, ``(G,)`` each."""
        P = run.particles
        inc_g = inc.view(P.G, P.N)
        rw = reweight(log_w_before, inc_g, P.log_Z, P.failed)
        P.log_Z, P.log_w = rw.log_Z, rw.log_w
        P.failed = P.failed | rw.newly_failed
        P.failed_at = torch.where(rw.newly_failed, t, P.failed_at)
        zero_weight = ~torch.isfinite(rw.log_w.reshape(-1))
        live_dying = zero_weight & ~P.done
        run.decoding.finish(live_dying)
        if run.proposal_needs.own_state:
            run.syncs += 1
            run.proposal.on_finish(live_dying.nonzero().flatten().cpu())
        P.dead |= zero_weight
        P.done |= zero_weight
        alive = (~P.done).view(P.G, P.N).sum(1)
        # (a, log_w, log_w_before and inc are never written in place: no copies; the conditional
        # ESS, a diagnostic, is computed for every step at once in results)
        run.record(exponent=a, log_weights=rw.log_w, ess=rw.ess, log_evidence_increment=rw.increment,
                   alive=alive)
        run.cess.append((log_w_before, inc_g, rw.lse_old, rw.lse_new, rw.ok))
        return rw.ess, alive

    def _resample(self, run: SMCState, need: torch.Tensor, anc: torch.Tensor, rows: torch.Tensor,
                  moved: list[int], a: torch.Tensor, t: int) -> None:
        """Apply the ancestors ``anc`` ``(G, N)`` of the prompts in ``need`` (``rows`` ``(R,)``: the
        same as global row indices, ``g·N + anc[g, i]``): only the ``moved`` rows (those whose
        ancestor is another particle; known on the host) are copied in the KV cache; then
        rejuvenate."""
        P = run.particles
        if moved:
            run.decoding.reorder(rows, rows=torch.tensor(moved, dtype=torch.long).to(P.device, non_blocking=True))
            if run.proposal_needs.own_state:
                run.proposal.on_reorder(rows.cpu())
            P.gather(rows)
        # equal weights after resampling, scaled so that LSE(log_w) − log N = log Ẑ
        P.log_w = torch.where(need[:, None], P.log_Z[:, None].expand(P.G, P.N), P.log_w)
        srt = torch.sort(anc, 1).values
        run.record(resampled=need, ancestors=anc, unique=(srt[:, 1:] != srt[:, :-1]).sum(1) + 1)
        if self.rejuvenate is not None:
            self._rejuvenate(run, a, t)

    def _record_no_resampling(self, run: SMCState) -> None:
        P = run.particles
        if not run.unmoved:     # the same (constant) tensors every such step: stacked at the end
            run.unmoved = (torch.zeros(P.G, dtype=torch.bool, device=P.device),
                           torch.arange(P.N, device=P.device).expand(P.G, P.N),
                           torch.full((P.G,), P.N, device=P.device))
        run.record(resampled=run.unmoved[0], ancestors=run.unmoved[1], unique=run.unmoved[2])
        if self.rejuvenate is not None:
            run.host.setdefault("moves_accepted", []).append([0] * P.G)
            run.host.setdefault("unique_after_move", []).append(_distinct(run))

    def _rejuvenate(self, run: SMCState, a: torch.Tensor, t: int) -> None:
        """MH moves on the live rows (they rewrite the rows' tokens in the decoding state, their
        one home, and ``log p``, ``log φ^next``, ``log ψ`` in the particles)."""
        P = run.particles
        rows = (~P.done).nonzero().flatten().cpu()
        accepted = [0] * P.G
        if len(rows):
            a_host = a.cpu()
            exponent = float(a_host[0]) if bool((a_host == a_host[0]).all()) else run.a_rows(a).cpu()
            ctx = MoveContext(run.target, run.decoding, rows, exponent, P.log_p, P.log_other,
                              P.log_twist, run.generator, step=t)
            per_row = self.rejuvenate.move(ctx)
            if isinstance(per_row, torch.Tensor) and per_row.numel() == P.R:
                accepted = per_row.view(P.G, P.N).sum(1).tolist()
            else:
                accepted[0] = int(per_row)
        run.host.setdefault("moves_accepted", []).append(accepted)
        run.host.setdefault("unique_after_move", []).append(_distinct(run))

    def _bad_logprobs_error(self, run: SMCState, t: int) -> LanguageModelError:
        r = int(run.bad_logprobs.nonzero()[0, 0])
        g, i = divmod(r, run.particles.N)
        where = f"prompt {g}, " if run.particles.G > 1 else ""
        return LanguageModelError(f"{run.target.lm.name} produced NaN/+inf log-probabilities for "
                                  f"{where}particle {i} at SMC step {t}")

    # --------------------------------------------------------------------- results
    @torch.inference_mode()
    def results(self, state: SMCState, raise_on_failure: bool = False) -> list[Result]:
        """One :class:`Result` per prompt of ``state`` (after its last step, or at any step for
        a look at the particles so far).  A prompt whose particles all died gets a Result with
        ``error`` set, or raises :class:`AllParticlesDied` when ``raise_on_failure``."""
        if state.t == 0:
            raise ValueError("no SMC step has been taken on this state: call step(state) first")
        run, seed, seconds = state, state.seed, state.clock.stop()
        P, lm, decoding = run.particles, run.target.lm, run.decoding
        traces = {k: torch.stack(v).cpu() for k, v in run.traces.items()}  # (steps, G, ...)
        lw, inc, lse_old, lse_new, ok = (torch.stack(x) for x in zip(*run.cess))
        traces["conditional_ess"] = torch.where(ok, conditional_ess(lw, inc, (lse_old, lse_new)), 0.0).cpu()
        samples = completions(decoding, P.unfed)
        log_w, log_p = P.log_w.cpu(), P.log_p.cpu().view(P.G, P.N)
        finished, truncated = P.finished.cpu().view(P.G, P.N), P.truncated.cpu().view(P.G, P.N)
        failed, log_Z = P.failed.cpu().tolist(), P.log_Z.cpu().tolist()
        causes = P.cause.cpu().view(P.G, P.N)
        counts = {k: v.view(P.G, P.N).sum(1).cpu().tolist() for k, v in run.host.items()
                  if isinstance(v, torch.Tensor)}
        config = {
            "n_particles": P.N, "proposal": repr(run.proposal), "resampling": str(self.resampling),
            "ess_threshold": self.ess_threshold, "schedule": repr(self.schedule), "step": repr(self.step_kind),
            "rejuvenate": repr(self.rejuvenate) if self.rejuvenate is not None else None,
            "target": repr(run.target), "max_new_tokens": run.max_new_tokens,
        }
        work_name = run.proposal.work_name
        extra_fp, extra_tok = run.proposal.work()   # LM work of the proposal (rollouts, another LM)
        out = []
        for g in range(P.G):
            rows = slice(g * P.N, (g + 1) * P.N)
            steps = {k: v[:, g].tolist() for k, v in traces.items()}
            for k in ("moves_accepted", "unique_after_move"):
                if k in run.host:
                    steps[k] = [x[g] for x in run.host[k]]
            stats = {
                "forward_passes": int(decoding.forward_passes) + extra_fp,
                "tokens_decoded": int(counts.get("tokens_decoded", [0] * P.G)[g]) + extra_tok.get(g, 0),
                "tokens_sampled": int(counts.get("tokens_sampled", [0] * P.G)[g]),
                "wall_time": seconds, "peak_memory": peak_memory(lm.device),
                "resampling_count": int(sum(steps["resampled"])),
                "n_steps": len(steps["ess"]), "batch_prompts": P.G, "host_syncs": run.syncs,
            }
            if work_name is not None:   # the proposal's own LM work, included in the totals above
                stats[f"{work_name}_tokens_decoded"] = extra_tok.get(g, 0)
                stats[f"{work_name}_forward_passes"] = extra_fp
            if self.rejuvenate is not None:
                stats["moves_accepted"] = int(sum(steps["moves_accepted"]))
            error = _failure_message(run, g, causes[g]) if failed[g] else None
            if error is not None and raise_on_failure:
                raise AllParticlesDied(error)
            sam = samples[rows]
            out.append(Result(
                method="smc", prompt_ids=list(run.prompts[g]), samples=sam,
                log_weights=log_w[g].tolist(),
                texts=[lm.decode(s) for s in sam] if lm.tokenizer is not None else None,
                finished=finished[g].tolist(), truncated=truncated[g].tolist(), log_p=log_p[g].tolist(),
                log_evidence=log_Z[g], steps=steps, stats=stats, config=config, seed=seed,
                select=self.select, error=error,
            ))
        return out


@needs.register
def _(engine: SMC, target: Target | None = None) -> Needs:
    """A run of ``engine`` on ``target``: its step, its proposal (the default on ``target``;
    ``Temperature()`` on a pure power target when none is given), its schedule and its moves
    (which replay suffixes token by token)."""
    proposal = engine.proposal or (default_proposal(target) if target is not None else Temperature())
    out = needs(engine.step_kind) | needs(proposal, target) | needs(engine.schedule)
    return out | Needs(full_vocabulary=True) if engine.rejuvenate is not None else out


def _distinct(run: SMCState) -> list[int]:
    """Distinct particle sequences per prompt (what rejuvenation moves increase)."""
    P = run.particles
    toks = completions(run.decoding, P.unfed)
    return [len({tuple(s) for s in toks[g * P.N:(g + 1) * P.N]}) for g in range(P.G)]


def _failure_message(run: SMCState, g: int, causes: torch.Tensor) -> str:
    counts: dict[str, int] = {}
    for c in causes.tolist():
        text = CAUSES.get(c, "unknown cause")
        counts[text] = counts.get(text, 0) + 1
    why = "; ".join(f"{n} particle(s): {c}" for c, n in counts.items())
    where = (f"prompt {g}, " if run.particles.G > 1 else "") + f"SMC step {int(run.particles.failed_at[g])}: "
    cut = run.target.explain_zero_weight([c == _CUT_CAUSE for c in causes.tolist()], run.max_new_tokens)
    hint = (f" {cut[0].upper()}{cut[1:]}." if cut else
            " A constraint that nothing satisfies, or a proposal whose support misses the target's?")
    return (f"{where}every particle has weight zero (log-weight -inf), so the target {run.target!r} "
            f"gives zero density to all of them — {why}.{hint}")


__all__ = ["SMC", "SMCState", "default_proposal"]
