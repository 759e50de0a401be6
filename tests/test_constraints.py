"""Grammar constraints (``pp.constraints``) on the default model's real tokenizer.

* the mask is exact: on a regex with an infinite language it equals an independent oracle
  (the ``regex`` module's partial matching over the tokenizer's byte table), including
  non-canonical tokens, and EOS is allowed exactly where the text is complete;
* exactness: SMC under ``Power(α) * Regex(L)`` for a finite ``L`` matches the exact target
  over every token path that spells a string of ``L`` (enumerated from the byte table and scored
  with ``model(ids).logits``, independent of llguidance and of the library's LM interface),
  TV ≤ 0.05, and its ``log Ẑ`` matches ``log Z``; greedy constrained decoding
  (``pp.baselines.Constrained``) is far from it and close to its own (locally renormalised) law;
* JSON Schema: every returned sample parses and validates;
* bad input fails in one line naming what and where; a backend without full-vocabulary
  log-probabilities refuses by name; two interleaved runs never meet.
"""

from __future__ import annotations

import json
import pickle

import pytest
import torch

import llmppl as pp
from llmppl.exact import tv_distance

from _constraint_paths import check_smc_and_greedy_masking, score, target_law, token_bytes, token_paths

pytest.importorskip("llguidance")

# --------------------------------------------------------------------------- the exactness setup
#: a finite language and a prompt where greedy masking distorts: 67 token paths spell the six
#: strings; greedy masking puts most of its mass on non-canonical paths ("R|ed", "Bl|ue", ...)
#: whose prefixes the model likes but whose completions inside L it does not
PROMPT = "Name a primary color. One word."
LANGUAGE = ["red", "blue", "yellow", "Red", "Blue", "Yellow"]
THRESHOLD = 0.05


@pytest.fixture(scope="module")
def lm(smollm):
    return smollm


@pytest.fixture(scope="module")
def exact(lm):
    ids = lm.encode_prompt(PROMPT, chat=True)
    paths = token_paths(lm.tokenizer, LANGUAGE)
    return ids, paths, score(lm.model, lm.tokenizer, ids, paths, lm.eos_token_id, LANGUAGE)


def regex_of(strings):
    return "(" + "|".join(strings) + ")"


# --------------------------------------------------------------------------- the mask
@pytest.mark.model
def test_mask_is_exact_against_an_oracle(lm):
    """For random viable prefixes of an infinite regular language, the allowed tokens are exactly
    those whose bytes keep the text a prefix of a match (the ``regex`` module's partial match),
    over every token of the byte table — canonical or not; EOS exactly where the text matches."""
    regex = pytest.importorskip("regex")
    pattern = r"(ab|cd)+(e|fg)"
    c = pp.constraints.Regex(pattern)
    table = token_bytes(lm.tokenizer)
    letters = set(b"abcdefg")       # a token with any other byte can never continue a match
    candidates = {t: b.decode() for t, b in table.items() if b and set(b) <= letters}
    gen = torch.Generator().manual_seed(0)
    prefixes = [[]]
    for _ in range(6):   # walk random allowed paths
        cur = prefixes[-1]
        allowed = c.matchers(lm).allowed([cur])[0]
        ids = [t for t in allowed.nonzero().flatten().tolist() if t not in lm.eos_token_ids]
        if not ids:
            break
        prefixes.append(cur + [ids[int(torch.randint(len(ids), (1,), generator=gen))]])
    masks = c.matchers(lm).allowed(prefixes)
    for prefix, mask in zip(prefixes, masks):
        text = lm.tokenizer.decode(prefix)
        want = {t for t, s in candidates.items() if regex.fullmatch(pattern, text + s, partial=True)}
        got = set(mask.nonzero().flatten().tolist()) - set(lm.eos_token_ids)
        assert got == want, (text, sorted(got ^ want)[:10])
        assert bool(mask[lm.eos_token_id]) == (regex.fullmatch(pattern, text) is not None)
    assert len(prefixes) > 3


