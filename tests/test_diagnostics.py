"""Diagnostics: Result → arviz, genealogy, plots, HTML report.

Synthetic Results follow the engines' documented ``steps`` / ``chains`` conventions
(see ``Result``); the real engines are exercised at the end of the file.
"""

from __future__ import annotations

import base64
import re

import arviz as az
import networkx as nx
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from llmppl.diagnostics import coalescence_time, distinct_ancestors, genealogy, plot, to_arviz, write_report
from llmppl.inference.resampling import ess, systematic
from llmppl.inference.result import Result


def synthetic_smc(T: int = 12, N: int = 8, seed: int = 0, kappa: float = 0.5) -> Result:
    """An SMC-shaped Result: Gaussian log-weight increments, resampling when ESS < κN."""
    rng = np.random.default_rng(seed)
    gen = torch.Generator().manual_seed(seed)
    lw = np.zeros(N)
    keys = ["ess", "conditional_ess", "resampled", "ancestors", "log_weights", "exponent",
            "log_evidence_increment", "alive"]
    steps: dict[str, list] = {k: [] for k in keys}
    for t in range(T):
        inc = rng.normal(0.0, 1.0, N)
        prev = np.exp(lw - lw.max())
        prev /= prev.sum()
        new = lw + inc
        steps["log_evidence_increment"].append(float(np.log(np.sum(prev * np.exp(inc)))))
        steps["conditional_ess"].append(float(N * np.sum(prev * np.exp(inc)) ** 2 / np.sum(prev * np.exp(2 * inc))))
        e = ess(torch.tensor(new))
        steps["ess"].append(e)
        steps["log_weights"].append(new.tolist())
        steps["exponent"].append(1.0 + 3.0 * (t + 1) / T)
        steps["alive"].append(N)
        resample = e < kappa * N
        anc = systematic(gen, torch.tensor(np.exp(new - new.max())), N).numpy() if resample else np.arange(N)
        lw = np.zeros(N) if resample else new
        steps["resampled"].append(bool(resample))
        steps["ancestors"].append(anc.tolist())
    samples = [[int(x) for x in rng.integers(0, 5, rng.integers(1, 6))] for _ in range(N)]
    return Result(method="SMC", prompt_ids=[1, 2], samples=samples, log_weights=lw.tolist(),
                  texts=[f"particle <{i}> & co" for i in range(N)], finished=[True] * N,
                  truncated=[False] * N, log_p=rng.normal(-10, 2, N).tolist(),
                  log_evidence=float(sum(steps["log_evidence_increment"])), steps=steps,
                  stats={"forward_passes": T, "tokens_decoded": T * N, "wall_time": 0.5},
                  config={"ess_threshold": kappa}, seed=seed)


def ar1_chains(C: int = 4, S: int = 400, rho: float = 0.5, seed: int = 0) -> np.ndarray:
    """C stationary AR(1) chains ``x_s = ρ x_{s-1} + √(1-ρ²) ε_s``; ESS = C·S·(1-ρ)/(1+ρ)."""
    rng = np.random.default_rng(seed)
    x = np.empty((C, S))
    x[:, 0] = rng.normal(size=C)
    for s in range(1, S):
        x[:, s] = rho * x[:, s - 1] + np.sqrt(1 - rho**2) * rng.normal(size=C)
    return x


def synthetic_mh(trace: np.ndarray, stages: int = 5, seed: int = 0) -> Result:
    C = trace.shape[0]
    rng = np.random.default_rng(seed)
    return Result(method="MH", prompt_ids=[1], samples=[[1, 2]] * C, log_weights=[0.0] * C,
                  finished=[True] * C, truncated=[False] * C, log_p=trace[:, -1].tolist(),
                  chains={"log_p": trace.tolist(), "log_target": (4 * trace).tolist(),
                          "acceptance": rng.uniform(size=(C, stages)).tolist(), "length": [2] * C},
                  stats={"tokens_decoded": 100}, seed=seed)


