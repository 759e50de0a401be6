"""Checks of the block primitive's masks, normalisers and delimiters (``llmppl.models.block``),
shared by the HF test (tests/test_block_extras.py) and the vLLM test (tests/test_vllm_block.py).

The independent answer is the transformers forward of the same tiny random Llama
(``model(ids).logits``, float64 ``log_softmax``): every drawn token's ``log p``, ``log q`` under the
masked, renormalised proposal, ``log_norm`` and ``log_norm_next`` are recomputed from it, and the
draws of 2-token blocks under a callable mask are held to the exact law of the pairs.
"""

from __future__ import annotations

import math

import torch

from llmppl.models.block import BlockSpec

V = 8
STOP = (7,)
TOL = 1e-4


def ref_logprobs(model, seq: list[int]) -> torch.Tensor:
    """``(len(seq), V)`` float64 ``log_softmax(model(seq).logits)``: row i is ``log p(· | seq[:i+1])``."""
    with torch.no_grad():
        return torch.log_softmax(model(torch.tensor([seq])).logits[0].double(), dim=-1)


def parity_mask(k: torch.Tensor, tokens: list[list[int]]) -> torch.Tensor:
    """A callable mask that depends on the row and its completion: after an even token only odd
    tokens, after an odd one (or at the start) only even ones; row 1 mod 3 also never draws 2."""
    out = torch.zeros((len(tokens), V), dtype=torch.bool)
    for i, (kk, t) in enumerate(zip(k.tolist(), tokens)):
        parity = 0 if not t or t[-1] % 2 else 1
        out[i, parity::2] = True
        if kk % 3 == 1:
            out[i, 2] = False
    return out


def mask_of(spec: BlockSpec, k: int, completion: list[int]) -> torch.Tensor:
    """The reference ``M`` of row ``k`` after ``completion``: allowed ∧ mask_fn ∧ (no stop ids
    unless ``allow_stop``)."""
    m = torch.ones(V, dtype=torch.bool)
    if spec.allowed is not None:
        m &= spec.allowed if spec.allowed.dim() == 1 else spec.allowed[k]
    if spec.mask_fn is not None:
        m &= torch.as_tensor(spec.mask_fn(torch.tensor([k]), [list(completion)]), dtype=torch.bool).reshape(-1, V)[0]
    if not spec.allow_stop:
        m[list(spec.stop_ids)] = False
    return m


def check_extras(state, model, rows, spec: BlockSpec, block, before: list[list[int]]) -> int:
    """Every drawn token of ``block`` against the transformers forward: ``log p``, ``log q`` of the
    masked proposal (or the masked mode when greedy), the token inside its mask, ``log_norm`` at
    ``spec.norm_exponent``, ``log_norm_next``, the end ids and what was fed; returns the cells checked."""
    checked = 0
    end = set(spec.end_ids)
    for k, r in enumerate(rows):
        L = int(block.length[k])
        drawn = block.tokens[k, :L].tolist()
        assert (block.tokens[k, L:] == -1).all() and torch.isinf(block.log_p[k, L:]).all()
        prefix = state.prompt_of(r) + before[k]
        ref = ref_logprobs(model, prefix + drawn)
        for j, tok in enumerate(drawn):
            lp = ref[len(prefix) + j - 1]
            M = mask_of(spec, k, before[k] + drawn[:j])
            assert M[tok], (k, j, tok)
            assert abs(float(lp[tok]) - float(block.log_p[k, j])) < TOL
            scores = lp.masked_fill(~M, -math.inf)
            if spec.greedy:
                assert tok == int(scores.argmax()) and float(block.log_q[k, j]) == 0.0
            else:
                lq = torch.log_softmax(scores / float(spec.temperature[k]), -1)
                assert abs(float(lq[tok]) - float(block.log_q[k, j])) < TOL, (k, j, float(lq[tok]),
                                                                                float(block.log_q[k, j]))
            if spec.norm_exponent is not None:
                a = float(spec.norm_exponent[k])
                want = float(torch.logsumexp((a * lp).masked_fill(~M, -math.inf), -1))
                assert abs(want - float(block.log_norm[k, j])) < TOL, (k, j, want, float(block.log_norm[k, j]))
            checked += 1
        stopped = bool(L and drawn[-1] in spec.stop_ids and spec.allow_stop)
        assert bool(block.ended[k]) == stopped
        hit = [j for j, t in enumerate(drawn) if t in end and t not in spec.stop_ids]
        if end:
            assert bool(block.delimited[k]) == bool(hit)
            if hit:
                assert hit == [L - 1]           # the first end id ends the row's block
        fed_all = not stopped and not (L == int(spec.budget[k]) and not _feed_last(spec, k))
        assert list(state.tokens[r]) == before[k] + (drawn if fed_all else drawn[:-1])
        if spec.norm_next:
            got = float(block.log_norm_next[k])
            if L and fed_all:
                lp = ref[-1]
                M = mask_of(spec, k, before[k] + drawn)
                a = float(spec.norm_exponent[k])
                want = float(torch.logsumexp((a * lp).masked_fill(~M, -math.inf), -1))
                assert abs(want - got) < TOL, (k, want, got)
                checked += 1
            else:
                assert math.isnan(got)
    return checked


