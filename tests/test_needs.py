"""One way to ask a part of a run what it needs: ``llmppl.inference.native.needs``.

Every kind of part (proposals and the wrappers around them, potentials and their products,
targets, schedules, steps, move kernels) answers through the same registry, the engines act
on the answer (native blocks or the token path, host syncs, MH refusals), and a new kind of
part registers itself.
"""

import pytest
import torch

import llmppl as pp
from llmppl.inference.native import Needs, needs
from llmppl.inference.reweight import Reweight
from llmppl.models.toy import EXACTNESS

LM = EXACTNESS["prompts"].lm()
POWER = pp.Target(LM, pp.Power(2.0))


def _mask(batch):
    out = torch.zeros(len(batch), LM.vocab_size, dtype=torch.bool)
    out[:, :3] = True
    out[:, LM.eos_token_id] = True
    return out


LOOKAHEAD = pp.proposals.Lookahead(top_k=2, rollouts=2, horizon=2)
NATIVE = Needs()


@pytest.mark.parametrize("part, target, expected", [
    (pp.proposals.Temperature(), POWER, NATIVE),
    (pp.proposals.Base(), POWER, NATIVE),
    (pp.proposals.LocallyOptimal(), POWER, NATIVE),       # q ∝ p^a: a temperature
    (pp.proposals.LocallyOptimal(), pp.Target(LM, pp.Power(2.0) * pp.Constraint(mask=_mask)),
     NATIVE),                                            # ... and over a mask: q ∝ p^a · mask in the block
    (pp.proposals.Temperature(), pp.Target(LM, pp.Power(2.0) * pp.Constraint(mask=_mask)),
     NATIVE),                                            # a mask is applied inside native blocks
    (pp.proposals.LocallyOptimal(), pp.Target(LM, pp.Power(2.0) * pp.Tempered(0.5)),
     Needs(full_vocabulary=True)),                       # ... but not over a Tempered factor
    (pp.proposals.TopK(2), POWER, Needs(full_vocabulary=True)),
    (LOOKAHEAD, POWER, Needs(row_wise=False, random=True)),        # drawn natively (top-k, rollouts)
    (pp.proposals.Lookahead(2, 2, 2, jackknife=True), POWER,
     Needs(full_vocabulary=True, row_wise=False, random=True)),    # ... but not with the jackknife
    (LOOKAHEAD, pp.Target(LM, pp.Power(2.0) * pp.Tempered(0.5)),
     Needs(full_vocabulary=True, row_wise=False, random=True)),    # ... nor over a Tempered factor
    (pp.proposals.TopK(2, LOOKAHEAD), POWER, Needs(full_vocabulary=True, row_wise=False, random=True)),
    (pp.proposals.FromLM(LM), POWER, Needs(own_state=True, row_wise=False)),     # the draft draws blocks
    (pp.proposals.TopP(0.9, pp.proposals.FromLM(LM)), POWER,
     Needs(full_vocabulary=True, own_state=True, row_wise=False)),
    (pp.Power(3.0), None, NATIVE),
    (pp.Constraint(mask=_mask), None, NATIVE),            # a mask: applied inside native blocks
    (pp.Constraint(lambda text: True), None, NATIVE),     # on finished sequences only
    (pp.Tempered(0.5), None, Needs(full_vocabulary=True)),
    (pp.Power(2.0) * pp.Constraint(lambda text: True), None, NATIVE),
    (POWER, None, NATIVE),
    (pp.Target(LM, pp.Power(2.0) * pp.Tempered(0.5)), None, Needs(full_vocabulary=True)),
    (pp.schedules.Constant(), None, NATIVE),
    (pp.schedules.Linear(4), None, NATIVE),
    (pp.schedules.AdaptiveESS(), None, NATIVE),    # the realised variance per token where none is given
    (pp.steps.Tokens(4), None, NATIVE),
    (pp.steps.Until("\n"), None, Needs(row_wise=False)),  # blocks stop at its end ids
    (pp.SMC(4, step=pp.steps.Until(1), proposal=pp.proposals.FromLM(LM)), None,
     Needs(full_vocabulary=True, own_state=True, row_wise=False)),   # a draft takes the token path there
    # engines: what a run of the engine needs
    (pp.SMC(4), POWER, NATIVE),
    (pp.SMC(4, step=pp.steps.Tokens(8)), None, NATIVE),
    (pp.SMC(4, schedule=pp.schedules.AdaptiveESS()), None, NATIVE),
    (pp.SMC(4, rejuvenate=pp.MH(1, 1)), None, NATIVE),   # moves replay suffixes as forced tokens of a block
    (pp.SMC(4, rejuvenate=pp.MH(1, 1, proposal=pp.proposals.TopK(2))), None, Needs(full_vocabulary=True)),
    (pp.SMC(4, proposal=LOOKAHEAD), None, Needs(row_wise=False, random=True)),
    (pp.MH(2, 1), None, NATIVE),                 # reverse moves use the recorded log q
    (pp.MH(2, 1, proposal=pp.proposals.TopK(2)), None, Needs(full_vocabulary=True)),
    (pp.baselines.Plain(4), None, NATIVE),
    (pp.baselines.Greedy(), None, NATIVE),
    (pp.baselines.BestOfN(4), None, NATIVE),
    (pp.baselines.LowTemperature(0.5, 4), None, NATIVE),
    (pp.samplers.ScalablePower(2, 2, 2, n=4), None, Needs(row_wise=False, random=True)),
    (Reweight(4), None, NATIVE),
], ids=repr)
def test_every_kind_of_part_answers_the_same_question(part, target, expected):
    assert needs(part, target) == expected


