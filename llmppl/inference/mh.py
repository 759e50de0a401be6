"""Block Metropolis–Hastings (Karan & Du, "Reasoning with Sampling", Algorithm 1).

Stages ``k = 1..⌈T/B⌉`` target ``π_k ∝ γ(y_≤L_k)``, ``L_k = min(kB, T)``: every chain
is extended to ``L_k`` tokens (or EOS) by the proposal, then ``n_mcmc`` steps each
pick ``m ~ U{0..len(y)−1}``, redraw the suffix ``y'_≥m`` from the proposal (to
``L_k`` tokens or EOS) and accept with

    log A = log γ(y') − log γ(y) + log q(y|y') − log q(y'|y),
    q(y'|y) = (1/len(y)) · Π_{t≥m} q(y'_t | y'_<t)          (len counts EOS).

``log γ`` is the target's full density: the ``target.log_next`` increments
(``α log p`` and every token-level factor) plus ``log_complete`` on finished (or,
at the last stage, truncated) completions and the twist ``log ψ`` on unfinished
ones at intermediate stages.  All chains are rows of one ``LMState``: a step
duplicates the rows (``reorder``), truncates the copies to ``m`` (their prefix's
KV cache is kept) and decodes the suffixes in one batch; per-position ``log q``
and ``log γ`` increments of the current states are kept, so reverse moves cost
nothing.  :meth:`MH.move` is the resample-move kernel for SMC (``moves.py``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch

from ..targets.base import scaled
from ..targets.target import Target
from ..models.streams import torch_generator
from .common import AllParticlesDied, Stopwatch, make_generator, peak_memory, prepare_prompts
from .decode import Decoded, advance, end_terms
from .footprint import check_fits, mh_footprint
from .moves import MoveContext
from .capabilities import Needs
from .kernel import Engine, StepInfo
from .native import needs
from .proposals import Proposal, Temperature, default_proposal
from .result import Result


def _uniform_index(lengths: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """``m_i ~ U{0, .., lengths_i − 1}``."""
    gen = torch_generator(generator)
    u = torch.rand(len(lengths), generator=gen, device=gen.device).cpu().double()
    return torch.minimum((u * lengths).long(), lengths - 1)


def _log_uniform(n: int, generator: torch.Generator) -> torch.Tensor:
    gen = torch_generator(generator)
    return torch.rand(n, generator=gen, device=gen.device).cpu().double().log()


def _masked_sum(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return torch.where(mask, x, torch.zeros((), dtype=x.dtype)).sum(1)


class _Chains:
    """Per-chain, per-position records of the current states (``(n, T)`` tensors): ``log q``,
    ``log p`` and ``log γ`` increments.  The tokens themselves live in the decoding state."""

    FIELDS = ("log_q", "log_p", "log_inc")

    def __init__(self, n: int, T: int) -> None:
        self.log_q = torch.full((n, T), -math.inf, dtype=torch.float64)
        self.log_p = self.log_q.clone()
        self.log_inc = self.log_q.clone()
        self.length = torch.zeros(n, dtype=torch.long)
        self.ended = torch.zeros(n, dtype=torch.bool)

    def clone(self) -> "_Chains":
        new = _Chains.__new__(_Chains)
        for f in self.FIELDS + ("length", "ended"):
            setattr(new, f, getattr(self, f).clone())
        return new

    def positions(self, lo: torch.Tensor | int = 0) -> torch.Tensor:
        """``(n, T)`` mask of positions ``lo ≤ t < length``."""
        t = torch.arange(self.log_q.shape[1])[None, :]
        lo = torch.as_tensor(lo)
        return (t >= (lo[:, None] if lo.dim() else lo)) & (t < self.length[:, None])

    def write(self, rows: torch.Tensor, start: torch.Tensor, d: Decoded) -> None:
        """Record ``d`` (decoded from position ``start``) into ``rows``; cut what lies beyond."""
        T = self.log_q.shape[1]
        keep = torch.arange(T)[None, :] < start[:, None]
        for f in self.FIELDS:
            arr = getattr(self, f)
            blank = torch.full_like(arr[rows], -math.inf)
            arr[rows] = torch.where(keep, arr[rows], blank)
            W = d.tokens.shape[1]
            if W:
                used = d.tokens >= 0
                r = rows[:, None].expand(-1, W)[used]
                c = (start[:, None] + torch.arange(W)[None, :])[used]
                arr[r, c] = getattr(d, f)[used]
        self.length[rows] = d.length
        self.ended[rows] = d.ended

    def take(self, rows: torch.Tensor, other: "_Chains") -> None:
        """Rows ``rows`` become ``other``'s."""
        for f in self.FIELDS + ("length", "ended"):
            getattr(self, f)[rows] = getattr(other, f)[rows]

    def log_p_total(self) -> torch.Tensor:
        return _masked_sum(self.log_p, self.positions())