def _feed_last(spec: BlockSpec, k: int) -> bool:
    fl = spec.feed_last
    if isinstance(fl, torch.Tensor):
        return bool(fl[k])
    return fl is not False


def run_parity(lm, model) -> int:
    """Blocks with every new field on 9 rows of 3 prompts (all rows, then a subset), checked cell by
    cell; returns the number of cells."""
    state = lm.start([[1, 2, 3], [4, 5], [6]], n=3, max_new_tokens=30)
    tau = torch.tensor([1.0, 0.5, 2.0, 0.7, 1.0, 1.3, 0.9, 0.6, 1.5], dtype=torch.float64)
    a = torch.tensor([2.0, 0.5, 1.0, 4.0, 1.0, 0.0, 1.5, 3.0, 0.8], dtype=torch.float64)
    g = torch.Generator().manual_seed(5)
    per_row = torch.ones((9, V), dtype=torch.bool)
    for k in range(9):
        per_row[k, k % 6] = False
        per_row[k, (k + 2) % 6] = False
    checked = 0
    specs = [
        BlockSpec.make(9, 5, tau, STOP, allowed=per_row, norm_exponent=a, norm_next=True),
        BlockSpec.make(9, 4, tau, STOP, mask_fn=parity_mask, norm_exponent=1.0 / tau, norm_next=True),
        BlockSpec.make(9, 6, tau, STOP, allow_stop=False, end_ids=(3,), norm_exponent=a, norm_next=True,
                       allowed=torch.tensor([1, 1, 1, 1, 0, 1, 1, 1], dtype=torch.bool)),
        BlockSpec.make(9, 3, tau, STOP, mask_fn=parity_mask, allowed=per_row, end_ids=(4, 7), norm_exponent=a,
                       norm_next=True, feed_last=torch.tensor([k % 2 == 0 for k in range(9)])),
        BlockSpec.make(9, 3, 1.0, STOP, greedy=True, mask_fn=parity_mask, norm_exponent=a, norm_next=True),
    ]
    seen = {"delimited": 0, "next": 0, "next_nan": 0, "ended": 0}
    for rows in (list(range(9)), [1, 4, 5, 8]):
        for spec in specs:
            idx = torch.tensor(rows)
            sub = _sub_spec(spec, idx) if len(rows) < 9 else spec
            before = [list(state.tokens[r]) for r in rows]
            block = state.sample_block(idx, sub, g)
            checked += check_extras(state, model, rows, sub, block, before)
            seen["ended"] += int(block.ended.sum())
            if block.delimited is not None:
                seen["delimited"] += int(block.delimited.sum())
            if block.log_norm_next is not None:
                seen["next"] += int(torch.isfinite(block.log_norm_next).sum())
                seen["next_nan"] += int(block.log_norm_next.isnan().sum())
            if spec.norm_exponent is not None and torch.equal(spec.norm_exponent, 1.0 / tau) and not spec.greedy:
                # with a = 1/τ the normaliser is a·log p − log q of the drawn token
                drawn = block.tokens >= 0
                lhs = block.log_norm[drawn]
                rhs = (sub.norm_exponent[:, None] * block.log_p - block.log_q)[drawn]
                assert torch.allclose(lhs, rhs, atol=TOL)
            # rows that stopped start over from their prompt so the next block has something to draw
            state.truncate([r for r, e in zip(rows, block.ended.tolist()) if e],
                           [0 for e in block.ended.tolist() if e])
            long = [r for r in rows if len(state.tokens[r]) > 20]
            state.truncate(long, [0] * len(long))
    assert min(seen.values()) >= 3, seen      # every case met several times
    return checked


