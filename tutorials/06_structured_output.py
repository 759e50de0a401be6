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
# # 6. Structured output: grammar constraints, exactly
#
# A **grammar constraint** is the potential `φ_L(y) = 1[text(y) ∈ L]` for a language `L` given
# by a regular expression (`pp.constraints.Regex`), a JSON Schema (`pp.constraints.JSONSchema`)
# or a context-free grammar (`pp.constraints.Grammar`, Lark syntax).  Composed with the base LM,
#
# `π(y) ∝ p(y | x)^α · 1[y ∈ L]`,
#
# is "the model's answer, given that it parses".  llguidance computes, after every prefix
# `y_<t`, the exact set of next tokens that keep the text a prefix of some string of `L` (EOS only
# where the text is complete): the *mask* `m(y_<t, ·)`.
#
# **Greedy constrained decoding** — what vLLM's structured outputs, outlines or xgrammar do —
# samples `y_t ∝ p(y_t | y_<t) · m(y_<t, y_t)` and moves on.  Its law is
#
# `q(y) = Π_t p(y_t | y_<t) · m / Z_t(y_<t)`,   `Z_t(y_<t) = Σ_{v allowed} p(v | y_<t)`,
#
# which is `p(y) · 1[y ∈ L] / Π_t Z_t(y_<t)`: every path is divided by the mass the mask
# removed along it.  A prefix whose continuations inside `L` are unlikely under `p` keeps the
# mass it had *before* masking — that is the distortion.  **SMC** with the same masked proposal
# carries the weight `Π_t Z_t` (the masked normaliser, `log Σ_{v allowed} p(v)^{a_t}` per token),
# so it targets `p^α · 1[y ∈ L]` exactly.  Below: a tiny language where everything can be
# enumerated, then JSON extraction on the same model.

# %%
import json

import jsonschema
import matplotlib.pyplot as plt
import torch

import llmppl as pp
from llmppl.exact import tv_distance

lm = pp.models.default_lm()        # SmolLM2-135M-Instruct, offline, CPU
PROMPT = "Name a primary color. One word."
regex = pp.constraints.Regex("(red|blue|yellow|Red|Blue|Yellow)")
target = pp.Target(lm, pp.Power(1.0) * regex, chat=True)      # p(y | x) · 1[y ∈ L]
T = 7                                                          # y|e|l|l|o|w + EOS

# %% [markdown]
# ## Exact enumeration beside the samplers
#
# `L` has six strings, but 67 token paths spell them: `Red` is one token, or `R|ed`, `Re|d`, `R|e|d`;
# `yellow` is `yellow`, `y|ellow`, `ye|llow`, … (every tokenization counts: `L` is a set of *strings*,
# and the mask lets every path through).  `pp.constraints.exact` walks the tree of allowed tokens and
# scores every path with the LM — the ground truth `π`.
#
# The law of greedy masking is itself a target: `p · 1[L]` times the potential
# `Π_t 1 / Z_t(y_<t)` (a token-level factor, written below in six lines).  Its `Z` is 1, since it
# is a sampler's law.

# %%
class LocalRenormalisation(pp.targets.Potential):
    """``−log Z_t(y_<t) = −log Σ_{v allowed} p(v | y_<t)`` at every token: turns ``p · 1[L]``
    into the law of greedy constrained decoding."""

    factorises = True

    def log_next(self, batch):
        masked = batch.base_logprobs + regex.log_next(batch)
        return (-torch.logsumexp(masked, -1, keepdim=True)).expand_as(masked)


exact = pp.constraints.exact(target, PROMPT, T)
greedy_law = pp.constraints.exact(pp.Target(lm, pp.Power(1.0) * regex * LocalRenormalisation(), chat=True),
                                  PROMPT, T)
assert abs(greedy_law.log_Z) < 1e-6          # a sampler's law: normalised


def by_text(probs):
    """Probabilities of token paths summed per string."""
    out = {}
    for seq, p in probs.items():
        out[lm.decode(list(seq))] = out.get(lm.decode(list(seq)), 0.0) + p
    return out


print(f"{len(exact.sequences)} token paths; log Z = {exact.log_Z:.3f}")
print("exact π per string:       ", {k: round(v, 3) for k, v in by_text(exact.as_dict()).items()})
print("greedy masking per string:", {k: round(v, 3) for k, v in by_text(greedy_law.as_dict()).items()})
print(f"TV(greedy masking, π) over token paths = {tv_distance(exact.as_dict(), greedy_law.as_dict()):.3f}")

