"""The decoding engine of the baselines: ``n`` rows per prompt drawn from a proposal to EOS or
``max_new_tokens`` in one :func:`~llmppl.inference.decode.advance` (one native block for a
temperature proposal), no weights, no resampling.  :class:`Decoder` is the engine,
:class:`BatchMixin` the base of every decoding baseline (``Plain``, ``LowTemperature``,
``Greedy``, ``BestOfN``, ``ScalablePower``, ``Constrained``), which supplies a ``Decoder``
(configuration) and an answer rule.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ..targets.target import Target
from .capabilities import Needs
from .common import Stopwatch, make_generator, peak_memory, prepare_prompts
from .decode import Decoded, advance, end_terms
from .footprint import check_fits, decoder_footprint
from .kernel import Engine, StepInfo
from .native import needs
from .proposal import Proposal
from .result import Result


def _check_n(n: int) -> int:
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be an int >= 1, got {n!r}")
    return n


@dataclass
class DecoderState:
    """A decoding baseline's run on ``G`` prompts × ``n`` rows: what :meth:`Decoder.init` makes,
    :meth:`Decoder.step` advances (its one step decodes every row to EOS or ``max_new_tokens``,
    one block) and :meth:`Decoder.results` reads; ``decoding`` is the LM's decoding handle."""

    decoder: "Decoder"
    target: Target
    prompts: list[list[int]]
    max_new_tokens: int
    decoding: Any
    generator: torch.Generator
    clock: Stopwatch
    seed: int | None = None
    proposal_run: Any = None           # what the proposal's start returned for this run
    decoded: Decoded | None = None     # the step's draws, once taken

    @property
    def done(self) -> bool:
        return self.decoded is not None


@dataclass(frozen=True)
class DecodeInfo(StepInfo):
    """The one step of a decoding baseline: tokens drawn per prompt ``(G,)``."""

    tokens: torch.Tensor


