# ---
# jupyter:
#   jupytext:
#     formats: py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # 5. Reward tilts, PRM twists and constraints
#
# Targets compose: `pp.Power(α) * pp.RewardTilt(r, β) * pp.Constraint(...)` is
#
# `γ(y) = p(y|x)^α · exp(r(y)/β) · 1[y ∈ A]`.
#
# The reward `r` only sees *finished* completions, so a sampler that extends prefixes
# token by token learns about it at the very end — all the weight variance lands on
# the last step.  A **process reward** `V(y_≤t)` (a PRM, a heuristic, a value
# estimate) gives SMC an intermediate **twist** `ψ_t = exp(V(y_≤t)/β)`: step `t`
# targets `p(y_≤t)^α ψ_t(y_≤t)`, the weights carry `log ψ_t − log ψ_{t−1}`, and at the
# end the last twist is swapped for the true `exp(r/β)`.  Twists telescope away:
# *any* twist gives the same, exact target; a good one only lowers the variance.
# **Constraints** are either token masks (applied while sampling — the proposal never
# draws a forbidden token) or predicates on finished completions (a weight of 0).

# %%
import math
from collections import defaultdict

import matplotlib.pyplot as plt
import numpy as np
import torch

import llmppl as pp

lm = pp.models.NGramLM(vocab_size=4, order=2, seed=4, concentration=1.0, eos_boost=2.0)   # EOS = 3
PROMPT, T, ALPHA, BETA, N, RUNS = [0], 5, 2.0, 0.5, 8, 100


def reward(completions):
    """r(y): each 2 is worth +1, each 0 costs 0.5, and running out of tokens costs 1."""
    return [c.token_ids.count(2) - 0.5 * c.token_ids.count(0) - (1.0 if c.truncated else 0.0) for c in completions]


def partial_reward(prefixes):
    """A heuristic PRM: the reward of the prefix so far (no truncation penalty yet)."""
    return [p.token_ids.count(2) - 0.5 * p.token_ids.count(0) for p in prefixes]


def evaluate(target, label, n=N, runs=RUNS, **smc_kwargs):
    """SMC over several seeds against the exact target: Ẑ/Z, Var log Ẑ, TV of the pooled particles, ESS."""
    exact = pp.exact.enumerate_target(target, PROMPT, T)
    smc = pp.SMC(n_particles=n, **{"ess_threshold": 0.8, **smc_kwargs})   # resample often: twists act then
    res = [smc.run(target, PROMPT, max_new_tokens=T, seed=s) for s in range(runs)]
    log_Z = np.array([r.log_evidence for r in res])
    ratio = np.exp(log_Z - exact.log_Z)
    w = np.concatenate([r.weights * z for r, z in zip(res, ratio / ratio.sum())])
    out = dict(ratio=ratio.mean(), se=ratio.std(ddof=1) / math.sqrt(runs), var=log_Z.var(),
               tv=exact.tv([s for r in res for s in r.samples], w),
               ess=np.mean([np.mean(r.steps["ess"]) for r in res]), runs=res, exact=exact)
    print(f"{label:>26}: mean Ẑ/Z = {out['ratio']:.3f} ± {out['se']:.3f}   Var log Ẑ = {out['var']:.3f}"
          f"   TV = {out['tv']:.3f}   mean ESS = {out['ess']:.1f}/{n}")
    return out


# %% [markdown]
# ## A reward tilt, without and with twists
#
# Three runs of the same target `p² · exp(r/0.5)`: no twist; the heuristic PRM above;
# and the *exact* twist — the log of the target's marginal mass under each prefix,
# computed here by enumeration (the ideal value function a PRM tries to learn).

# %%
tilted = pp.Target(lm, pp.Power(ALPHA) * pp.RewardTilt(reward, BETA))
exact = pp.exact.enumerate_target(tilted, PROMPT, T)
print("most likely under the tilted target:", [(list(s), round(p, 3)) for s, p in exact.top(3)])


def log_p(prefix):
    seqs = [PROMPT + list(prefix[:k]) for k in range(len(prefix))]
    lp = lm.next_logprobs(seqs).double() if seqs else None
    return float(sum(lp[k, prefix[k]] for k in range(len(prefix)))) if seqs else 0.0


