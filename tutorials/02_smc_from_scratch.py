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
# # 2. SMC on an LLM, from scratch
#
# Goal: sample completions `y` from `π(y) ∝ γ(y) = p(y|x)^α` and estimate
# `Z = Σ_y γ(y)`.  We build the sampler in four moves — importance sampling,
# sequential importance sampling, resampling, and the `τ = 1/α` proposal — check each
# against `llmppl.exact` on a toy LM, then run the same 40 lines on SmolLM2 and
# compare with the library's `pp.SMC`.

# %%
import math
import time

import matplotlib.pyplot as plt
import numpy as np
import torch

import llmppl as pp

ALPHA = 4.0
toy = pp.models.NGramLM(vocab_size=4, order=2, seed=4, concentration=1.0, eos_boost=0.5)  # tokens {0,1,2}, EOS 3
PROMPT, T = [0], 4
target = pp.Target(toy, pp.Power(ALPHA))
exact = pp.exact.enumerate_target(target, PROMPT, max_new_tokens=T)
print(f"{len(exact.sequences)} completions of at most {T} tokens; exact log Z = {exact.log_Z:.4f}")
print("most likely under π:", [(list(s), round(p, 3)) for s, p in exact.top(3)])
print(f"π's mass on completions cut at T = {T} tokens (no EOS): {exact.truncated_mass:.3f}")

# %% [markdown]
# **What happens at the token budget.**  A completion still running after `T` tokens is
# *truncated*.  `pp.Target(..., truncation="keep")` (the default, used here) keeps it, with
# density `p(y_≤T)^α` — the density of the prefix, as if the budget were part of the model;
# `truncation="zero"` gives it density 0, so `π` becomes `p^α` *conditioned on finishing
# within `T` tokens*.  On this toy, whose completions rarely end within 4 tokens, "keep" is
# not a detail: the line above is the share of `π` on cut completions, and every sampler
# below (ours and the library's) targets that same `π`, truncated completions included.
# `Result.truncated_share` reports the weight an SMC run puts on them.

# %% [markdown]
# ## 1. Importance sampling
#
# Draw `y ~ q`, weight it by `w(y) = γ(y)/q(y)`.  Then `Ẑ = mean(w)` is unbiased for
# `Z`, and the self-normalised weights `W_i = w_i/Σ_j w_j` turn the draws into an
# approximation of `π`.  How many draws is that worth?  The **effective sample size**
# `ESS = (Σ w)² / Σ w²` is `N` for equal weights and 1 when one draw has all the weight.
#
# The natural proposal is the LM itself at temperature `1/α`:
# `q(y) = Π_t p(y_t|y_<t)^α / Σ_u p(u|y_<t)^α`.


# %%
def sample_tempered(lm, prompt, n, max_new_tokens, alpha, generator):
    """n completions from the token-level tempered proposal; returns tokens, log q, log p."""
    state = lm.start(prompt, n)
    log_q = torch.zeros(n, dtype=torch.float64)
    log_p = torch.zeros(n, dtype=torch.float64)
    for _ in range(max_new_tokens):
        live = (~state.finished).nonzero().flatten()
        if len(live) == 0:
            break
        lp = state.logprobs(live).double()
        lq = torch.log_softmax(alpha * lp, -1)
        tok = torch.multinomial(lq.exp(), 1, generator=generator).squeeze(1)
        log_q[live] += lq.gather(1, tok[:, None]).squeeze(1)
        log_p[live] += lp.gather(1, tok[:, None]).squeeze(1)
        state.extend(tok, rows=live)
        state.finish(live[tok == lm.eos_token_id])
    seqs = [[v for v in s if v != lm.eos_token_id] for s in state.tokens]
    return seqs, log_q, log_p


