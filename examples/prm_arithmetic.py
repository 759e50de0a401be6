"""PRM-guided SMC on a small arithmetic word problem, one reasoning line per SMC step.

Target: π(y) ∝ p(y|x) · exp(r(y)/β), β = 0.25, with the answer checker r(y) = 1 when the
number after "Answer:" is right, else 0.  The process reward V(y_≤t) = −(number of
wrong "a op b = c" equations so far) twists the intermediate targets, ψ_t = exp(V/β):
lines with arithmetic slips are resampled away as soon as they are written.  Twists
cancel — the answer checker alone defines the target.  Segment steps: every particle
writes up to the next newline (pp.steps.Until("\\n")), then particles are reweighted
and resampled.

    python examples/prm_arithmetic.py    (after pip install -e .; CPU, under a minute)
"""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np

import llmppl as pp
from llmppl.diagnostics import twist
from llmppl.targets.rewards import AnswerChecker, arithmetic_prm

PROMPT = ("Q: Ann has 2 bags with 5 pens in each bag. She loses 3 pens. How many pens does she have?\n"
          "2 * 5 = 10\n10 - 3 = 7\nAnswer: 7\n\n"
          "Q: Tom has 3 boxes with 4 apples in each box. He eats 2 apples. How many apples does he have?\n")
ANSWER = 10


def main(n_particles: int = 16, max_new_tokens: int = 24, seed: int = 0) -> pp.Result:
    lm = pp.models.default_lm()
    checker = AnswerChecker(ANSWER, marker="Answer:")
    # resample after every line (PRM-guided SMC); the twist picks which lines survive
    smc = pp.SMC(n_particles=n_particles, step=pp.steps.Until("\n", max_tokens=16), ess_threshold=1.0)
    for name, prm in [("no twist", None), ("PRM twist", arithmetic_prm)]:
        target = pp.Target(lm, pp.RewardTilt(checker, beta=0.25, process_reward=prm))
        res = smc.run(target, PROMPT, max_new_tokens=max_new_tokens, seed=seed)
        correct = checker(target.batch(res.prompt_ids, res.samples).completions())
        print(f"{name}: {res.summary()}")
        print(f"  particles with the right answer: {int(sum(correct))}/{res.n}; "
              f"weighted P(correct) = {float(np.dot(res.weights, correct)):.2f}")
    print("twist log ψ_t along each final particle's ancestry (rows = SMC steps):")
    print(np.array2string(twist.twist_trace(res, along_lineages=True), precision=1, suppress_small=True))
    if "untwist" in res.steps:
        print(f"fraction of weight moved by the final untwist: {twist.untwist_shift(res):.2f}")
    weight: dict[str, float] = {}
    for w, text in zip(res.weights, res.texts):
        weight[text] = weight.get(text, 0.0) + float(w)
    for text, w in sorted(weight.items(), key=lambda kv: -kv[1]):
        print(f"--- weight {w:.2f}\n{text}")
    return res


if __name__ == "__main__":
    main()
