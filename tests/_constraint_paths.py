"""Ground truth for grammar constraints on a real tokenizer, computed without llguidance and
without the library's LM interface.

For a finite language ``L`` (a list of strings) every token path that spells a string of ``L``
is enumerated from the tokenizer's own byte table (GPT-2 byte-level BPE: each token's string
mapped back to bytes), then every path ``y`` followed by EOS is scored with the model's own
forward ``model(ids).logits``: ``log p(y, EOS | x)``.  From the same logits:

* the target ``π(y) ∝ p(y, EOS)^α`` over all paths (``Power(α) * Regex(L)``);
* the law of greedy constrained decoding, ``Π_t p(y_t | y_<t) / Σ_{v ∈ A_t} p(v | y_<t)`` with
  ``A_t`` the tokens that keep the text a prefix of a string of ``L`` (EOS where it is one).
"""

from __future__ import annotations

import math
from functools import lru_cache

import torch


@lru_cache(maxsize=1)
def _byte_decoder() -> dict[str, int]:
    """GPT-2's printable-unicode-to-byte table (byte-level BPE token strings -> bytes)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs)}


def token_bytes(tokenizer) -> dict[int, bytes]:
    """Every ordinary (non-special) token id -> the bytes it spells."""
    dec = _byte_decoder()
    special = set(tokenizer.all_special_ids) | {int(i) for i in getattr(tokenizer, "added_tokens_decoder", {})}
    out = {}
    for i in range(len(tokenizer)):
        if i in special:
            continue
        s = tokenizer.convert_ids_to_tokens(i)
        try:
            out[i] = bytes(dec[ch] for ch in s)
        except KeyError:
            continue
    return out


def token_paths(tokenizer, strings: list[str]) -> list[tuple[int, ...]]:
    """All token sequences whose bytes concatenate to one of ``strings``."""
    table = token_bytes(tokenizer)
    by_bytes: dict[bytes, int] = {b: i for i, b in table.items() if b}
    longest = max(len(b) for b in by_bytes)
    paths = []
    for s in strings:
        data = s.encode()

        def walk(pos: int, acc: tuple[int, ...]) -> None:
            if pos == len(data):
                paths.append(acc)
                return
            for k in range(1, min(longest, len(data) - pos) + 1):
                t = by_bytes.get(data[pos:pos + k])
                if t is not None:
                    walk(pos + k, acc + (t,))

        walk(0, ())
    return paths


def target_law(log_p: dict, alpha: float) -> tuple[dict, float]:
    """``π(y) ∝ p(y, EOS)^α`` over the paths, and ``log Z``."""
    lg = {p: alpha * v for p, v in log_p.items()}
    log_Z = float(torch.logsumexp(torch.tensor(list(lg.values()), dtype=torch.float64), 0))
    return {p: math.exp(v - log_Z) for p, v in lg.items()}, log_Z


def score(model, tokenizer, prompt: list[int], paths: list[tuple[int, ...]], eos: int, strings: list[str],
          alpha: float = 1.0) -> dict:
    """Exact target (at ``alpha``) and greedy-constrained law over ``paths`` (module docstring);
    ``log_p`` per path gives the target at any other exponent (:func:`target_law`)."""
    table = token_bytes(tokenizer)
    datas = [s.encode() for s in strings]

    def allowed(prefix: bytes) -> list[int]:
        ids = [t for t, b in table.items() if b and any(d.startswith(prefix + b) for d in datas)]
        return ids + ([eos] if prefix in datas else [])

    seqs = [list(prompt) + list(p) + [eos] for p in paths]
    width = max(len(s) for s in seqs)
    ids = torch.zeros((len(seqs), width), dtype=torch.long)
    att = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, :len(s)] = torch.tensor(s)
        att[i, :len(s)] = 1
    start = len(prompt) - 1        # only the positions that predict a completion token
    with torch.inference_mode():
        logp = torch.cat([torch.log_softmax(
            model(input_ids=ids[i:i + 16], attention_mask=att[i:i + 16]).logits[:, start:].double(), -1)
            for i in range(0, len(seqs), 16)])
    log_p, log_greedy = [], []
    cache: dict[bytes, list[int]] = {}
    for i, p in enumerate(paths):
        lp, lg, text = 0.0, 0.0, b""
        for k, tok in enumerate(list(p) + [eos]):
            row = logp[i, k]
            if text not in cache:
                cache[text] = allowed(text)
            ok = cache[text]
            lp += float(row[tok])
            lg += float(row[tok]) - float(torch.logsumexp(row[ok], 0))
            text += table.get(tok, b"")
        log_p.append(lp)
        log_greedy.append(lg)
    log_p_of = dict(zip(paths, log_p))
    target, log_Z = target_law(log_p_of, alpha)
    greedy = {p: math.exp(v) for p, v in zip(paths, log_greedy)}
    return {"target": target, "greedy": greedy, "log_Z": log_Z, "log_p": log_p_of}


def check_smc_and_greedy_masking(target, ids: list[int], T: int, ex: dict, alpha: float, runs: int, N: int,
                                 G: int, threshold: float, backend: str) -> None:
    """SMC on ``target`` (``runs`` runs of ``N`` particles, ``G`` prompts per batch) pooled within TV
    ``threshold`` of the exact law ``ex`` and ``Ẑ / Z`` within 3 standard errors of 1; greedy
    constrained decoding (``Constrained``) near its own exact law and ``3 · threshold`` from the target."""
    import llmppl as pp
    from llmppl.exact import tv_distance

    want, log_Z = target_law(ex["log_p"], alpha)
    results = [r for k in range(runs // G) for r in pp.SMC(N).run_batch(target, [ids] * G, T, seed=k)]
    emp: dict = {}
    for r in results:
        assert r.error is None, r.error
        for s, w in zip(r.samples, r.weights.tolist()):
            assert tuple(s) in want, f"a sample outside the language: {s}"
            emp[tuple(s)] = emp.get(tuple(s), 0.0) + w / runs
    tv = tv_distance(want, emp)
    ratio = torch.tensor([r.log_evidence - log_Z for r in results], dtype=torch.float64).exp()
    se = float(ratio.std()) / math.sqrt(runs)
    print(f"SMC on {backend}: TV = {tv:.4f}; Ẑ/Z = {float(ratio.mean()):.4f} ± {se:.4f} (log Z = {log_Z:.4f})")
    assert tv < threshold
    assert abs(float(ratio.mean()) - 1) < 3 * se + 0.02
    greedy = pp.baselines.Constrained(N).run_batch(target, [ids] * G, T, seed=1)
    emp_g: dict = {}
    for r in greedy:
        for s in r.samples:
            assert tuple(s) in want, f"a sample outside the language: {s}"
            emp_g[tuple(s)] = emp_g.get(tuple(s), 0.0) + 1.0 / (N * G)
    print(f"Constrained on {backend}: TV to its own law {tv_distance(ex['greedy'], emp_g):.4f}, "
          f"to the target {tv_distance(want, emp_g):.4f}")
    assert tv_distance(ex["greedy"], emp_g) < 2 * threshold
    assert tv_distance(want, emp_g) > 3 * threshold