gen = torch.Generator().manual_seed(0)
seqs, log_q, log_p = sample_tempered(toy, PROMPT, 2000, T, ALPHA, gen)
log_w = ALPHA * log_p - log_q                                   # log γ(y) − log q(y)
log_Z_is = float(torch.logsumexp(log_w, 0) - math.log(len(log_w)))
print(f"IS: log Ẑ = {log_Z_is:.4f} (exact {exact.log_Z:.4f}),  ESS = {pp.resampling.ess(log_w):.0f} of 2000,"
      f"  TV to π = {exact.tv(seqs, torch.softmax(log_w, 0)):.3f}")
assert abs(log_Z_is - exact.log_Z) < 0.05

# %% [markdown]
# ## 2. Make it sequential, and watch the weights
#
# The weight factorises over tokens, so we can compute it as we go:
# `log w_t = α log p(y_t|y_<t) − log q(y_t|y_<t)`.  With `q ∝ p^α` the drawn token
# cancels out:
#
# `α log p(v|y_<t) − [α log p(v|y_<t) − log Σ_u p(u|y_<t)^α] = log Σ_u p(u|y_<t)^α`
#
# — the same number for **every** candidate `v`.  The weight of step `t` depends
# only on the prefix, never on the token just drawn: this is why `q ∝ p^α` is the
# locally optimal prefix-only proposal for `p^α` (Power-SMC), and why resampling
# *before* seeing the token would be just as good.  Let us check it numerically.

# %%
state = toy.start(PROMPT, 1)
lp = state.logprobs().double()[0]
inc_per_token = ALPHA * lp - torch.log_softmax(ALPHA * lp, -1)
print("incremental log-weight for each candidate token:", inc_per_token.numpy().round(6))
assert float(inc_per_token.max() - inc_per_token.min()) < 1e-9

# %% [markdown]
# ## 3. Sequential Monte Carlo
#
# Sequential importance sampling alone degenerates: the weights of `N` particles
# spread out step after step until one dominates.  SMC watches the ESS and, when
# it drops below `κN`, **resamples**: draw `N` new particles from the current ones
# with probabilities `W_i` (the scheme is a choice — see below), and reset the
# weights to equal.  High-weight prefixes are copied, low-weight ones dropped,
# *before* more compute is spent extending them.  A particle that emits EOS is
# finished: it keeps its weight and gets increments 0 from then on.
#
# The evidence estimate multiplies the average incremental weight of each step:
# `log Ẑ = Σ_t log Σ_i W̄_{t−1}^i w_t^i` (with `W̄` the normalised weights since the
# last resampling) — unbiased for `Z` whatever the resampling decisions were.
#
# The whole algorithm, on any `pp.models.LanguageModel`, returning a `pp.Result` so
# that the library's diagnostics apply:


# %%
def power_smc(lm, prompt, alpha, n, max_new_tokens, resampling="systematic", kappa=0.5, seed=0):
    """SMC for p^α with the q ∝ p^α proposal (constant exponent, token steps)."""
    gen = torch.Generator().manual_seed(seed)
    resample = pp.resampling.get_resampler(resampling)
    t0 = time.perf_counter()
    state = lm.start(prompt, n)
    log_w = torch.zeros(n, dtype=torch.float64)      # log-weights since the last resampling
    log_p = torch.zeros(n, dtype=torch.float64)
    log_Z = 0.0
    steps = {k: [] for k in ("ess", "resampled", "ancestors", "log_weights", "exponent",
                             "log_evidence_increment", "alive")}
    for t in range(max_new_tokens):
        live = (~state.finished).nonzero().flatten()
        if len(live) == 0:
            break
        lp = state.logprobs(live).double()                         # log p(· | y_<t)
        tok = torch.multinomial(torch.softmax(alpha * lp, -1), 1, generator=gen).squeeze(1)
        inc = torch.zeros(n, dtype=torch.float64)
        inc[live] = torch.logsumexp(alpha * lp, -1)                # log Σ_u p(u|y_<t)^α
        log_p[live] += lp.gather(1, tok[:, None]).squeeze(1)
        state.extend(tok, rows=live)
        state.finish(live[tok == lm.eos_token_id])
        step_Z = float(torch.logsumexp(torch.log_softmax(log_w, 0) + inc, 0))
        log_Z += step_Z
        log_w += inc
        ess = pp.resampling.ess(log_w)
        idx = torch.arange(n)
        if ess < kappa * n:
            idx = resample(gen, torch.softmax(log_w, 0), n)
        for key, value in (("ess", ess), ("resampled", ess < kappa * n), ("ancestors", idx.tolist()),
                           ("log_weights", log_w.tolist()), ("exponent", alpha),
                           ("log_evidence_increment", step_Z), ("alive", len(live))):
            steps[key].append(value)
        if ess < kappa * n:
            state.reorder(idx)
            log_p, log_w = log_p[idx], torch.zeros(n, dtype=torch.float64)
    eos = lm.eos_token_id
    samples = [[v for v in s if v != eos] for s in state.tokens]
    finished = [bool(s and s[-1] == eos) for s in state.tokens]
    return pp.Result(
        method="power_smc (tutorial)", prompt_ids=list(prompt), samples=samples, log_weights=log_w.tolist(),
        texts=[lm.decode(s) for s in samples], finished=finished, truncated=[not f for f in finished],
        log_p=log_p.tolist(), log_evidence=log_Z, steps=steps, config={"ess_threshold": kappa, "alpha": alpha},
        stats={"tokens_decoded": state.tokens_decoded, "forward_passes": state.forward_passes,
               "wall_time": time.perf_counter() - t0}, seed=seed)