# %% [markdown]
# Now the samplers.  `pp.SMC(N)` on this target uses `q ∝ p · mask` (drawn by the backend inside
# its own blocks) and weighs by the masked normaliser; `pp.baselines.Constrained(n)` draws from
# the same `q` without weights.  Several SMC runs are pooled, each weighing the same.

# %%
RUNS, N = 8, 64
smc_runs = pp.SMC(N).run_batch(target, [PROMPT] * RUNS, T, seed=0)   # RUNS independent runs, one state
smc = {}
for r in smc_runs:
    for s, w in zip(r.samples, r.weights.tolist()):
        smc[tuple(s)] = smc.get(tuple(s), 0.0) + w / RUNS
masked = pp.baselines.Constrained(RUNS * N).run(target, PROMPT, T, seed=1)
greedy = {}
for s in masked.samples:
    greedy[tuple(s)] = greedy.get(tuple(s), 0.0) + 1 / masked.n
log_Z_hat = torch.logsumexp(torch.tensor([r.log_evidence for r in smc_runs]), 0).item() - torch.log(
    torch.tensor(float(RUNS))).item()
tv_smc, tv_greedy = tv_distance(exact.as_dict(), smc), tv_distance(exact.as_dict(), greedy)
print(f"SMC:         TV to π = {tv_smc:.3f};  log Ẑ = {log_Z_hat:.3f} (exact {exact.log_Z:.3f})")
print(f"Constrained: TV to π = {tv_greedy:.3f};  TV to its own law = "
      f"{tv_distance(greedy_law.as_dict(), greedy):.3f}")

labels = sorted(by_text(exact.as_dict()))
fig, ax = plt.subplots(figsize=(6, 3))
for i, (name, d) in enumerate([("exact π", exact.as_dict()), ("SMC", smc),
                               ("greedy masking (exact)", greedy_law.as_dict()), ("Constrained samples", greedy)]):
    t = by_text(d)
    ax.bar([j + 0.2 * i for j in range(len(labels))], [t.get(k, 0.0) for k in labels], width=0.2, label=name)
ax.set_xticks([j + 0.3 for j in range(len(labels))], labels)
ax.set_ylabel("probability")
ax.legend(fontsize=7)
plt.show()

# %%
assert tv_smc < 0.08 and abs(log_Z_hat - exact.log_Z) < 0.15
assert tv_distance(exact.as_dict(), greedy_law.as_dict()) > 0.15 and tv_greedy > 0.15

# %% [markdown]
# ## JSON extraction on the default model
#
# The same two lines give JSON that validates against a schema: `pp.constraints.JSONSchema`
# compiles the schema (llguidance's JSON Schema support; the schema is also checked against its
# metaschema) and `Power(α)` sharpens inside the language.  Every sample with positive weight
# parses and validates.

# %%
schema = {"type": "object",
          "properties": {"name": {"type": "string", "maxLength": 20},
                         "age": {"type": "integer", "minimum": 0, "maximum": 120},
                         "city": {"type": "string", "maxLength": 20}},
          "required": ["name", "age", "city"], "additionalProperties": False}
text = "Maria Lopez is 34 years old and works as a nurse in Madrid."
prompt = f"Extract the person's name, age and city from this text as JSON.\n\n{text}"
person = pp.constraints.JSONSchema(schema, options={"whitespace_flexible": False})
json_target = pp.Target(lm, pp.Power(2.0) * person, chat=True)
res = pp.SMC(8).run(json_target, prompt, 40, seed=0)
for t, w in sorted(zip(res.texts, res.weights.tolist()), key=lambda x: -x[1])[:4]:
    print(f"{w:.3f}  {t}")
best = json.loads(res.best)
jsonschema.validate(best, schema)
print("best:", best)
plain = pp.baselines.Constrained(4).run(json_target, prompt, 40, seed=0)
print("greedy masking:", plain.texts)

# %%
for t, w in zip(res.texts, res.weights.tolist()):
    if w > 0:
        jsonschema.validate(json.loads(t), schema)

# %% [markdown]
# On a real task the two differ in the same way as above: greedy masking commits to whatever
# prefix the unconstrained model liked best and then forces it into the schema; SMC weighs every
# prefix by how much of the model's mass its continuations *inside* the schema keep.
# `llmppl sample --json-schema schema.json` and `llmppl serve` (`response_format` of type
# `json_schema`) run the same target from the command line and the OpenAI API
# ([docs/constraints.md](../docs/constraints.md)).