def log_acceptance(log_gamma: torch.Tensor, prop_gamma: torch.Tensor, fwd: torch.Tensor, rev: torch.Tensor,
                   length: torch.Tensor, prop_length: torch.Tensor) -> torch.Tensor:
    """The MH log acceptance ratio of suffix moves ``y → y'`` (elementwise over chains):

        log A = log γ(y') − log γ(y) + [rev − log len(y')] − [fwd − log len(y)],

    with ``fwd = Σ_{t≥m} log q(y'_t | y'_<t)``, ``rev = Σ_{t≥m} log q(y_t | y_<t)`` and the
    ``1/len`` of choosing the cut ``m`` uniformly (lengths count EOS, so they differ when
    EOS moves)."""
    return (prop_gamma - log_gamma) + (rev - prop_length.double().log()) - (fwd - length.double().log())


@dataclass
class MHState:
    """The state of one batched MH run (``G`` prompts × ``chains``): what :meth:`MH.init`
    makes, :meth:`MH.step` advances by one stage and :meth:`MH.results` reads.  ``current``
    holds each chain's per-position ``log q``, ``log p`` and ``log γ`` increments; ``decoding``
    is the LM's opaque decoding handle (rows ``0..G·chains−1`` are the chains) and the one home
    of their tokens."""

    target: Target
    prompts: list[list[int]]
    max_new_tokens: int
    chains: int
    decoding: Any
    proposal: Proposal
    generator: torch.Generator
    current: _Chains
    clock: Stopwatch
    seed: int | None = None
    n_stages: int = 0
    stage: int = 0                       # stages run
    decoded: torch.Tensor | None = None  # (n,) tokens fed per chain (EOS is never fed)
    log_gamma: torch.Tensor | None = None   # (n,) log γ of the current states
    trace: dict[str, list] = field(default_factory=lambda: {"log_p": [], "log_target": [], "length": []})
    acceptance: list[torch.Tensor] = field(default_factory=list)   # per stage, (n,) acceptance rate
    stage_length: list[int] = field(default_factory=list)
    proposal_run: Any = None             # what the proposal's start returned for this run
    sampled: torch.Tensor | None = None  # (n,) tokens drawn per chain, EOS and rejected proposals included

    @property
    def done(self) -> bool:
        return self.stage >= self.n_stages


@dataclass(frozen=True)
class MHInfo(StepInfo):
    """One MH stage: the chains' length bound ``L_k`` and the acceptance rate per prompt ``(G,)``."""

    stage_length: int
    acceptance: torch.Tensor