res = power_smc(toy, PROMPT, ALPHA, n=16, max_new_tokens=T, seed=0)
print(res.summary())

# %% [markdown]
# ### Is it exact?
#
# Two checks against the enumeration.  `Ẑ` is unbiased: the average of `Ẑ/Z` over
# many independent runs is 1, up to its standard error.  And the particles approach
# `π` — but only when runs are pooled correctly: each run's self-normalised weights
# are biased for small `N`, and the right way to combine runs is to weight run `r`
# by its own evidence estimate, `W_i ∝ Ẑ_r · W_i^{(r)}`.

# %%
runs = [power_smc(toy, PROMPT, ALPHA, n=8, max_new_tokens=T, seed=s) for s in range(300)]
ratio = np.exp(np.array([r.log_evidence for r in runs]) - exact.log_Z)
se = ratio.std(ddof=1) / np.sqrt(len(ratio))
pooled = [s for r in runs for s in r.samples]
by_Z = np.concatenate([r.weights * z for r, z in zip(runs, ratio / ratio.sum())])
naive = np.concatenate([r.weights / len(runs) for r in runs])
tv, tv_naive = exact.tv(pooled, by_Z), exact.tv(pooled, naive)
print(f"mean Ẑ/Z = {ratio.mean():.4f} ± {se:.4f}")
print(f"TV(pooled particles, π): {tv:.4f} weighting runs by Ẑ,  {tv_naive:.4f} weighting runs equally")
assert abs(ratio.mean() - 1) < 4 * se + 0.01
assert tv < 0.05 and tv < tv_naive

# %% [markdown]
# ## 4. Resampling schemes side by side
#
# All four schemes in `pp.resampling` are unbiased — particle `i` gets `N·W_i`
# offspring on average — but they differ in the *variance* of the offspring
# counts: multinomial draws `N` independent indices; stratified draws one uniform per
# stratum `[j/N, (j+1)/N)`; systematic shares one uniform across strata; residual
# keeps `⌊N W_i⌋` copies deterministically and draws the rest.  Less variance in the
# resampling step means less noise in `Ẑ`.

