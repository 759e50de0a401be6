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
# # 1. Sharpening: `p^α` is not low temperature
#
# A language model generates a completion token by token,
# `p(y) = Π_t p(y_t | y_<t)`.  Two ways to make it "more confident":
#
# * **low temperature** `τ < 1`: sharpen every *conditional*,
#   `q_τ(y) = Π_t p(y_t|y_<t)^{1/τ} / Σ_u p(u|y_<t)^{1/τ}`.  Each step is normalised on
#   its own, so we can sample it token by token — cheap, and what every inference server does.
# * **power sampling** `π_α(y) ∝ p(y)^α`: sharpen the *joint* and normalise once, globally.
#
# With `α = 1/τ` the two look alike, but they are different distributions.  The
# normaliser of step `t` in `q_τ` depends on the prefix, and it is exactly that
# dependence that low temperature throws away: `π_α` prefers a prefix whose *futures*
# are concentrated ("few strong futures"), `q_τ` the prefix that is likeliest *now*,
# even when its mass is then spread over "many weak futures".
#
# We first look at this on a continuous 2-D example where both targets can be
# computed and sampled exactly, then on a toy language model with `llmppl.exact`.
#
# **Needs numpyro and jax** (for NUTS on the 2-D example), which are not dependencies of
# llmppl itself: they come with the `dev` extra, `pip install 'llmppl[dev]'` (`make test`
# installs it), or alone with `pip install numpyro`.

# %%
import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np
from jax.scipy.special import logsumexp
from jax.scipy.stats import norm
from numpyro.infer import MCMC, NUTS

import llmppl as pp

jax.config.update("jax_platform_name", "cpu")

# %% [markdown]
# ## A two-"token" Gaussian mixture
#
# `x = (x₁, x₂)`: think of `x₁` as the first token, `x₂` as "the rest of the
# completion".  Component A (weight 0.4) has `x₁ ≈ −0.6` and a *narrow* future
# `x₂ ~ N(0, 0.15²)`; component B (weight 0.6) has `x₁ ≈ +0.6` and a *wide* future
# `x₂ ~ N(0, 1)`.

# %%
W = jnp.array([0.4, 0.6])        # component weights (A, B)
MU1 = jnp.array([-0.6, 0.6])     # mean of x1
SD1 = jnp.array([0.5, 0.5])      # sd of x1
SD2 = jnp.array([0.15, 1.0])     # sd of x2 (the "future"): A narrow, B wide
ALPHA = 4.0


def log_p(x):
    """log p(x1, x2) of the mixture; x has shape (..., 2)."""
    comp = jnp.log(W) + norm.logpdf(x[..., None, 0], MU1, SD1) + norm.logpdf(x[..., None, 1], 0.0, SD2)
    return logsumexp(comp, -1)


def log_p1(x1):
    """Marginal of the first "token": log p(x1)."""
    return logsumexp(jnp.log(W) + norm.logpdf(x1[..., None], MU1, SD1), -1)


# %% [markdown]
# ### The exact answer on a grid
#
# In two dimensions we can simply tabulate every density on a fine grid and
# normalise numerically.  `P(x₁ < 0)` ("took branch A") is the number to watch.

# %%
g1 = np.linspace(-4, 4, 401)
g2 = np.linspace(-7, 7, 701)
X = jnp.stack(jnp.meshgrid(g1, g2, indexing="ij"), -1)          # (401, 701, 2)
LP = np.asarray(log_p(X))


def normalise(logd):
    d = np.exp(logd - logd.max())
    return d / d.sum()


grid_base = normalise(LP)
grid_power = normalise(ALPHA * LP)
# low temperature: sharpen p(x1), then sharpen p(x2|x1) and normalise each conditional separately
cond = LP - np.asarray(log_p1(jnp.asarray(g1)))[:, None]          # log p(x2|x1) on the grid
p1_temp = normalise(ALPHA * np.asarray(log_p1(jnp.asarray(g1))))                   # q(x1)
p2_temp = np.exp(ALPHA * cond - np.asarray(logsumexp(jnp.asarray(ALPHA * cond), axis=1, keepdims=True)))
p2_temp /= p2_temp.sum(1, keepdims=True)                                           # q(x2|x1)
grid_temp = p1_temp[:, None] * p2_temp

exact = {name: float(d[g1 < 0].sum()) for name, d in
         [("base p", grid_base), (f"p^{ALPHA:g}", grid_power), (f"temperature 1/{ALPHA:g}", grid_temp)]}
for name, v in exact.items():
    print(f"{name:>18}: P(branch A) = {v:.3f}")

# %% [markdown]
# Power sampling moves mass *towards* A (the branch with the concentrated future);
# low temperature moves it *away* from A, towards the branch that was likelier at
# the first step.
#
# ### Sampling them
#
# * the base mixture: ancestral sampling (component, then Gaussian);
# * low temperature: ancestral sampling too — draw `x₁` from the sharpened marginal,
#   then `x₂` from the sharpened conditional (here by inverse-CDF on the grid);
# * `p^α`: its normaliser is global, so there is no ancestral sampler.  This is
#   where MCMC comes in; we use numpyro's NUTS on the potential `−α log p(x)`.

