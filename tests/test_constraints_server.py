"""Structured output through ``llmppl serve``: a real uvicorn server on 127.0.0.1, the official
``openai`` client, ``response_format={"type": "json_schema", ...}`` (and vLLM's ``structured_outputs``)
on the default model; every returned completion parses and validates."""

from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("llguidance")
jsonschema = pytest.importorskip("jsonschema")
openai = pytest.importorskip("openai")
pytest.importorskip("uvicorn")

from llmppl.server.config import ServerConfig  # noqa: E402

from test_server import KEY, _client, running_server  # noqa: E402

SCHEMA = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 16},
                                           "age": {"type": "integer", "minimum": 0, "maximum": 120}},
          "required": ["name", "age"], "additionalProperties": False}


@pytest.fixture(scope="module")
def server(smollm):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    config = ServerConfig(model_name="smollm2", particles=4, max_tokens=40, max_tokens_limit=64, api_key=KEY)
    try:
        with running_server(smollm, config) as (base, _):
            yield base
    finally:
        torch.set_num_threads(threads)


@pytest.mark.model
def test_response_format_json_schema_returns_valid_json(server):
    r = _client(server).chat.completions.create(
        model="smollm2", messages=[{"role": "user", "content": "Invent a person. Reply in JSON with name and age."}],
        max_tokens=40, n=2, seed=0,
        response_format={"type": "json_schema", "json_schema": {"name": "person", "schema": SCHEMA, "strict": True}},
        extra_body={"alpha": 2.0, "particles": 4})
    # n = 2: the two heaviest distinct completions, or one when the particles hold only one (docs/serve.md)
    assert 1 <= len(r.choices) == min(2, r.model_extra["llmppl"]["distinct_completions"])
    for c in r.choices:
        jsonschema.validate(json.loads(c.message.content), SCHEMA)
        assert c.finish_reason == "stop"


@pytest.mark.model
def test_structured_outputs_regex_and_bad_schemas(server):
    c = _client(server)
    r = c.completions.create(model="smollm2", prompt="The answer is", max_tokens=8,
                             extra_body={"structured_outputs": {"regex": r" (yes|no)"}, "particles": 2})
    assert r.choices[0].text in (" yes", " no")
    with pytest.raises(openai.BadRequestError) as e:
        c.chat.completions.create(model="smollm2", messages=[{"role": "user", "content": "Hi"}], max_tokens=8,
                                  response_format={"type": "json_schema",
                                                   "json_schema": {"name": "x", "schema": {"type": "objekt"}}})
    assert e.value.body["param"] == "response_format" and "invalid JSON schema" in e.value.body["message"]
    with pytest.raises(openai.BadRequestError) as e:
        c.completions.create(model="smollm2", prompt="x", max_tokens=4, extra_body={"structured_outputs": {"regex": "(a"}})
    assert e.value.body["param"] == "structured_outputs" and "unclosed group" in e.value.body["message"]