class Decoder(Engine[DecoderState]):
    """``n`` rows per prompt decoded from ``proposal`` to EOS or ``max_new_tokens``: one
    :func:`~llmppl.inference.decode.advance` over all ``G·n`` rows (one native block for a
    temperature proposal), no weights, no resampling.  ``stats["log_target"]`` of each sample
    is ``log γ(y)``: the target's token increments plus ``log φ_complete`` (cut completions
    included, as the target's ``truncation`` says)."""

    def __init__(self, method: str, proposal: Proposal, n: int, config: dict) -> None:
        self.method, self.proposal, self.n, self.extra = method, proposal, _check_n(n), config

    @torch.inference_mode()
    def init(self, target: Target, prompts: Sequence, max_new_tokens: int, seed: int | None = None) -> DecoderState:
        """The LM's decoding state started on the ``G`` prompts (``G·n`` rows), nothing drawn yet."""
        ids = prepare_prompts(target, prompts, max_new_tokens)
        lm, G = target.lm, len(ids)
        clock = Stopwatch(lm.device).start()
        check_fits(decoder_footprint(self, target, ids, max_new_tokens))   # rows + the proposal's forks
        decoding = lm.start(ids[0] if G == 1 else ids, self.n, max_new_tokens=max_new_tokens)
        run = self.proposal.start(target, ids, self.n, max_new_tokens)
        return DecoderState(self, target, ids, max_new_tokens, decoding,
                            make_generator(seed, G * self.n, lm.device), clock, seed,
                            proposal_run=run)

    @torch.inference_mode()
    def step(self, state: DecoderState) -> tuple[DecoderState, DecodeInfo]:
        """Every row drawn from the proposal to EOS or ``max_new_tokens`` (one ``advance``)."""
        if state.done:
            raise ValueError("this run has been decoded (state.done): call results(state)")
        G = len(state.prompts)
        rows = torch.arange(G * self.n)
        state.decoded = d = advance(state.target, state.decoding, rows, state.max_new_tokens, self.proposal,
                                    float(state.target.base_exponent), state.generator, feed_last=False,
                                    proposal_run=state.proposal_run, max_new_tokens=state.max_new_tokens)
        return state, DecodeInfo(step=1, tokens=(d.tokens >= 0).sum(1).view(G, self.n).sum(1))

    @torch.inference_mode()
    def results(self, state: DecoderState, raise_on_failure: bool = False) -> list[Result]:
        """One ``Result`` per prompt (uniform weights; ``stats["log_target"]`` = ``log γ(y)``)."""
        if not state.done:
            raise ValueError("nothing has been decoded on this state: call step(state) first")
        target, ids, d, T, n = state.target, state.prompts, state.decoded, state.max_new_tokens, self.n
        lm, G = target.lm, len(ids)
        samples = [[t for t in row if t >= 0][: int(k) - int(e)] for row, k, e in
                   zip(d.tokens.tolist(), d.length.tolist(), d.ended.tolist())]
        log_target = d.total("log_inc") + end_terms(target, [ids[g] for g in range(G) for _ in range(n)],
                                                     samples, d.ended, final=True)
        seconds = state.clock.stop()
        log_p, log_q, drawn = d.total("log_p"), d.total("log_q"), (d.tokens >= 0).sum(1)
        fed = drawn - d.ended.long() - (~d.ended & (drawn >= T)).long()
        extra_fp, extra_tok = self.proposal.work(state.proposal_run)   # its own LM work (look-ahead rollouts)
        out = []
        for g in range(G):
            rows = slice(g * n, (g + 1) * n)
            sam = samples[rows]
            stats = {"forward_passes": int(state.decoding.forward_passes) + extra_fp,
                     "tokens_decoded": int(fed[rows].sum()) + extra_tok.get(g, 0),
                     "tokens_sampled": int(drawn[rows].sum()), "wall_time": seconds,
                     "peak_memory": peak_memory(lm.device), "batch_prompts": G, "n_steps": 1,
                     "log_target": log_target[rows].tolist(), "log_q": log_q[rows].tolist()}
            if self.proposal.work_name is not None:   # included in the totals above
                stats[f"{self.proposal.work_name}_tokens_decoded"] = extra_tok.get(g, 0)
                stats[f"{self.proposal.work_name}_forward_passes"] = extra_fp
            out.append(Result(
                method=self.method, prompt_ids=list(ids[g]), samples=sam, log_weights=[0.0] * n,
                texts=[lm.decode(s) for s in sam] if lm.tokenizer is not None else None,
                finished=d.ended[rows].tolist(), truncated=(~d.ended[rows]).tolist(), log_p=log_p[rows].tolist(),
                log_evidence=None, steps={}, stats=stats, seed=state.seed,
                config={"n": n, "max_new_tokens": T, "proposal": repr(self.proposal), "target": repr(target),
                        **self.extra}))
        return out


class BatchMixin(Engine[DecoderState]):
    """``init`` / ``step`` / ``results`` of a decoding baseline from its ``_decoder()`` (a
    :class:`Decoder`, configuration) and ``_finish`` (its answer rule); the driver is
    :class:`~llmppl.inference.kernel.Engine`'s."""

    def _decoder(self) -> Decoder:
        raise NotImplementedError

    def _finish(self, target: Target, res: Result) -> Result:
        return res

    def init(self, target: Target, prompts: Sequence, max_new_tokens: int,
             seed: int | None = None) -> DecoderState:
        return self._decoder().init(target, prompts, max_new_tokens, seed)

    def step(self, state: DecoderState) -> tuple[DecoderState, DecodeInfo]:
        return state.decoder.step(state)

    def results(self, state: DecoderState, raise_on_failure: bool = False) -> list[Result]:
        return [self._finish(state.target, r) for r in state.decoder.results(state)]


@needs.register
def _(engine: Decoder, target: Target | None = None) -> Needs:
    return needs(engine.proposal, target)


@needs.register
def _(engine: BatchMixin, target: Target | None = None) -> Needs:
    """A decoding baseline needs what its proposal needs (one block per row when native)."""
    return needs(engine._decoder(), target)



__all__ = ["Decoder", "DecoderState", "DecodeInfo", "BatchMixin"]
