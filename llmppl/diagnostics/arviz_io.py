"""``Result`` → ``arviz.InferenceData``.

Groups (one *chain* per run for SMC / baselines, one per MH chain; a list of
Results stacks their chains):

* ``posterior`` (chain, draw): the output draws.  MH: the trace of every chain
  after every MH step (``log_p``, ``log_target``, ``length`` …).  SMC and
  baselines: the final particles (``log_p``, ``length``); with ``resample=True``
  (default) they are first resampled by their weights (systematic, seeded by the
  run's seed), so that each draw has weight ``1/N`` — what arviz's statistics assume.
* ``sample_stats``: per draw, ``log_weight``, ``finished`` and ``source_particle``;
  SMC per step (dims ``chain, step`` and ``chain, step, particle``):
  ``ess``, ``conditional_ess``, ``exponent``, ``log_evidence_increment``,
  ``resampled``, ``log_weights``, ``weights`` (normalised, ``W_t^i ∝ exp(log w_t^i)``),
  ``ancestors`` and whatever else the engine recorded; ``log_evidence`` (chain);
  MH per stage (``chain, stage``): ``acceptance``.  (Per-step traces live next to
  the per-draw statistics, as PyMC's SMC does with its ``stage`` dimension.)

Runs of different lengths are padded with NaN (floats), -1 (integers) or False.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from ..inference.resampling import systematic
if TYPE_CHECKING:  # type hints only: the Result imports this package, not the other way round
    from ..inference.result import Result
    import arviz as az

#: per-step keys holding one value per particle (dims chain, step, particle)
PARTICLE_KEYS = ("log_weights", "ancestors", "twist")


def _pad(rows: Sequence[Sequence[Any]], fill: Any, dtype: Any) -> np.ndarray:
    """Stack ragged nested lists into one array, padding with ``fill``."""
    arrays = [np.asarray(r, dtype=dtype) for r in rows]
    shape = tuple(max(a.shape[d] if a.ndim > d else 0 for a in arrays) for d in range(max(a.ndim for a in arrays)))
    out = np.full((len(arrays),) + shape, fill, dtype=dtype)
    for i, a in enumerate(arrays):
        out[(i,) + tuple(slice(0, s) for s in a.shape)] = a
    return out


def _kind(value: Any) -> tuple[Any, Any]:
    """(fill, dtype) for padding a trace whose entries look like ``value``."""
    flat = np.asarray(value)
    if flat.dtype == bool:
        return False, bool
    if np.issubdtype(flat.dtype, np.integer):
        return -1, np.int64
    return np.nan, np.float64


def _first_leaf(value: Any) -> Any:
    while isinstance(value, (list, tuple)) and value:
        value = value[0]
    return value


def _normalised(log_w: np.ndarray) -> np.ndarray:
    """``W^i = exp(log w^i − logsumexp log w)`` along the last axis (NaN rows stay NaN)."""
    with np.errstate(invalid="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN rows are padding
        m = np.nanmax(np.where(np.isfinite(log_w), log_w, np.nan), axis=-1, keepdims=True)
        w = np.exp(log_w - m)
        return w / np.nansum(w, axis=-1, keepdims=True)


def _is_result(obj: Any) -> bool:
    """Duck-typed ``isinstance(obj, Result)`` (this package sits below ``inference.result``)."""
    return all(hasattr(obj, a) for a in ("samples", "weights", "steps", "chains", "log_evidence"))


def _final_draws(res: Result, resample: bool) -> np.ndarray:
    """Indices of the particles that make the posterior draws of one run."""
    if not resample:
        return np.arange(res.n)
    gen = torch.Generator().manual_seed(0 if res.seed is None else int(res.seed))
    return systematic(gen, torch.as_tensor(res.weights), res.n).numpy()


def _is_mh(res: Result) -> bool:
    return bool(res.chains)


def _chain_traces(results: Sequence[Result]) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """MH: per-chain traces → posterior, per-stage ``acceptance`` → sample_stats."""
    post: dict[str, list] = {}
    stats: dict[str, list] = {}
    keys = [k for k in results[0].chains if all(k in r.chains for r in results)]
    for key in keys:
        rows = [c for r in results for c in r.chains[key]]
        if not rows or not isinstance(rows[0], (list, tuple)):
            continue  # a scalar per chain: kept in attrs, not a trace
        (stats if key == "acceptance" else post)[key] = rows
    out_post = {k: _pad(v, *_kind(_first_leaf(v))) for k, v in post.items()}
    out_stats = {k: _pad(v, np.nan, np.float64) for k, v in stats.items()}
    return out_post, out_stats


def _step_traces(results: Sequence[Result]) -> dict[str, tuple[tuple[str, ...], np.ndarray]]:
    """SMC: every per-step trace the engines recorded, padded to (chain, step[, particle])."""
    out: dict[str, tuple[tuple[str, ...], np.ndarray]] = {}
    keys = [k for k in results[0].steps if all(k in r.steps for r in results)]
    for key in keys:
        rows = [r.steps[key] for r in results]
        leaf = _first_leaf(rows)
        if not isinstance(leaf, (int, float, bool, np.number, np.bool_)) or leaf is None:
            continue
        arr = _pad(rows, *_kind(leaf))
        dims = ("chain", "step", "particle")[: arr.ndim]
        out[key] = (dims, arr)
    n_steps = max((a.shape[1] for _, a in out.values()), default=0)
    for key, (dims, arr) in out.items():  # a trace recorded on fewer steps is padded to the longest
        if arr.shape[1] < n_steps:
            fill, dtype = _kind(_first_leaf(arr.tolist()))
            wide = np.full((arr.shape[0], n_steps) + arr.shape[2:], fill, dtype=dtype)
            wide[:, : arr.shape[1]] = arr
            out[key] = (dims, wide)
    if "log_weights" in out:
        out["weights"] = (out["log_weights"][0], _normalised(out["log_weights"][1]))
    return out


def _attrs(results: Sequence[Result]) -> dict[str, Any]:
    first = results[0]
    return {
        "inference_library": "llmppl",
        "method": first.method,
        "n_runs": len(results),
        "seeds": json.dumps([r.seed for r in results]),
        "config": json.dumps(first.config, default=repr),
        "summary": " | ".join(r.summary() for r in results),
    }


def to_arviz(result: Result | Sequence[Result], resample: bool = True) -> az.InferenceData:
    """An ``arviz.InferenceData`` of one run or of several runs of the same kind (stacked as chains).

    ``az.ess``, ``az.rhat``, ``az.summary`` and ``az.plot_trace`` then apply: on
    MH chains (autocorrelation along MH steps) and on repeated SMC runs (between-run
    agreement of the final, equally weighted draws).
    """
    import arviz as az        # heavy (xarray, pandas): imported when used
    import xarray as xr

    results = list(result) if isinstance(result, (list, tuple)) else [result]
    if not results:
        raise ValueError("to_arviz needs at least one Result")
    if not all(_is_result(r) for r in results):
        raise ValueError("to_arviz takes a Result or a list of Results")
    if len({_is_mh(r) for r in results}) != 1:
        raise ValueError("cannot stack MH chains with SMC/baseline runs in one InferenceData")
    attrs = _attrs(results)
    stats_vars: dict[str, tuple[tuple[str, ...], np.ndarray]] = {}
    if _is_mh(results[0]):
        post, mh_stats = _chain_traces(results)
        if not post:
            raise ValueError("the MH Result has no per-chain traces in `chains`")
        for k, v in mh_stats.items():
            stats_vars[k] = (("chain", "stage"), v)
    else:
        idx = [_final_draws(r, resample) for r in results]
        post = {
            "log_p": _pad([np.asarray(r.log_p, dtype=float)[i] if r.log_p else np.full(len(i), np.nan)
                           for r, i in zip(results, idx)], np.nan, np.float64),
            "length": _pad([[len(r.samples[j]) for j in i] for r, i in zip(results, idx)], -1, np.int64),
        }
        stats_vars["log_weight"] = (("chain", "draw"), _pad(
            [np.asarray(r.log_weights, dtype=float)[i] for r, i in zip(results, idx)], np.nan, np.float64))
        stats_vars["source_particle"] = (("chain", "draw"), _pad(idx, -1, np.int64))
        stats_vars["finished"] = (("chain", "draw"), _pad(
            [np.asarray(r.finished or [False] * r.n, dtype=bool)[i] for r, i in zip(results, idx)], False, bool))
        stats_vars.update(_step_traces(results))
        if all(r.log_evidence is not None for r in results):
            stats_vars["log_evidence"] = (("chain",), np.array([r.log_evidence for r in results], float))
    posterior = az.dict_to_dataset(post, library=None, attrs=attrs)
    n_chain = posterior.sizes["chain"]
    coords = {"chain": np.arange(n_chain)}
    for dim in ("draw",):
        if any(dim in d for d, _ in stats_vars.values()):
            coords[dim] = posterior.coords[dim].values
    sample_stats = xr.Dataset({k: (d, v) for k, (d, v) in stats_vars.items()}, coords=coords, attrs=attrs)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return az.InferenceData(posterior=posterior, sample_stats=sample_stats)