@pytest.mark.model
def test_every_tokenization_is_allowed(lm):
    """The mask lets every token path of a string through, not only the canonical one (llguidance
    forces canonical tokens where the grammar forces bytes unless ``no_forcing``)."""
    c = pp.constraints.Regex("Yesterday")
    paths = token_paths(lm.tokenizer, ["Yesterday"])
    assert len(paths) > 10
    prefixes = sorted({path[:k] for path in paths for k in range(len(path) + 1)})
    masks = dict(zip(prefixes, c.matchers(lm).allowed([list(p) for p in prefixes])))
    for path in paths:
        for k, tok in enumerate(path):
            assert masks[path[:k]][tok], (path, k)
        assert masks[path][lm.eos_token_id] and int(masks[path].sum()) == 1   # complete: only EOS
        assert c.accepts(lm, path)
    # and nothing else: every allowed token continues some tokenization of the string
    for prefix, mask in masks.items():
        nxt = {p[len(prefix)] if len(p) > len(prefix) else lm.eos_token_id for p in paths if p[:len(prefix)] == prefix}
        assert set(mask.nonzero().flatten().tolist()) == nxt, prefix


# --------------------------------------------------------------------------- exactness
@pytest.mark.slow
@pytest.mark.model
@pytest.mark.parametrize("alpha, runs", [(1.0, 8)])
def test_smc_matches_exact_enumeration_and_greedy_masking_does_not(lm, exact, alpha, runs):
    """``Power(α) * Regex(L)``: pooled SMC particles (``runs`` runs of 128) within TV 0.05 of the exact
    law over token paths, and ``Ẑ / Z`` within 3 standard errors of 1 (unbiased); the exact law of
    greedy masking, its samples, and the target's mode are all far from it."""
    ids, paths, ex = exact
    want, _ = target_law(ex["log_p"], alpha)
    target = pp.Target(lm, pp.Power(alpha) * pp.constraints.Regex(regex_of(LANGUAGE)), chat=True)
    T = max(len(p) for p in paths) + 1
    gap, mode = tv_distance(want, ex["greedy"]), 1 - max(want.values())
    print(f"{len(paths)} token paths; TV(greedy-constrained law, target) = {gap:.3f}; mode {mode:.3f} away")
    assert gap > 3 * THRESHOLD and mode > 1.5 * THRESHOLD     # impostors are far: the check can fail
    check_smc_and_greedy_masking(target, ids, T, ex, alpha, runs, 128, 4, THRESHOLD, "HF")


@pytest.mark.model
def test_mh_and_baselines_run_on_constraints(lm):
    """Every engine takes the constraint unchanged: MH chains and the plain baseline (which, on a
    masked target, draws ``q ∝ p · mask`` like greedy constrained decoding) only return strings of L."""
    target = pp.Target(lm, pp.Power(2.0) * pp.constraints.Regex(regex_of(LANGUAGE)), chat=True)
    res = pp.MH(block_size=2, n_mcmc=2).run(target, PROMPT, 8, chains=2, seed=0)
    assert set(res.texts) <= set(LANGUAGE) and all(res.finished)
    res = pp.baselines.Plain(4).run(target, PROMPT, 8, seed=0)
    assert set(res.texts) <= set(LANGUAGE)


# --------------------------------------------------------------------------- JSON Schema
SCHEMA = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 12},
                                           "age": {"type": "integer", "minimum": 0, "maximum": 120}},
          "required": ["name", "age"], "additionalProperties": False}


@pytest.mark.model
def test_json_schema_samples_validate(lm):
    jsonschema = pytest.importorskip("jsonschema")
    c = pp.constraints.JSONSchema(SCHEMA, options={"whitespace_flexible": False})
    target = pp.Target(lm, pp.Power(2.0) * c, chat=True)
    res = pp.SMC(4).run(target, "Invent a person. Reply in JSON with name and age.", 40, seed=0)
    kept = [t for t, w in zip(res.texts, res.weights) if w > 0]
    assert kept
    for text in kept:
        jsonschema.validate(json.loads(text), SCHEMA)
    assert c.validate(res.best) is not None


# --------------------------------------------------------------------------- the protocol
@pytest.mark.model
def test_algebra_and_configuration_only(lm):
    r = pp.constraints.Regex("(yes|no)")
    assert pp.Power(2) * r * pp.Power(2) == pp.Power(4) * pp.constraints.Regex("(yes|no)")
    assert repr(pp.Power(4) * r) == "Power(4) * Regex('(yes|no)')"
    target = pp.Target(lm, pp.Power(4) * r)
    # a mask: backends apply it in their own blocks, so the target needs no full vocabulary
    assert target.has_complete and target.masks_only and not pp.inference.native.needs(target).full_vocabulary
    r.matchers(lm)                    # a memo exists now, but not on the potential
    clone = pickle.loads(pickle.dumps(r))
    assert clone == r and vars(clone) == vars(r)
    assert set(vars(r)) == {"grammar", "cache_size", "name", "pattern"}
    assert pp.constraints.Choice(["a b", 'c"d']).matches(lm, 'c"d')
    assert not pp.constraints.Choice(["a b", 'c"d']).matches(lm, "a")


