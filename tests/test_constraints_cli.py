"""``--regex`` / ``--json-schema`` on ``llmppl sample`` and ``llmppl run`` (issue 41)."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("llguidance")
jsonschema = pytest.importorskip("jsonschema")

from llmppl.cli import main  # noqa: E402

SCHEMA = {"type": "object", "properties": {"a": {"type": "integer", "minimum": 0, "maximum": 99}},
          "required": ["a"], "additionalProperties": False}


@pytest.mark.model
def test_sample_and_run_with_constraints(tmp_path, capsys):
    assert main(["sample", "--prompt", "Is the sky blue?", "--regex", "(Yes|No)", "--alpha", "1",
                 "--particles", "2", "--max-new-tokens", "6", "--quiet"]) == 0
    assert capsys.readouterr().out.strip() in ("Yes", "No")
    schema = tmp_path / "schema.json"
    schema.write_text(json.dumps(SCHEMA))
    (tmp_path / "in.jsonl").write_text(json.dumps({"id": 1, "prompt": "A JSON object with an integer a."}) + "\n")
    out = tmp_path / "out.jsonl"
    assert main(["run", "--input", str(tmp_path / "in.jsonl"), "--output", str(out), "--json-schema", str(schema),
                 "--alpha", "2", "--particles", "2", "--max-new-tokens", "16", "--quiet"]) == 0
    record = json.loads(out.read_text().splitlines()[0])
    jsonschema.validate(json.loads(record["text"]), SCHEMA)
    assert record["config"]["constraint"][0] == "json_schema"


@pytest.mark.parametrize("args, words", [
    (["--regex", "(a"], "invalid regex '(a': unclosed group at column 1"),
    (["--json-schema", "/no/such/file.json"], "--json-schema /no/such/file.json: No such file"),
    (["--regex", "a", "--json-schema", "x.json"], "--regex and --json-schema are two constraints"),
])
def test_bad_constraints_are_one_line(args, words, capsys):
    assert main(["sample", "--prompt", "hi", "--quiet", *args]) == 2
    err = capsys.readouterr().err.strip()
    assert words in err and "\n" not in err


@pytest.mark.model
def test_bench_constraints_writes_its_ratios(tmp_path, capsys):
    """``llmppl bench constraints``: every arm timed, the mask's own time counted only where a mask
    runs, the ratios over unconstrained SMC written; the wrapped constraint methods are restored."""
    from llmppl.targets.constraints import GrammarConstraint

    before = (GrammarConstraint.allowed_tokens, GrammarConstraint.log_next)
    path = tmp_path / "c.json"
    assert main(["bench", "constraints", "--particles", "2", "--max-new-tokens", "4", "--repeats", "1",
                 "--threads", "1", "--json", str(path)]) == 0
    capsys.readouterr()
    out = json.loads(path.read_text())
    assert set(out["runs"]) == {"unconstrained", "unconstrained_token_path", "regex", "json"}
    assert out["mask_s_per_token_median"]["unconstrained"] == 0 and out["mask_s_per_token_median"]["regex"] > 0
    assert all(r > 0 for r in out["cpu_overhead_over_unconstrained"].values())
    assert out["command"].startswith("llmppl bench constraints --particles 2")
    assert (GrammarConstraint.allowed_tokens, GrammarConstraint.log_next) == before
    assert main(["bench", "constraints", "--particles", "0"]) == 2
    assert "--particles" in capsys.readouterr().err
