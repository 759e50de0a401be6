"""Stand-in for ``pp.baselines`` while that module is not available.

``AncestralSampler(n, tau)`` draws ``n`` independent completions token by token from
``q(v | y_<t) ∝ p(v | y_<t)^{1/τ}`` (``τ = 1``: plain sampling), batched on one KV
cache.  Weights are uniform: the samples are what the decoding method returns, not
importance samples of the target.  ``log_p`` is ``log p(y|x)`` under the base LM.
"""

from __future__ import annotations

from typing import Any

import torch

from ..inference.common import Stopwatch, peak_memory, prepare_run
from ..inference.result import Result


class AncestralSampler:
    """``n`` i.i.d. completions from the token-wise tempered base LM ``softmax(log p / τ)``."""

    def __init__(self, n: int = 1, tau: float = 1.0, name: str = "plain") -> None:
        if n < 1 or tau <= 0:
            raise ValueError(f"AncestralSampler needs n >= 1 and tau > 0, got n={n}, tau={tau}")
        self.n, self.tau, self.name = n, float(tau), name

    def run(self, target: Any, prompt: Any, max_new_tokens: int, seed: int | None = None) -> Result:
        prompt_ids, gen = prepare_run(target, prompt, max_new_tokens, seed)
        lm = target.lm
        with Stopwatch(lm.device) as clock:
            state = lm.start(prompt_ids, self.n)
            log_p = torch.zeros(self.n, dtype=torch.float64)
            alive = torch.ones(self.n, dtype=torch.bool)
            for _ in range(max_new_tokens):
                rows = alive.nonzero().flatten()
                if len(rows) == 0:
                    break
                lp = state.logprobs(rows).double()
                probs = torch.softmax(lp / self.tau, dim=-1)
                tok = torch.multinomial(probs, 1, generator=gen).squeeze(1).cpu()
                log_p[rows] += lp.cpu().gather(1, tok[:, None]).squeeze(1)
                eos = tok == lm.eos_token_id
                if bool(eos.any()):
                    state.finish(rows[eos])
                    alive[rows[eos]] = False
                if bool((~eos).any()):
                    state.extend(tok[~eos], rows=rows[~eos])
        finished = (~alive).tolist()
        samples = [list(t) for t in state.tokens]
        return Result(
            method=self.name, prompt_ids=prompt_ids, samples=samples,
            log_weights=[0.0] * self.n, texts=[lm.decode(s) for s in samples],
            finished=finished, truncated=[not f for f in finished], log_p=log_p.tolist(),
            stats={"forward_passes": state.forward_passes, "tokens_decoded": state.tokens_decoded,
                   "wall_time": clock.seconds, "peak_memory": peak_memory(lm.device)},
            config={"n": self.n, "tau": self.tau}, seed=seed,
        )