@pytest.mark.model
def test_two_interleaved_runs_never_meet(lm):
    """Two SMC runs stepped in turn through one engine and one target give what each gives alone."""
    target = pp.Target(lm, pp.constraints.Regex(r"[0-9]{1,3}"), chat=True)
    smc = pp.SMC(4)
    alone = [smc.run(target, p, 5, seed=s).samples for p, s in (("Pick a number.", 0), ("Your age?", 1))]
    a = smc.init(target, ["Pick a number."], 5, seed=0)
    b = smc.init(target, ["Your age?"], 5, seed=1)
    while not (a.done and b.done):
        for st in (a, b):
            if not st.done:
                smc.step(st)
    assert [smc.results(a)[0].samples, smc.results(b)[0].samples] == alone


@pytest.mark.model
def test_cut_completions_outside_the_language_weigh_nothing(lm):
    """Under truncation="keep" a cut completion counts only if its text is in L: a budget too
    short for every string of L kills every particle, and the error names the constraint."""
    target = pp.Target(lm, pp.constraints.Regex("Yesterday was sunny"), chat=True)
    with pytest.raises(pp.inference.common.AllParticlesDied, match=r"Regex\('Yesterday was sunny'\)"):
        pp.SMC(4).run(target, "Say it.", 2, seed=0)
    batch = target.batch([0], [lm.tokenizer.encode("Yesterday was sunny")], None, [False], [True])
    assert float(target.log_complete(batch)[0]) == 0.0


@pytest.mark.parametrize("make, needle", [
    (lambda: pp.constraints.Regex("(ab"), r"invalid regex '\(ab': unclosed group at column 1"),
    (lambda: pp.constraints.Regex("a{3,2}"), r"invalid regex 'a\{3,2\}': invalid repetition count range.* at column 2"),
    (lambda: pp.constraints.Grammar('start: foo\nfoo: "a" bar'), r"invalid grammar 'start: foo': line 2 column 6: unknown name: \"bar\""),
    (lambda: pp.constraints.JSONSchema({"type": "objekt"}), r"invalid JSON schema at type: 'objekt' is not valid"),
    (lambda: pp.constraints.JSONSchema('{"type": '), r"invalid JSON schema: not JSON .* line 1 column"),
    (lambda: pp.constraints.JSONSchema({"type": "object", "if": {}}), r"Unimplemented keys: \[\"if\"\]"),
    (lambda: pp.constraints.Choice([]), r"non-empty list"),
])
def test_bad_input_is_one_line(make, needle):
    with pytest.raises(ValueError, match=needle) as err:
        make()
    assert "\n" not in str(err.value)


def test_tokenizers_llguidance_cannot_read():
    toy = pp.models.NGramLM(vocab_size=5)
    target = pp.Target(toy, pp.constraints.Regex("a+"))
    with pytest.raises(ValueError, match="need an LM with a tokenizer: .* has none"):
        pp.SMC(2).run(target, [0], 3, seed=0)


@pytest.mark.model
def test_the_memo_is_bounded_and_rebuilds_what_it_evicted(lm):
    """``cache_size`` bounds the memo; an evicted prefix is rebuilt from its longest stored ancestor
    and gives the same mask (a pure function of the prefix)."""
    c = pp.constraints.Regex(r"[a-z]{1,40}", cache_size=16)
    ids = lm.tokenizer.encode("abcdefghijklmnopqrstuvwxyzabcdefghijklmn")
    prefixes = [ids[:k] for k in range(len(ids) + 1)]
    first = c.matchers(lm).allowed(prefixes)
    assert len(c.matchers(lm)) <= 16
    again = c.matchers(lm).allowed(prefixes[::-1])
    assert torch.equal(first, again.flip(0))
    assert c.matchers(lm).accepting([ids]) == [True]
