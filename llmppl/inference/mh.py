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

import torch
from tqdm.auto import tqdm

from ..targets.target import Target
from .common import Stopwatch, peak_memory, prepare_run, run_each
from .decode import Decoded, advance, end_terms
from .moves import MoveContext
from .proposals import FromLM, LocallyOptimal, Proposal
from .result import Result


def _stateful(proposal: Proposal | None) -> bool:
    """A proposal with its own decoding state (FromLM, possibly wrapped) cannot follow truncations."""
    if proposal is None:
        return False
    return isinstance(proposal, FromLM) or _stateful(getattr(proposal, "inner", None))


def _uniform_index(lengths: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """``m_i ~ U{0, .., lengths_i − 1}``."""
    u = torch.rand(len(lengths), generator=generator, device=generator.device).cpu().double()
    return torch.minimum((u * lengths).long(), lengths - 1)


def _log_uniform(n: int, generator: torch.Generator) -> torch.Tensor:
    return torch.rand(n, generator=generator, device=generator.device).cpu().double().log()


def _masked_sum(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return torch.where(mask, x, torch.zeros((), dtype=x.dtype)).sum(1)


class _Chains:
    """Per-chain, per-position records of the current states (``(n, T)`` tensors)."""

    FIELDS = ("tokens", "log_q", "log_p", "log_inc")

    def __init__(self, n: int, T: int) -> None:
        self.tokens = torch.full((n, T), -1, dtype=torch.long)
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
        t = torch.arange(self.tokens.shape[1])[None, :]
        lo = torch.as_tensor(lo)
        return (t >= (lo[:, None] if lo.dim() else lo)) & (t < self.length[:, None])

    def write(self, rows: torch.Tensor, start: torch.Tensor, d: Decoded) -> None:
        """Record ``d`` (decoded from position ``start``) into ``rows``; cut what lies beyond."""
        T = self.tokens.shape[1]
        keep = torch.arange(T)[None, :] < start[:, None]
        for f in self.FIELDS:
            arr = getattr(self, f)
            blank = torch.full_like(arr[rows], -1 if f == "tokens" else -math.inf)
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


class MH:
    """Block MH over ``γ``: stages of ``block_size`` tokens, ``n_mcmc`` suffix moves per stage.

    ``proposal`` defaults to ``q ∝ exp(target.log_next)``, i.e. ``Tempered(1/α)`` (``q ∝ p^α``)
    for a ``Power`` target (token masks and other token-level factors included).  Chains run batched;
    the result holds their final states with uniform weights.
    """

    def __init__(self, block_size: int, n_mcmc: int, proposal: Proposal | None = None,
                 progress: bool = False) -> None:
        if not isinstance(block_size, int) or block_size < 1:
            raise ValueError(f"block_size must be an int >= 1, got {block_size!r}")
        if not isinstance(n_mcmc, int) or n_mcmc < 0:
            raise ValueError(f"n_mcmc must be an int >= 0, got {n_mcmc!r}")
        if proposal is not None and not isinstance(proposal, Proposal):
            raise ValueError(f"proposal must be a llmppl Proposal, got {type(proposal).__name__}")
        if getattr(proposal, "stochastic", False):
            raise ValueError(
                f"MH needs a proposal whose q is a fixed function of the prefix; {proposal!r} is "
                "random (its reverse-move probability cannot be evaluated): use it inside SMC"
            )
        if _stateful(proposal):
            raise ValueError(f"MH supports stateless proposals only (no FromLM), got {proposal!r}")
        self.block_size = block_size
        self.n_mcmc = n_mcmc
        self.proposal = proposal
        self.progress = progress

    def _proposal(self) -> Proposal:
        """The default ``q ∝ exp(target.log_next(·, a))`` is ``Tempered(1/a)`` for a ``Power`` target."""
        return self.proposal if self.proposal is not None else LocallyOptimal()

    def __repr__(self) -> str:
        return f"MH(block_size={self.block_size}, n_mcmc={self.n_mcmc}, proposal={self.proposal!r})"

    # ------------------------------------------------------------------ run
    def run_batch(self, target: Target, prompts, max_new_tokens: int, chains: int = 1,
                  seed: int | None = None) -> list[Result]:
        """One ``Result`` (``chains`` chains) per prompt, in order."""
        return run_each(self.run, target, prompts, max_new_tokens, seed, chains=chains)

    def run(self, target: Target, prompt, max_new_tokens: int, chains: int = 1,
            seed: int | None = None) -> Result:
        """Run ``chains`` chains of Algorithm 1 and return their final states."""
        if not isinstance(chains, int) or chains < 1:
            raise ValueError(f"chains must be an int >= 1, got {chains!r}")
        ids, gen = prepare_run(target, prompt, max_new_tokens, seed)
        a = target.base_exponent
        proposal = self._proposal()
        T, n, B = max_new_tokens, chains, self.block_size
        ar = torch.arange(n)
        with Stopwatch(target.lm.device) as clock:
            state = target.lm.start(ids, n)
            cur = _Chains(n, T)
            trace = {"log_p": [], "log_target": [], "length": []}
            acc_stage, stage_len = [], []
            n_stages = math.ceil(T / B)
            for k in tqdm(range(1, n_stages + 1), disable=not self.progress, desc="MH stages"):
                L = min(k * B, T)
                final = L == T
                grow = (~cur.ended & (cur.length < L)).nonzero().flatten()
                if len(grow):
                    start = cur.length[grow].clone()
                    cur.write(grow, start, advance(target, state, grow, L, proposal, a, gen))
                log_gamma = _masked_sum(cur.log_inc, cur.positions()) + end_terms(
                    target, ids, state.tokens, cur.ended, final)
                accepted = torch.zeros(n)
                for _ in range(self.n_mcmc):
                    m = _uniform_index(cur.length, gen)
                    state.reorder(torch.cat([ar, ar]))
                    state.truncate(ar + n, m.tolist())
                    prop = cur.clone()
                    prop.write(ar, m, advance(target, state, ar + n, L, proposal, a, gen))
                    fwd = _masked_sum(prop.log_q, prop.positions(m))
                    rev = _masked_sum(cur.log_q, cur.positions(m))
                    bad = (~torch.isfinite(rev)).nonzero().flatten()
                    if len(bad):
                        raise ValueError(
                            f"MH: the proposal {proposal!r} gives zero probability to the reverse move "
                            f"of chain {int(bad[0])} (its current suffix from position {int(m[bad[0]])}); "
                            "use a proposal whose support covers the target's")
                    prop_gamma = _masked_sum(prop.log_inc, prop.positions()) + end_terms(
                        target, ids, state.tokens[n:], prop.ended, final)
                    # log q(y|y') = rev − log len(y'),  log q(y'|y) = fwd − log len(y)
                    log_a = (prop_gamma - log_gamma) + (rev - prop.length.double().log()) - (
                        fwd - cur.length.double().log())
                    acc = _log_uniform(n, gen) < log_a
                    state.reorder(torch.where(acc, ar + n, ar))
                    cur.take(acc.nonzero().flatten(), prop)
                    log_gamma = torch.where(acc, prop_gamma, log_gamma)
                    accepted += acc.double()
                    trace["log_p"].append(cur.log_p_total())
                    trace["log_target"].append(log_gamma.clone())
                    trace["length"].append(cur.length.clone())
                acc_stage.append(accepted / max(self.n_mcmc, 1))
                stage_len.append(L)
        samples = [list(t) for t in state.tokens]
        log_p = cur.log_p_total()
        stats = {"forward_passes": state.forward_passes, "tokens_decoded": state.tokens_decoded,
                 "wall_time": clock.seconds, "peak_memory": peak_memory(target.lm.device),
                 "acceptance_rate": float(torch.stack(acc_stage).mean()) if self.n_mcmc else None}

        def per_chain(rows: list[torch.Tensor]) -> list[list[float]]:
            return torch.stack(rows, 1).tolist() if rows else [[] for _ in range(n)]

        return Result(
            method="mh", prompt_ids=ids, samples=samples, log_weights=[0.0] * n,
            texts=[target.lm.decode(s) for s in samples] if target.lm.tokenizer is not None else None,
            finished=cur.ended.tolist(), truncated=(~cur.ended).tolist(), log_p=log_p.tolist(),
            steps={"acceptance": [float(x.mean()) for x in acc_stage], "stage_length": stage_len},
            chains={"log_p": per_chain(trace["log_p"]), "log_target": per_chain(trace["log_target"]),
                    "acceptance": per_chain(acc_stage), "length": per_chain(trace["length"])},
            stats=stats,
            config={"block_size": B, "n_mcmc": self.n_mcmc, "proposal": repr(proposal),
                    "chains": n, "max_new_tokens": T, "target": repr(target)},
            seed=seed,
        )

    # ------------------------------------------------------- resample-move
    def move(self, ctx: MoveContext) -> int:
        """``n_mcmc`` fixed-length suffix moves per particle, invariant for ``γ_t`` (see ``moves.py``).

        ``q`` is the proposal renormalised without EOS; both directions pick ``m`` with
        probability ``1/t`` (same length), so ``log A = Δ[a_t log p + log_other + log ψ_t]
        + log q(y_≥m|y_<m) − log q(y'_≥m|y_<m)``.  The current suffix is replayed
        alongside the proposed one (one forward per position for both) to get its
        ``log q`` and ``log p``, since SMC keeps neither per position.
        """
        target, state, a, gen = ctx.target, ctx.state, float(ctx.exponent), ctx.generator
        proposal = self._proposal()
        rows = torch.as_tensor(ctx.rows, dtype=torch.long).reshape(-1)
        rows = rows[torch.tensor([len(state.tokens[r]) > 0 for r in rows.tolist()], dtype=torch.bool)]
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
            d = advance(target, state, torch.cat([rep, new]), torch.cat([lengths, lengths]), proposal,
                        a, gen, forced=suffix + [None] * R, allow_eos=False)
            lq, lp, inc = d.total("log_q"), d.total("log_p"), d.total("log_inc")
            bad = (~torch.isfinite(lq[:R])).nonzero().flatten()
            if len(bad):
                raise ValueError(
                    f"MH.move: the proposal {proposal!r} gives zero probability to the current suffix of "
                    f"particle {int(rows[bad[0]])}; use a proposal whose support covers the target's")
            twist_new = (target.log_twist(target.batch(state.prompt, [state.tokens[r] for r in new.tolist()]))
                         if target.has_twist else torch.zeros(R, dtype=torch.float64))
            log_a = (inc[R:] - inc[:R]) + (twist_new - ctx.log_twist[rows]) + (lq[:R] - lq[R:])
            acc = _log_uniform(R, gen) < log_a
            keep = torch.arange(N)
            keep[rows[acc]] = new[acc]
            state.reorder(keep)
            moved = rows[acc]
            ctx.log_p[moved] += lp[R:][acc] - lp[:R][acc]
            ctx.log_other[moved] += (inc[R:] - a * lp[R:])[acc] - (inc[:R] - a * lp[:R])[acc]
            ctx.log_twist[moved] = twist_new[acc]
            accepted += int(acc.sum())
        return accepted