class MH(Engine[MHState]):
    """Block MH over ``γ``: stages of ``block_size`` tokens, ``n_mcmc`` suffix moves per stage.

    ``proposal`` defaults to SMC's (:func:`~llmppl.proposals.default_proposal`):
    ``proposals.Temperature()`` (``q ∝ p^α``, temperature ``1/α``) for a pure ``Power`` target,
    else ``LocallyOptimal()`` (``q ∝ exp(target.log_next)``: token masks, ``Tempered`` factors and
    a base exponent of 0 included).  Chains run batched;
    the result holds their final states with uniform weights.
    """

    method = "mh"

    def __init__(self, block_size: int, n_mcmc: int, proposal: Proposal | None = None,
                 progress: bool = False) -> None:
        if not isinstance(block_size, int) or block_size < 1:
            raise ValueError(f"block_size must be an int >= 1, got {block_size!r}")
        if not isinstance(n_mcmc, int) or n_mcmc < 0:
            raise ValueError(f"n_mcmc must be an int >= 0, got {n_mcmc!r}")
        if proposal is not None and not isinstance(proposal, Proposal):
            raise ValueError(f"proposal must be a llmppl Proposal, got {type(proposal).__name__}")
        if proposal is not None and needs(proposal).random:
            raise ValueError(
                f"MH needs a proposal whose q is a fixed function of the prefix; {proposal!r} is "
                "random (its reverse-move probability cannot be evaluated): use it inside SMC"
            )
        if proposal is not None and needs(proposal).own_state:
            raise ValueError(f"MH supports stateless proposals only (no FromLM), got {proposal!r}: "
                             "a proposal with its own decoding state cannot follow MH's truncations")
        self.block_size = block_size
        self.n_mcmc = n_mcmc
        self.proposal = proposal
        self.progress = progress

    def _proposal(self, target: Target) -> Proposal:
        """The given proposal, else :func:`~llmppl.proposals.default_proposal` (the rule SMC uses)."""
        return self.proposal if self.proposal is not None else default_proposal(target)

    def __repr__(self) -> str:
        return f"MH(block_size={self.block_size}, n_mcmc={self.n_mcmc}, proposal={self.proposal!r})"

    # ------------------------------------------------------------------ run
    def run_batch(self, target: Target, prompts, max_new_tokens: int, chains: int = 1,  # type: ignore[override]
                  seed: int | None = None) -> list[Result]:
        """``chains`` chains for each of ``G`` prompts as ``G·chains`` rows of one decoding state;
        one ``Result`` per prompt, in order (chains never mix prompts: every MH step is per row)."""
        return super().run_batch(target, prompts, max_new_tokens, seed=seed, chains=chains)

    def run(self, target: Target, prompt, max_new_tokens: int, chains: int = 1,  # type: ignore[override]
            seed: int | None = None) -> Result:
        """Run ``chains`` chains of Algorithm 1 and return their final states."""
        return super().run(target, prompt, max_new_tokens, seed=seed, chains=chains)

    # ------------------------------------------------------ init / step / results
    @torch.inference_mode()
    def init(self, target: Target, prompts, max_new_tokens: int, chains: int = 1,  # type: ignore[override]
             seed: int | None = None) -> "MHState":
        """``chains`` empty chains for each of the ``G`` prompts, as ``G·chains`` rows of the LM's
        decoding state, before the first stage.  ``run_batch`` is ``state = init(…)``;
        ``step(state)`` until ``state.done``; ``results(state)``."""
        if isinstance(chains, bool) or not isinstance(chains, int) or chains < 1:
            raise ValueError(f"chains must be an int >= 1, got {chains!r}")
        prompt_ids = prepare_prompts(target, prompts, max_new_tokens)
        G, T = len(prompt_ids), max_new_tokens
        clock = Stopwatch(target.lm.device).start()
        check_fits(mh_footprint(self, target, prompt_ids, T, chains))   # chains + proposal copies
        decoding = target.lm.start(prompt_ids[0] if G == 1 else prompt_ids, chains, max_new_tokens=T)
        n = G * chains
        proposal = self._proposal(target)
        return MHState(target, prompt_ids, T, chains, decoding, proposal,
                       make_generator(seed, n, target.lm.device), _Chains(n, T), clock, seed=seed,
                       n_stages=math.ceil(T / self.block_size),
                       decoded=torch.zeros(n, dtype=torch.long), sampled=torch.zeros(n, dtype=torch.long),
                       log_gamma=torch.full((n,), -math.inf, dtype=torch.float64),
                       proposal_run=proposal.start(target, prompt_ids, chains, T))

    @torch.inference_mode()
    def step(self, state: "MHState") -> tuple["MHState", MHInfo]:
        """Stage ``k`` (advanced in place, and returned with its info): extend every chain to
        ``L_k = min(kB, T)`` tokens (or EOS) from the proposal, then ``n_mcmc`` suffix moves
        accepted with :func:`log_acceptance` (see the module docstring)."""
        if state.done:
            raise ValueError("this MH run has ended (state.done): call results(state)")
        target, dec, cur, gen, proposal = state.target, state.decoding, state.current, state.generator, state.proposal
        a, n = target.base_exponent, len(cur.length)
        ar = torch.arange(n)
        state.stage += 1
        L = min(state.stage * self.block_size, state.max_new_tokens)
        final = L == state.max_new_tokens
        grow = (~cur.ended & (cur.length < L)).nonzero().flatten()
        if len(grow):
            start = cur.length[grow].clone()
            d = advance(target, dec, grow, L, proposal, a, gen, proposal_run=state.proposal_run,
                        max_new_tokens=state.max_new_tokens)
            state.decoded[grow] += (d.tokens >= 0).sum(1) - d.ended.long()
            state.sampled[grow] += (d.tokens >= 0).sum(1)
            cur.write(grow, start, d)
        log_gamma = _masked_sum(cur.log_inc, cur.positions()) + end_terms(
            target, [dec.prompt_of(r) for r in range(n)], dec.tokens, cur.ended, final)
        accepted = torch.zeros(n)
        for _ in range(self.n_mcmc):
            m = _uniform_index(cur.length, gen)
            dec.reorder(torch.cat([ar, ar]))
            dec.truncate(ar + n, m.tolist())
            prop = cur.clone()
            d = advance(target, dec, ar + n, L, proposal, a, gen, proposal_run=state.proposal_run,
                        max_new_tokens=state.max_new_tokens)
            state.decoded += (d.tokens >= 0).sum(1) - d.ended.long()
            state.sampled += (d.tokens >= 0).sum(1)
            prop.write(ar, m, d)
            fwd = _masked_sum(prop.log_q, prop.positions(m))
            rev = _masked_sum(cur.log_q, cur.positions(m))
            bad = (~torch.isfinite(rev)).nonzero().flatten()
            if len(bad):
                raise ValueError(
                    f"MH: the proposal {proposal!r} gives zero probability to the reverse move "
                    f"of chain {int(bad[0])} (its current suffix from position {int(m[bad[0]])}); "
                    "use a proposal whose support covers the target's")
            prop_gamma = _masked_sum(prop.log_inc, prop.positions()) + end_terms(
                target, [dec.prompt_of(r) for r in range(n, 2 * n)], dec.tokens[n:], prop.ended, final)
            log_a = log_acceptance(log_gamma, prop_gamma, fwd, rev, cur.length, prop.length)
            acc = _log_uniform(n, gen) < log_a
            dec.reorder(torch.where(acc, ar + n, ar))
            cur.take(acc.nonzero().flatten(), prop)
            log_gamma = torch.where(acc, prop_gamma, log_gamma)
            accepted += acc.double()
            state.trace["log_p"].append(cur.log_p_total())
            state.trace["log_target"].append(log_gamma.clone())
            state.trace["length"].append(cur.length.clone())
        state.log_gamma = log_gamma
        state.acceptance.append(accepted / max(self.n_mcmc, 1))
        state.stage_length.append(L)
        rate = accepted / max(self.n_mcmc, 1)
        return state, MHInfo(step=state.stage, stage_length=L,
                             acceptance=rate.view(len(state.prompts), state.chains).mean(1))

    @torch.inference_mode()
    def results(self, state: "MHState", raise_on_failure: bool = False) -> list[Result]:
        """One :class:`Result` per prompt: its chains' current states, uniform weights (``−inf``
        for a chain at target density zero).  A prompt whose chains all sit at density zero gets
        ``error`` set, or raises :class:`AllParticlesDied` when ``raise_on_failure``."""
        if state.stage == 0:
            raise ValueError("no MH stage has been run on this state: call step(state) first")
        seconds = state.clock.stop()
        target, dec, cur, chains = state.target, state.decoding, state.current, state.chains
        G = len(state.prompts)
        samples = [list(t) for t in dec.tokens]
        log_p = cur.log_p_total()
        acc_all = torch.stack(state.acceptance)
        alive = torch.isfinite(state.log_gamma)      # a chain stuck at target density zero is no sample
        trace = state.trace
        out = []
        for g in range(G):
            rows = slice(g * chains, (g + 1) * chains)
            error = None
            if not bool(alive[rows].any()):
                error = ((f"prompt {g}: " if G > 1 else "") + f"every MH chain has target density zero "
                         f"(log γ = -inf) after the last stage under {target!r}: a constraint that nothing "
                         "the proposal writes satisfies?")
                if raise_on_failure:
                    raise AllParticlesDied(error)

            def per_chain(values: list[torch.Tensor]) -> list[list[float]]:
                return torch.stack(values, 1)[rows].tolist() if values else [[] for _ in range(chains)]

            acc_g = acc_all[:, rows]
            stats = {"forward_passes": dec.forward_passes,
                     "tokens_decoded": int(state.decoded[rows].sum()),
                     "wall_time": seconds, "peak_memory": peak_memory(target.lm.device),
                     "acceptance_rate": float(acc_g.mean()) if self.n_mcmc and len(acc_g) else None,
                     "batch_prompts": G, "n_steps": state.stage,
                     "tokens_sampled": int(state.sampled[rows].sum())}
            sam = samples[rows]
            out.append(Result(
                method="mh", prompt_ids=state.prompts[g], samples=sam,
                log_weights=[0.0 if a else -math.inf for a in alive[rows].tolist()],
                texts=[target.lm.decode(x) for x in sam] if target.lm.tokenizer is not None else None,
                finished=cur.ended[rows].tolist(), truncated=(~cur.ended[rows]).tolist(),
                log_p=log_p[rows].tolist(),
                steps={"acceptance": [float(x.mean()) for x in acc_g], "stage_length": state.stage_length},
                chains={"log_p": per_chain(trace["log_p"]), "log_target": per_chain(trace["log_target"]),
                        "acceptance": per_chain(state.acceptance), "length": per_chain(trace["length"])},
                stats=stats,
                config={"block_size": self.block_size, "n_mcmc": self.n_mcmc, "proposal": repr(state.proposal),
                        "chains": chains, "max_new_tokens": state.max_new_tokens, "target": repr(target)},
                seed=state.seed, error=error,
            ))
        return out

    # ------------------------------------------------------- resample-move
    def move(self, ctx: MoveContext) -> int:
        """``n_mcmc`` fixed-length suffix moves per particle, invariant for ``γ_t`` (see ``moves.py``).

        ``q`` is the proposal renormalised without EOS; both directions pick ``m`` with
        probability ``1/t`` (same length), so ``log A = Δ[a_t log p + log_other + log ψ_t]
        + log q(y_≥m|y_<m) − log q(y'_≥m|y_<m)``.  The current suffix is replayed
        alongside the proposed one (one forward per position for both) to get its
        ``log q`` and ``log p``, since SMC keeps neither per position.
        """
        target, state, gen = ctx.target, ctx.state, ctx.generator
        proposal = self._proposal(target)
        rows = torch.as_tensor(ctx.rows, dtype=torch.long).reshape(-1)
        rows = rows[torch.tensor([len(state.tokens[r]) > 0 for r in rows.tolist()], dtype=torch.bool)]
        if isinstance(ctx.exponent, torch.Tensor) and ctx.exponent.numel() > 1:
            a = ctx.exponent.reshape(-1).double().cpu()[rows]       # a_t of each moved row
        else:
            a = float(ctx.exponent)
        R, N = len(rows), state.n
        accepted = 0
        if R == 0:
            return 0
        rep, new = N + torch.arange(R), N + R + torch.arange(R)
        for _ in range(self.n_mcmc):
            lengths = torch.tensor([len(state.tokens[r]) for r in rows.tolist()])
            m = _uniform_index(lengths, gen)
            suffix = [state.tokens[r][k:] for r, k in zip(rows.tolist(), m.tolist())]
            state.reorder(torch.cat([torch.arange(N), rows, rows]))
            state.truncate(torch.cat([rep, new]), torch.cat([m, m]).tolist())
            a_both = torch.cat([a, a]) if isinstance(a, torch.Tensor) else a
            d = advance(target, state, torch.cat([rep, new]), torch.cat([lengths, lengths]), proposal,
                        a_both, gen, forced=suffix + [None] * R, allow_eos=False)
            lq, lp, inc = d.total("log_q"), d.total("log_p"), d.total("log_inc")
            bad = (~torch.isfinite(lq[:R])).nonzero().flatten()
            if len(bad):
                raise ValueError(
                    f"MH.move: the proposal {proposal!r} gives zero probability to the current suffix of "
                    f"particle {int(rows[bad[0]])}; use a proposal whose support covers the target's")
            twist_new = (target.log_twist(target.batch([state.prompt_of(r) for r in new.tolist()],
                                                        [state.tokens[r] for r in new.tolist()]))
                         if target.has_twist else torch.zeros(R, dtype=torch.float64))
            log_a = (inc[R:] - inc[:R]) + (twist_new - ctx.log_twist[rows]) + (lq[:R] - lq[R:])
            acc = _log_uniform(R, gen) < log_a
            keep = torch.arange(N)
            keep[rows[acc]] = new[acc]
            state.reorder(keep)
            moved = rows[acc]
            dev = ctx.log_p.device
            moved_d = moved.to(dev)
            ctx.log_p[moved_d] += (lp[R:][acc] - lp[:R][acc]).to(dev)
            a_col = torch.cat([a, a]) if isinstance(a, torch.Tensor) else a
            other = inc - scaled(a_col, lp)            # the non-Power token factors (0 · log 0 = 0)
            ctx.log_other[moved_d] += (other[R:][acc] - other[:R][acc]).to(dev)
            ctx.log_twist[moved_d] = twist_new[acc].to(dev)
            accepted += int(acc.sum())
        return accepted


@needs.register
def _(engine: MH, target: Target | None = None) -> Needs:
    """A run of ``engine``: what its proposal (the default on ``target``) needs; its reverse
    moves use the recorded ``log q`` of each token, so nothing more."""
    return needs(engine.proposal or (default_proposal(target) if target is not None else Temperature()), target)
