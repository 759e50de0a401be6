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
# # 4. MH, Power-SMC and look-ahead on the same target
#
# Three ways to sample `π ∝ p^α`, each a `.run(target, prompt, max_new_tokens, seed)`:
#
# * **`pp.MH`** (block Metropolis–Hastings, Karan & Du): grow the completion block by
#   block; after each block, `n_mcmc` times pick a position uniformly, regenerate the
#   suffix from a proposal and accept with the MH ratio.  Exact in the limit of many
#   steps; the cost is the regenerated suffixes.
# * **`pp.SMC`** (Power-SMC): `N` particles with `q ∝ p^α`, weights and resampling;
#   exact as `N → ∞`, and it returns `log Ẑ`.
# * **`pp.samplers.ScalablePower`** (look-ahead): at each token, estimate the future
#   factor `ζ(y_<t, v) = E_future[p(future)^{α−1}]` for the top-K candidates from a few
#   short rollouts, and sample `∝ p(v)^α ζ(v)`.  Training-free and *approximate*: the
#   rollouts are short and few, and no weight corrects them.
#
# and two baselines that are *not* `p^α`: plain sampling (`p`) and low temperature
# (`τ = 1/α`).  We compare their **quality** — how close to the exact `π` (total
# variation, `E[log p]`) — and their **cost** — tokens decoded, forward passes, seconds.

# %%
import time

import matplotlib.pyplot as plt
import numpy as np

import llmppl as pp

ALPHA, RUNS = 4.0, 40
lm = pp.models.pivotal_lm()
target = pp.Target(lm, pp.Power(ALPHA))
PROMPT, T = [0], 3
exact = pp.exact.enumerate_target(target, PROMPT, max_new_tokens=T)
base = pp.exact.enumerate_target(pp.Target(lm), PROMPT, T)            # the base LM p, for log p(y)
log_p_of = dict(zip(base.sequences, base.log_gamma.tolist()))
exact_logp = exact.mean(lambda s: log_p_of[tuple(s)])
print(f"π(first token = 0) = {sum(p for s, p in exact.as_dict().items() if s[:1] == (0,)):.3f};  "
      f"E_π[log p] = {exact_logp:.3f}")

# %% [markdown]
# Each engine gets a comparable budget of samples; every configuration is run
# `RUNS` times with different seeds, and the runs are pooled (SMC runs weighted by
# their `Ẑ`, as in tutorial 2; the others' samples count equally).

# %%
engines = {
    "SMC (N=8)": (pp.SMC(n_particles=8), {}),
    "MH (B=1, 10 steps, 8 chains)": (pp.MH(block_size=1, n_mcmc=10), {"chains": 8}),
    "look-ahead (K=4, M=2, H=2)": (pp.samplers.ScalablePower(top_k=4, rollouts=2, horizon=2, n=8), {}),
    "low temperature τ=1/α": (pp.baselines.LowTemperature(tau=1 / ALPHA, n=8), {}),
    "plain p": (pp.baselines.Plain(n=8), {}),
}
rows = {}
for name, (engine, kwargs) in engines.items():
    t0 = time.perf_counter()
    runs = [engine.run(target, PROMPT, max_new_tokens=T, seed=s, **kwargs) for s in range(RUNS)]
    seconds = (time.perf_counter() - t0) / RUNS
    if runs[0].log_evidence is not None:
        z = np.exp(np.array([r.log_evidence for r in runs]) - exact.log_Z)
        w = np.concatenate([r.weights * zi for r, zi in zip(runs, z / z.sum())])
    else:
        w = np.concatenate([r.weights / RUNS for r in runs])
    samples = [tuple(s) for r in runs for s in r.samples]
    rows[name] = dict(
        tv=exact.tv(samples, w),
        logp=float(np.sum(w * np.array([log_p_of[s] for s in samples]))),
        tokens=np.mean([r.stats["tokens_decoded"] for r in runs]),
        passes=np.mean([r.stats["forward_passes"] for r in runs]),
        seconds=seconds)