# ------------------------------------------------------------------ to_arviz
def test_smc_to_arviz_has_every_trace_and_consistent_weights():
    res = synthetic_smc()
    idata = to_arviz(res)
    ss = idata.sample_stats
    for name in ("ess", "conditional_ess", "exponent", "log_evidence_increment", "resampled",
                 "log_weights", "weights", "ancestors", "log_evidence", "log_weight"):
        assert name in ss, name
    assert ss["log_weights"].dims == ("chain", "step", "particle")
    w = ss["weights"].values[0]
    np.testing.assert_allclose(w.sum(axis=1), 1.0)
    # the recorded ESS is the Kish ESS of the recorded weights
    np.testing.assert_allclose(ss["ess"].values[0], 1.0 / np.sum(w**2, axis=1), rtol=1e-9)
    np.testing.assert_allclose(ss["log_evidence_increment"].values[0].sum(), res.log_evidence)
    assert ss["resampled"].dtype == bool and ss["ancestors"].dtype == np.int64
    assert idata.posterior["log_p"].dims == ("chain", "draw")


def test_resampled_draws_follow_the_final_weights():
    res = synthetic_smc(T=3, N=6, kappa=0.0)  # never resamples: unequal final weights
    assert np.ptp(res.weights) > 0
    raw = to_arviz(res, resample=False)
    np.testing.assert_allclose(raw.posterior["log_p"].values[0], res.log_p)
    idata = to_arviz(res)
    src = idata.sample_stats["source_particle"].values[0]
    counts = np.bincount(src, minlength=res.n)
    # systematic resampling: each particle gets floor or ceil of N·W_i copies
    assert np.all(np.abs(counts - res.n * res.weights) < 1)
    np.testing.assert_allclose(idata.posterior["log_p"].values[0], np.asarray(res.log_p)[src])


def test_netcdf_round_trip(tmp_path):
    idata = to_arviz([synthetic_smc(seed=0), synthetic_smc(T=9, seed=1)])
    path = tmp_path / "run.nc"
    idata.to_netcdf(str(path))
    back = az.from_netcdf(str(path))
    for group in ("posterior", "sample_stats"):
        a, b = getattr(idata, group), getattr(back, group)
        assert set(a.data_vars) == set(b.data_vars)
        for v in a.data_vars:
            np.testing.assert_array_equal(a[v].values, b[v].values)
    assert back.posterior.attrs["method"] == "SMC"

    mh = to_arviz(synthetic_mh(ar1_chains(C=3, S=20)))
    mh.to_netcdf(str(tmp_path / "mh.nc"))
    np.testing.assert_array_equal(az.from_netcdf(str(tmp_path / "mh.nc")).posterior["log_p"].values,
                                  mh.posterior["log_p"].values)


def test_repeated_smc_runs_stack_as_chains_and_pad():
    runs = [synthetic_smc(T=12, seed=0), synthetic_smc(T=7, seed=1), synthetic_smc(T=10, seed=2)]
    idata = to_arviz(runs)
    assert idata.posterior.sizes["chain"] == 3
    ess_trace = idata.sample_stats["ess"].values
    assert ess_trace.shape == (3, 12)
    assert np.isnan(ess_trace[1, 7:]).all() and not np.isnan(ess_trace[1, :7]).any()
    assert (idata.sample_stats["ancestors"].values[1, 7:] == -1).all()
    np.testing.assert_allclose(idata.sample_stats["log_evidence"].values, [r.log_evidence for r in runs])
    summary = az.summary(idata, var_names=["log_p"])
    assert {"ess_bulk", "r_hat"} <= set(summary.columns)


def test_mh_chains_work_with_arviz_and_ess_matches_theory():
    rho, C, S = 0.5, 4, 2000
    res = synthetic_mh(ar1_chains(C=C, S=S, rho=rho))
    idata = to_arviz(res)
    assert idata.posterior["log_p"].shape == (C, S)
    assert idata.sample_stats["acceptance"].dims == ("chain", "stage")
    # arviz's ESS of the exported chains = arviz's ESS of the raw array (nothing scrambled)
    direct = az.ess(np.asarray(res.chains["log_p"]))
    assert float(az.ess(idata, var_names=["log_p"])["log_p"]) == pytest.approx(float(direct))
    # and both agree with the AR(1) formula C·S·(1-ρ)/(1+ρ)
    assert float(direct) == pytest.approx(C * S * (1 - rho) / (1 + rho), rel=0.2)
    assert float(az.rhat(idata)["log_p"]) < 1.05
    summ = az.summary(idata)
    assert set(summ.index) == {"log_p", "log_target"}


