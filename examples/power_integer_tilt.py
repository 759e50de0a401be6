"""Power(4) * RewardTilt(answer_is_integer, beta=0.5) on the default model.

Target: π(y) ∝ p(y|x)^4 · exp(r(y)/0.5), r(y) = 1 when the last number in y is an
integer — sharpened sampling that also prefers integer answers.  Runs on CPU in
well under a minute:  python examples/power_integer_tilt.py  (after pip install -e .)
"""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import llmppl as pp
from llmppl.targets.rewards import answer_is_integer


PROMPT = "What is 7 divided by 2? Reply with a number only."


def main(n_particles: int = 8, max_new_tokens: int = 16, seed: int = 0) -> pp.Result:
    lm = pp.models.default_lm()
    smc = pp.SMC(n_particles=n_particles)
    runs = {}
    for name, potential in [("Power(4)", pp.Power(4.0)),
                            ("Power(4) * RewardTilt", pp.Power(4.0) * pp.RewardTilt(answer_is_integer, beta=0.5))]:
        target = pp.Target(lm, potential, chat=True)
        res = smc.run(target, PROMPT, max_new_tokens=max_new_tokens, seed=seed)
        rewards = answer_is_integer(target.batch(res.prompt_ids, res.samples).completions())
        print(f"{name}: {res.summary()}")
        for w, r, text in sorted(zip(res.weights, rewards, res.texts), reverse=True):
            print(f"  w={w:.3f}  integer={r:.0f}  {text!r}")
        print(f"  weighted P(integer answer) = {sum(w * r for w, r in zip(res.weights, rewards)):.2f}")
        runs[name] = res
    tilted = runs["Power(4) * RewardTilt"]
    # same seed, same particles while no reward is involved: log Ẑ differs by log E[exp(r/β)]
    print(f"log Z(tilted) - log Z(Power(4)) = {tilted.log_evidence - runs['Power(4)'].log_evidence:.3f}"
          f"  (at most 1/beta = 2)")
    print("best:", tilted.best)
    return tilted


if __name__ == "__main__":
    main()
