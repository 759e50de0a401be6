"""Power-SMC on the default model: Thm 1 weights and KV-cache consistency after resampling."""


import pytest
import torch

import llmppl as pp

pytestmark = pytest.mark.model
ALPHA = 4.0


class CacheCheck:
    """A no-op 'rejuvenation' kernel that compares each live particle's cached next-token
    log-probs with a from-scratch recompute after every resampling."""

    def __init__(self):
        self.max_diff, self.checks = 0.0, 0

    def move(self, ctx):
        rows = ctx.rows
        cached = ctx.state.logprobs(rows).float()
        fresh = ctx.target.lm.next_logprobs(ctx.state.sequences(rows))
        self.max_diff = max(self.max_diff, float((cached - fresh).abs().max()))
        self.checks += len(rows)
        return 0


def test_power_smc_weights_and_cache(smollm, chat_prompt):
    target = pp.Target(smollm, pp.Power(ALPHA))
    check = CacheCheck()
    smc = pp.SMC(4, proposal=pp.proposals.Tempered(1 / ALPHA), ess_threshold=1.0, rejuvenate=check)
    T = 5
    res = smc.run(target, chat_prompt, T, seed=0)
    assert check.checks > 0 and check.max_diff < 1e-4, check.max_diff
    # Thm 1: the incremental weight of the particle extended at step t is
    # log Σ_u p(u | y_<t)^α, whatever token it drew.  Follow each final particle's lineage.
    log_Z_before = [0.0]
    for inc in res.steps["log_evidence_increment"]:
        log_Z_before.append(log_Z_before[-1] + inc)
    n_steps = len(res.steps["ess"])
    wanted = []                                     # (sample j, step t, particle index at t)
    for j, sample in enumerate(res.samples):
        k = j
        lineage = {}
        for t in range(n_steps, 0, -1):
            lineage[t] = k
            if t > 1:
                k = res.steps["ancestors"][t - 2][k]
        last = min(n_steps, len(sample) + int(res.finished[j]))
        wanted += [(j, t, lineage[t]) for t in range(1, last + 1)]
    prefixes = sorted({tuple(res.samples[j][: t - 1]) for j, t, _ in wanted})
    lps = smollm.next_logprobs([chat_prompt + list(p) for p in prefixes]).double()  # one batch
    norm = {p: float(torch.logsumexp(ALPHA * lp, 0)) for p, lp in zip(prefixes, lps)}
    checked = 0
    for j, t, k in wanted:
        inc = res.steps["log_weights"][t - 1][k] - log_Z_before[t - 1]
        assert inc == pytest.approx(norm[tuple(res.samples[j][: t - 1])], abs=2e-3), (j, t)
        checked += 1
    assert checked >= 4
    # at step 1 every particle shares the prompt: identical weights
    first = res.steps["log_weights"][0]
    assert max(first) - min(first) < 1e-9