mass = defaultdict(list)
for s, lg in zip(exact.sequences, exact.log_gamma.tolist()):
    for k in range(min(len(s), T - 1) + 1):
        mass[s[:k]].append(lg)
# V(y≤t) = β [log Σ_{y ⊒ y≤t} γ(y) − α log p(y≤t)]: then p(y≤t)^α ψ_t(y≤t) is the target's prefix marginal
value = {pre: BETA * (float(torch.logsumexp(torch.tensor(v), 0)) - ALPHA * log_p(pre)) for pre, v in mass.items()}


def exact_value(prefixes):
    return [value[tuple(p.token_ids)] for p in prefixes]


results = {
    "no twist": evaluate(tilted, "no twist"),
    "heuristic PRM twist": evaluate(pp.Target(lm, pp.Power(ALPHA) * pp.RewardTilt(reward, BETA, partial_reward)),
                                    "heuristic PRM twist"),
    "exact twist": evaluate(pp.Target(lm, pp.Power(ALPHA) * pp.RewardTilt(reward, BETA, exact_value)),
                            "exact twist"),
}

# %% [markdown]
# All three are exact (the pooled particles match `π` and `Ẑ` is unbiased); the twists
# differ in variance.  With a twist the reward's information arrives step by step
# instead of all at the end, and `Var log Ẑ` drops.  Even the exact twist (every
# intermediate target is the marginal of the final one) leaves some variance: the
# proposal `q ∝ p^α` ignores the twist, so the weights still correct for it.

# %%
for name, r in results.items():
    assert abs(r["ratio"] - 1) < 4 * r["se"] + 0.03, name
    assert r["tv"] < 0.12, name
assert results["exact twist"]["var"] < results["no twist"]["var"]
assert results["heuristic PRM twist"]["var"] < results["no twist"]["var"]

fig, ax = plt.subplots(figsize=(7, 3.5))
for name, r in results.items():
    ess = np.array([run.steps["ess"] + [np.nan] * (T - len(run.steps["ess"])) for run in r["runs"]], float)
    ax.plot(np.arange(T), np.nanmean(ess, 0), "o-", label=name)
ax.set(xlabel="step t", ylabel=f"mean ESS (of {N})", title="ESS per step, averaged over runs", ylim=(0, N + 0.5))
ax.legend()
plt.show()

# %% [markdown]
# ## Constraints
#
# Two kinds, composed with the same `*`:
#
# * `pp.Constraint(mask={1, 2, 3})`: token 0 is never allowed.  A mask factorises over
#   tokens, so the proposal simply never draws a forbidden token — no weight is wasted.
# * `pp.Constraint(predicate)`: checked on finished completions only (here: at least two
#   tokens).  A particle that violates it gets weight 0 when it finishes; an optional
#   `prefix=` predicate prunes earlier.

# %%
constrained = pp.Target(lm, pp.Power(ALPHA) * pp.RewardTilt(reward, BETA, partial_reward)
                        * pp.Constraint(mask={1, 2, 3}) * pp.Constraint(lambda c: len(c.token_ids) >= 2))
r = evaluate(constrained, "tilt + PRM + constraints")
print("exact top:", [(list(s), round(p, 3)) for s, p in r["exact"].top(3)])
survivors = [(s, w) for run in r["runs"] for s, w in zip(run.samples, run.weights) if w > 0]
assert all(0 not in s and len(s) >= 2 for s, _ in survivors)
assert all(0 not in s and len(s) >= 2 for s in r["exact"].sequences)
assert abs(r["ratio"] - 1) < 4 * r["se"] + 0.03 and r["tv"] < 0.12

# %% [markdown]
# The same code runs on an LLM: a reward is any `reward(completions) -> list[float]`
# on `Completion`s (`.text`, `.token_ids`, `.finished`, `.truncated`) — a verifier, a
# regex, a reward model — and a process reward is the same on unfinished prefixes,
# typically with segment steps (`step=pp.steps.Until("\n\n")`) so that it scores whole
# reasoning steps.  `Result.steps["twist"]` records the twists for the diagnostics.