# %%
rng = np.random.default_rng(0)
n = 4000
comp = rng.choice(2, size=n, p=np.asarray(W))
base_draws = np.stack([rng.normal(np.asarray(MU1)[comp], np.asarray(SD1)[comp]),
                       rng.normal(0.0, np.asarray(SD2)[comp])], 1)

i1 = rng.choice(len(g1), size=n, p=p1_temp)
i2 = (np.cumsum(p2_temp[i1], 1) < rng.random(n)[:, None]).sum(1).clip(max=len(g2) - 1)  # inverse CDF
temp_draws = np.stack([g1[i1], g2[i2]], 1)

mcmc = MCMC(NUTS(potential_fn=lambda x: -ALPHA * log_p(x)), num_warmup=400, num_samples=1000,
            num_chains=4, chain_method="vectorized", progress_bar=False)
mcmc.run(jax.random.PRNGKey(0), init_params=jnp.zeros((4, 2)))
power_draws = np.asarray(mcmc.get_samples())

sampled = {"base p": base_draws, f"p^{ALPHA:g}": power_draws, f"temperature 1/{ALPHA:g}": temp_draws}
for name, draws in sampled.items():
    print(f"{name:>18}: P(branch A) sampled = {np.mean(draws[:, 0] < 0):.3f}   exact = {exact[name]:.3f}")

# %%
fig, axes = plt.subplots(1, 3, figsize=(13, 4), sharex=True, sharey=True)
for ax, (name, draws) in zip(axes, sampled.items()):
    ax.plot(draws[:, 0], draws[:, 1], ".", ms=1.5, alpha=0.4)
    ax.axvline(0, color="k", lw=0.5)
    ax.set(title=f"{name}: P(A) = {np.mean(draws[:, 0] < 0):.2f}", xlabel="x₁ (first token)", xlim=(-2.5, 2.5),
           ylim=(-3.5, 3.5))
axes[0].set_ylabel("x₂ (the future)")
plt.show()

# %% [markdown]
# The NUTS draws of `p^α` match the grid (the numbers asserted below), and the
# picture shows the contrast: `p^α` piles up on the narrow branch A, low
# temperature on the wide branch B.

# %%
for name, draws in sampled.items():
    assert abs(np.mean(draws[:, 0] < 0) - exact[name]) < 0.05, name
assert exact[f"p^{ALPHA:g}"] > 0.9 > 0.45 > exact["base p"] > 0.35 > exact[f"temperature 1/{ALPHA:g}"]

# %% [markdown]
# ## The same contrast on a language model
#
# `pp.models.pivotal_lm()` is a five-token toy LM built for this: after the prompt
# `[0]` it says token 0 with probability 0.4 and token 1 with 0.6.  After 0 the
# future is almost deterministic (token 2, then EOS); after 1 it is uniform over
# four tokens.  The vocabulary is tiny, so `llmppl.exact` enumerates every
# completion and gives each target exactly.

# %%
lm = pp.models.pivotal_lm()
prompt = [0]
targets = {
    "base p": pp.Target(lm, pp.Power(1.0)),
    f"p^{ALPHA:g}": pp.Target(lm, pp.Power(ALPHA)),
    f"temperature 1/{ALPHA:g}": pp.Target(lm, pp.Tempered(1 / ALPHA)),
}
lm_exact = {name: pp.exact.enumerate_target(t, prompt, max_new_tokens=3) for name, t in targets.items()}
first_is_0 = {name: sum(p for s, p in d.as_dict().items() if s[:1] == (0,)) for name, d in lm_exact.items()}
for name, d in lm_exact.items():
    top = ", ".join(f"{list(s)}: {p:.3f}" for s, p in d.top(3))
    print(f"{name:>18}: P(first token = 0) = {first_is_0[name]:.3f}   top: {top}")

# %%
assert abs(first_is_0["base p"] - 0.4) < 1e-6
assert first_is_0[f"p^{ALPHA:g}"] > 0.85          # p^α picks the pivotal token 0 ...
assert first_is_0[f"temperature 1/{ALPHA:g}"] < 0.2  # ... low temperature avoids it

# %% [markdown]
# The completion `[0, 2]` has probability 0.36 under the base model, while each
# `[1, v]` has only 0.15.  `p^4` raises those to the fourth power *before*
# normalising, so `[0, 2]` wins by a factor `(0.36/0.15)⁴ ≈ 33`.  Low temperature
# sharpens only the first choice (0.4 vs 0.6 → 0.16 vs 0.84) and never looks ahead.
#
# Sampling `p^α` on a real LLM therefore needs more than a temperature knob: the
# next tutorials build sequential Monte Carlo (SMC) for it, with `llmppl.exact` as the
# referee on toy models.