# %%
w = torch.softmax(torch.randn(16, generator=torch.Generator().manual_seed(1)) * 1.5, 0)
g = torch.Generator().manual_seed(2)
rows = []
for scheme in sorted(pp.resampling.RESAMPLERS):
    counts = np.stack([np.bincount(pp.resampling.get_resampler(scheme)(g, w, 16).numpy(), minlength=16)
                       for _ in range(2000)])
    logZ = np.array([power_smc(toy, PROMPT, ALPHA, n=8, max_new_tokens=T, resampling=scheme, kappa=1.0,
                               seed=s).log_evidence for s in range(60)])
    rows.append((scheme, np.abs(counts.mean(0) - 16 * w.numpy()).max(), counts.var(0).sum(), logZ.var()))
    print(f"{scheme:>12}: max |E[offspring] − N·W| = {rows[-1][1]:.3f}   Σ Var[offspring] = {rows[-1][2]:6.2f}"
          f"   Var[log Ẑ] (κ = 1) = {rows[-1][3]:.4f}")
offspring_var = {r[0]: r[2] for r in rows}
assert all(r[1] < 0.15 for r in rows)                       # all unbiased
assert offspring_var["systematic"] < offspring_var["multinomial"]
assert offspring_var["residual"] < offspring_var["multinomial"]

# %% [markdown]
# ## 5. The same sampler on a real LLM
#
# Nothing above used the toy model's internals: `power_smc` only calls the batched
# `LMState` interface, which `pp.models.default_lm()` (SmolLM2-135M-Instruct) implements
# with a KV cache (`reorder` copies cache rows in place; no prefix is re-encoded).

# %%
lm = pp.models.default_lm()
prompt = lm.encode_prompt("Name three primary colors.", chat=True)
res_llm = power_smc(lm, prompt, ALPHA, n=8, max_new_tokens=12, seed=0)
print(res_llm.summary())
for i in np.argsort(-res_llm.weights)[:4]:
    print(f"  W={res_llm.weights[i]:.3f}  log p={res_llm.log_p[i]:7.2f}  {res_llm.texts[i]!r}")

# %% [markdown]
# Every `Result` — ours or the library's — plots the same diagnostics: the ESS per
# step with the threshold and the resampling events, the spread of the log-weights,
# the exponent schedule and the genealogy of the particles (which ancestors the final
# particles descend from: resampling prunes lineages, so they coalesce).

# %%
fig = res_llm.plot()
plt.show()
assert math.isfinite(res_llm.log_evidence) and res_llm.n == 8

# %% [markdown]
# ## 6. The library version
#
# `pp.SMC` is this algorithm with the rest of the generality: other proposals and
# exponent schedules (tutorial 3), twists and reward tilts (tutorial 5), segment steps,
# rejuvenation moves, and the bookkeeping (cost statistics, conditional ESS, …).  On
# the toy target it must agree with the enumeration as well — in distribution.  It does
# not draw its random numbers in the same order as our 40 lines (its generator feeds the
# proposal, the resampling and the per-prompt groups in its own layout), so seed by seed
# the two give different runs; what must match is the law of `Ẑ`: both means of `Ẑ/Z`
# are 1 within their standard errors.

# %%
smc = pp.SMC(n_particles=8, proposal=pp.proposals.Temperature(1 / ALPHA), resampling="systematic", ess_threshold=0.5)
lib_runs = [smc.run(target, PROMPT, max_new_tokens=T, seed=s) for s in range(300)]
lib_log_Z = np.array([r.log_evidence for r in lib_runs])
lib_ratio = np.exp(lib_log_Z - exact.log_Z)
lib_se = lib_ratio.std(ddof=1) / np.sqrt(len(lib_ratio))
print(f"pp.SMC: mean Ẑ/Z = {lib_ratio.mean():.4f} ± {lib_se:.4f}   (ours: {ratio.mean():.4f} ± {se:.4f})")
# same algorithm, different random streams: seed by seed the runs differ (by as much as the spread of
# log Ẑ itself), and only their distributions agree
print(f"spread of log Ẑ over the 300 seeds: pp.SMC {lib_log_Z.std():.2f}, ours {np.log(ratio).std():.2f} nats; "
      f"largest seed-by-seed difference {np.abs(lib_log_Z - np.log(ratio) - exact.log_Z).max():.2g} nats")
assert abs(lib_ratio.mean() - 1) < 4 * lib_se + 0.01
print(lib_runs[0].summary())