def test_mh_independent_chains_ess_equals_our_kish_ess():
    """Independent final states: arviz's ESS of i.i.d. draws ≈ their number = our ``final_ess``."""
    rng = np.random.default_rng(3)
    res = synthetic_mh(rng.normal(size=(8, 500)))
    assert res.final_ess == pytest.approx(8.0)
    per_chain = az.ess(to_arviz(res), var_names=["log_p"])["log_p"] / 500
    assert float(per_chain) == pytest.approx(res.final_ess, rel=0.15)


def test_plot_trace_runs_on_mh_and_smc_runs():
    az.plot_trace(to_arviz(synthetic_mh(ar1_chains(C=2, S=30))), show=False)
    az.plot_trace(to_arviz([synthetic_smc(seed=s) for s in range(2)]), var_names=["log_p"], show=False)
    import matplotlib.pyplot as plt

    plt.close("all")


def test_to_arviz_rejects_bad_input():
    with pytest.raises(ValueError, match="at least one"):
        to_arviz([])
    with pytest.raises(ValueError, match="cannot stack"):
        to_arviz([synthetic_smc(), synthetic_mh(ar1_chains(C=2, S=5))])


# ----------------------------------------------------------------- genealogy
def test_genealogy_graph_shape():
    res = synthetic_smc(T=10, N=6)
    g = genealogy(res)
    assert g.number_of_nodes() == 11 * 6 and g.number_of_edges() == 10 * 6
    assert nx.is_directed_acyclic_graph(g)
    assert all(g.in_degree((t, i)) == 1 for t in range(1, 11) for i in range(6))
    for t, anc in enumerate(res.steps["ancestors"]):
        for j, a in enumerate(anc):
            assert g.has_edge((t, a), (t + 1, j))
    assert g.nodes[(3, 2)]["log_weight"] == res.steps["log_weights"][3][2]


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 6), st.integers(1, 5), st.data())
def test_distinct_ancestors_agree_with_networkx(T, N, data):
    anc = [data.draw(st.lists(st.integers(0, N - 1), min_size=N, max_size=N)) for _ in range(T)]
    res = Result(method="SMC", prompt_ids=[0], samples=[[0]] * N, log_weights=[0.0] * N,
                 steps={"ancestors": anc})
    g = genealogy(res)
    finals = [(T, i) for i in range(N)]
    lineage = set(finals).union(*(nx.ancestors(g, f) for f in finals))
    expected = [sum(1 for i in range(N) if (t, i) in lineage) for t in range(T + 1)]
    counts = distinct_ancestors(res)
    assert counts == expected
    assert counts == sorted(counts) and counts[-1] == N
    ct = coalescence_time(res)
    if 1 in counts:
        assert counts[T - ct] == 1 and (ct == 0 or counts[T - ct + 1] > 1)
    else:
        assert ct is None


def test_coalescence_by_hand():
    # step 1 copies particle 2 everywhere: every lineage passes through (1, 2)
    anc = [[0, 1, 2], [2, 2, 2], [0, 0, 1], [0, 1, 2]]
    res = Result(method="SMC", prompt_ids=[0], samples=[[0]] * 3, log_weights=[0.0] * 3,
                 steps={"ancestors": anc})
    assert distinct_ancestors(res) == [1, 1, 2, 3, 3]
    assert coalescence_time(res) == 3
    with pytest.raises(ValueError, match="ancestors"):
        genealogy(Result(method="Plain", prompt_ids=[0], samples=[[0]], log_weights=[0.0]))


# -------------------------------------------------------------- plot, report
def _png_ok(path) -> None:
    import matplotlib.image as mpimg

    img = mpimg.imread(path)
    assert img.ndim == 3 and img.shape[0] > 200 and img[..., :3].std() > 0.05


def test_plot_every_kind(tmp_path):
    fig = plot(synthetic_smc(), tmp_path / "smc.png")
    titles = [ax.get_title() for ax in fig.axes]
    assert any("effective sample size" in t for t in titles) and any("genealogy" in t for t in titles)
    assert any("exponent" in t for t in titles) and any("log-weight" in t for t in titles)
    _png_ok(tmp_path / "smc.png")
    plot(synthetic_mh(ar1_chains(C=2, S=40)), tmp_path / "mh.png")
    _png_ok(tmp_path / "mh.png")
    plain = Result(method="Plain", prompt_ids=[0], samples=[[1], [2, 3]], log_weights=[0.0, 0.5],
                   log_p=[-1.0, -2.0])
    plot(plain, tmp_path / "plain.png")
    _png_ok(tmp_path / "plain.png")