print(f"{'engine':>30} {'TV to π':>8} {'E[log p]':>9} {'tokens':>7} {'passes':>7} {'ms/run':>7}")
for name, r in rows.items():
    print(f"{name:>30} {r['tv']:8.3f} {r['logp']:9.3f} {r['tokens']:7.1f} {r['passes']:7.1f} {1000 * r['seconds']:7.1f}")

# %% [markdown]
# SMC lands on `π`; low temperature and plain sampling are far from it (they target
# other distributions — tutorial 1).  MH is exact only in the limit: to reach the
# mode it must revise the *first* token, which a uniformly chosen position does with
# probability 1/len(y) per step, and the `p^α`-sharpened proposal then picks token 0
# only ~16% of the time — so after 10 steps the chains have not all crossed over
# (raise `n_mcmc` and watch the TV fall).  The look-ahead sampler's rollouts see that
# token 0 has a concentrated future, but with a finite horizon and few rollouts its
# estimate of `ζ` is biased and nothing corrects it.  The cost columns: the
# look-ahead pays for its rollouts, MH for the regenerated suffixes, SMC `N` × the length.

# %%
assert rows["SMC (N=8)"]["tv"] < 0.05
assert rows["MH (B=1, 10 steps, 8 chains)"]["tv"] < min(0.25, rows["low temperature τ=1/α"]["tv"])
assert rows["low temperature τ=1/α"]["tv"] > 0.5 and rows["plain p"]["tv"] > 0.3
assert rows["look-ahead (K=4, M=2, H=2)"]["tv"] < rows["low temperature τ=1/α"]["tv"]
assert abs(rows["SMC (N=8)"]["logp"] - exact_logp) < 0.1

# %%
fig, ax = plt.subplots(figsize=(7, 4))
for name, r in rows.items():
    ax.scatter(r["tokens"], r["tv"], s=60)
    ax.annotate(name, (r["tokens"], r["tv"]), fontsize=8, xytext=(4, 4), textcoords="offset points")
ax.set(xlabel="tokens decoded per run", ylabel="TV distance to exact π", xscale="log",
       title="quality vs cost on the pivotal-token target (α = 4)")
plt.show()

# %% [markdown]
# ## On SmolLM2
#
# No exact answer here, so quality is `log p(y|x)` of the returned completion (higher
# is what `p^α` rewards) and cost is tokens and seconds on this CPU.  Tiny budgets,
# so the numbers are a sketch, not a benchmark (see `llmppl bench` for those).

# %%
llm = pp.models.default_lm()
llm_target = pp.Target(llm, pp.Power(ALPHA), chat=True)
question = "Name three primary colors."
small = {
    "SMC (N=3)": (pp.SMC(n_particles=3), {}),
    "MH (B=3, 1 step, 1 chain)": (pp.MH(block_size=3, n_mcmc=1), {"chains": 1}),
    "look-ahead (K=2, M=1, H=2)": (pp.samplers.ScalablePower(top_k=2, rollouts=1, horizon=2, n=1), {}),
    "low temperature τ=1/α": (pp.baselines.LowTemperature(tau=1 / ALPHA, n=1), {}),
}
for name, (engine, kwargs) in small.items():
    res = engine.run(llm_target, question, max_new_tokens=6, seed=0, **kwargs)
    i = res.best_index()
    print(f"{name:>28}: log p = {res.log_p[i]:7.2f}  tokens = {res.stats['tokens_decoded']:4d}"
          f"  seconds = {res.stats['wall_time']:5.1f}  {res.texts[i]!r}")
    assert np.isfinite(res.log_p[i])

# %% [markdown]
# `Result` objects from every engine share the diagnostics: `res.plot()` draws the
# SMC ESS/genealogy panels or the MH trace/acceptance panels, and `res.to_arviz()`
# hands MH chains to arviz (`az.summary`, `az.rhat`) — run several chains to check
# that they agree before trusting one.