def test_needs_combine_as_a_run_with_both_parts():
    a, b = Needs(full_vocabulary=True), Needs(own_state=True, row_wise=False)
    assert a | b == Needs(full_vocabulary=True, own_state=True, row_wise=False)
    assert NATIVE | NATIVE == NATIVE


def test_a_wrapped_random_proposal_is_refused_by_mh():
    # the restriction forwards what its inner proposal needs: MH cannot evaluate a reverse move
    # under a random q, wrapped or not
    for proposal in (LOOKAHEAD, pp.proposals.TopK(2, LOOKAHEAD)):
        with pytest.raises(ValueError, match="random"):
            pp.MH(2, 1, proposal=proposal)
    with pytest.raises(ValueError, match="stateless"):
        pp.MH(2, 1, proposal=pp.proposals.TopK(2, pp.proposals.FromLM(LM)))


def test_engines_act_on_the_answer():
    prompt = list(EXACTNESS["prompts"].prompts[0])
    native = pp.SMC(4).init(POWER, [prompt], 3, seed=0)
    assert native.plan.native and native.plan.needs == NATIVE
    token_path = pp.SMC(4, proposal=pp.proposals.TopK(2)).init(POWER, [prompt], 3, seed=0)
    assert not token_path.plan.native
    # a proposal that is not row-wise is evaluated on the live rows only (a host sync a draw)
    state = pp.SMC(4, proposal=LOOKAHEAD).init(POWER, [prompt], 3, seed=0)
    assert not state.plan.needs.row_wise
    pp.SMC(4, proposal=LOOKAHEAD).step(state)
    assert state.trace.syncs >= 2


class Doubled(pp.proposals.Temperature):
    """A third-party proposal type that registers its own answer."""


def test_a_new_kind_of_part_registers_its_answer():
    assert needs(Doubled(), POWER) == NATIVE              # inherits Proposal's rule

    @needs.register
    def _(part: Doubled, target=None) -> Needs:
        return Needs(full_vocabulary=True)

    assert needs(Doubled(), POWER) == Needs(full_vocabulary=True)     # (only Doubled is affected)
    assert not pp.SMC(4, proposal=Doubled()).init(POWER, [[1]], 2, seed=0).plan.native


def test_an_unknown_part_is_assumed_to_need_the_full_vocabulary():
    class Kernel:
        def move(self, ctx):
            return 0

    assert needs(Kernel()) == Needs(full_vocabulary=True, row_wise=False)