def test_report_is_self_contained(tmp_path):
    res = synthetic_smc()
    path = write_report(res, tmp_path / "report.html")
    text = path.read_text()
    assert res.summary() in text
    assert "particle &lt;3&gt; &amp; co" in text  # texts are escaped
    assert not re.search(r"(src|href)=\"(https?:|//)", text)  # no external resources
    png = re.search(r'src="data:image/png;base64,([^"]+)"', text).group(1)
    assert base64.b64decode(png)[:8] == b"\x89PNG\r\n\x1a\n"
    assert "coalescence time" in text
    mh = write_report(synthetic_mh(ar1_chains(C=3, S=50)), tmp_path / "mh.html").read_text()
    assert "r_hat" in mh and "ess_bulk" in mh


# ------------------------------------------------------------- real engines
def _toy_smc_runs(runs: int = 3):
    import llmppl as pp

    lm = pp.models.NGramLM(vocab_size=4, order=2, seed=4, concentration=1.0, eos_boost=0.5)
    target = pp.Target(lm, pp.Power(4.0))
    smc = pp.SMC(n_particles=16, schedule=pp.schedules.Linear(alpha_from=1.0, steps=4))
    return [smc.run(target, [0], max_new_tokens=6, seed=s) for s in range(runs)]


def test_real_smc_run_diagnostics(tmp_path):
    runs = _toy_smc_runs()
    res = runs[0]
    idata = to_arviz(runs)
    ss = idata.sample_stats
    T = len(res.steps["ess"])
    np.testing.assert_allclose(ss["ess"].values[0, :T], res.steps["ess"])
    np.testing.assert_allclose(ss["exponent"].values[0, :T], res.steps["exponent"])
    np.testing.assert_allclose(ss["log_evidence"].values, [r.log_evidence for r in runs])
    np.testing.assert_allclose(ss["log_evidence_increment"].values[0, :T].sum(), res.log_evidence, rtol=1e-9)
    g = genealogy(res)
    assert g.number_of_nodes() == (T + 1) * res.n
    counts = distinct_ancestors(res)
    assert counts[-1] == res.n and counts == sorted(counts)
    assert plot(res, tmp_path / "smc.png").axes
    html = write_report(res, tmp_path / "r.html").read_text()
    assert "coalescence time" in html and res.summary() in html


@pytest.mark.model
def test_cli_sample_writes_report(tmp_path):
    from llmppl.cli import main

    out = tmp_path / "report.html"
    rc = main(["sample", "--prompt", "Name three primary colors.", "--particles", "3", "--max-new-tokens", "4",
               "--quiet", "--report", str(out)])
    assert rc == 0
    text = out.read_text()
    assert "data:image/png;base64," in text and "smc" in text



def test_report_shows_the_prompt_distinct_completions_and_readable_memory(tmp_path):
    """The report names the prompt, merges identical particles into one row with their summed mass,
    and prints byte counts in KiB / MiB / GiB."""
    res = Result(method="SMC", prompt_ids=[0], samples=[[1], [2], [2], [2]],
                 log_weights=[np.log(0.4), np.log(0.2), np.log(0.2), np.log(0.2)], texts=["Red", "Yellow"] + ["Yellow"] * 2,
                 finished=[True] * 4, truncated=[False] * 4, stats={"peak_memory": 3 * 2**30 // 2})
    html = write_report(res, tmp_path / "r.html", prompt="Name a <primary> colour.").read_text()
    assert "Name a &lt;primary&gt; colour." in html and "1.5 GiB" in html
    rows = re.findall(r"<tr[^>]*><td class='num'>([0-9.]+) <span", html)
    assert rows == ["0.6000", "0.4000"], rows          # Yellow (3 particles) first, then Red
    assert html.count(">Yellow<") == 1


def test_short_mh_report_has_no_nan_and_no_warnings(tmp_path):
    """An MH run too short for ESS / R-hat says so instead of titling its panel 'ESS=nan, R-hat=nan',
    and arviz's shape warnings do not reach the user."""
    import warnings

    res = synthetic_mh(ar1_chains(C=2, S=3))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        html = write_report(res, tmp_path / "mh.html").read_text()
    text = re.sub(r"base64,[^\"]+", "", html).lower()   # (the figure's base64 may spell anything)
    assert "nan" not in text and "undefined" in text