def _sub_spec(spec: BlockSpec, idx: torch.Tensor) -> BlockSpec:
    """``spec`` restricted to the block rows ``idx`` (per-row fields indexed; a callable mask keeps
    the original row numbers, so that its rows mean the same state rows)."""
    import dataclasses

    fl = spec.feed_last[idx] if isinstance(spec.feed_last, torch.Tensor) else spec.feed_last
    fn = spec.mask_fn
    sub_fn = None if fn is None else (lambda k, tokens: fn(idx[k], tokens))
    return dataclasses.replace(
        spec, budget=spec.budget[idx], temperature=spec.temperature[idx], feed_last=fl, mask_fn=sub_fn,
        allowed=spec.allowed[idx] if spec.allowed is not None and spec.allowed.dim() == 2 else spec.allowed,
        norm_exponent=None if spec.norm_exponent is None else spec.norm_exponent[idx])


def pair_law(model, prompt: list[int], tau: float, mask_fn) -> torch.Tensor:
    """Exact ``(V·V,)`` law of 2-token blocks from ``q ∝ p^{1/τ}·M`` (EOS excluded), ``M`` from
    ``mask_fn`` on row 0 (all ones when None)."""
    spec = BlockSpec.make(1, 2, tau, STOP, allow_stop=False, mask_fn=mask_fn)
    first = ref_logprobs(model, prompt)[-1]
    out = torch.full((V, V), -math.inf, dtype=torch.float64)
    M1 = mask_of(spec, 0, [])
    lq1 = torch.log_softmax(first.masked_fill(~M1, -math.inf) / tau, -1)
    for x in range(V):
        if M1[x]:
            second = ref_logprobs(model, prompt + [x])[-1]
            M2 = mask_of(spec, 0, [x])
            out[x] = lq1[x] + torch.log_softmax(second.masked_fill(~M2, -math.inf) / tau, -1)
    return out.reshape(-1).exp()


def run_law(lm, model, N: int = 3000) -> tuple[float, float]:
    """TV between the counts of N 2-token blocks drawn under ``parity_mask`` at τ = 0.6 and the exact
    law, and between the same counts and the unmasked law (the impostor)."""
    tau, prompt = 0.6, [2, 5]

    def row0_mask(k, tokens):
        return parity_mask(torch.zeros_like(k), tokens)

    state = lm.start(prompt, n=N, max_new_tokens=2)
    spec = BlockSpec.make(N, 2, tau, STOP, allow_stop=False, mask_fn=row0_mask)
    block = state.sample_block(torch.arange(N), spec, torch.Generator().manual_seed(3))
    assert (block.length == 2).all()
    emp = torch.bincount(block.tokens[:, 0] * V + block.tokens[:, 1], minlength=V * V).double() / N
    return (0.5 * float((emp - pair_law(model, prompt, tau, row0_mask)).abs().sum()),
            0.5 * float((emp - pair_law(model, prompt, tau, None)).abs().sum()))
