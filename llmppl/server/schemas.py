"""Request bodies of ``/v1/chat/completions`` and ``/v1/completions`` (pydantic).

Types are checked strictly (a string is not a number, a float is not an int); unknown fields are
refused, so a misspelt ``extra_body`` option is an error rather than silently ignored.  OpenAI
fields that would change the sampled distribution in ways the engines do not implement
(``temperature``, ``top_p``, penalties, ``logit_bias``, ``logprobs``, tools, ...) are accepted
only at their neutral value; :func:`unsupported_fields` says which are set otherwise.
"""

from __future__ import annotations

import math
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    StrictBool,
    StrictInt,
    StrictStr,
    field_validator,
)


def _number(v: Any) -> Any:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise ValueError(f"must be a number, got {type(v).__name__}")
    if not math.isfinite(float(v)):
        raise ValueError(f"must be a finite number, got {v!r}")
    return v


#: a finite JSON number (int or float; not a string, not a boolean, not NaN or ±Infinity)
Number = Annotated[float, BeforeValidator(_number)]


class LLMPPLFields(BaseModel):
    """The sampler's options (the OpenAI client's ``extra_body``); None: the server's default."""

    method: StrictStr | None = Field(None, description="smc, mh, plain, lowtemp, greedy, bestofn, lookahead")
    alpha: Number | None = Field(None, gt=0, description="target p^alpha; finite and > 0")
    particles: StrictInt | None = Field(None, ge=1, description="particles / chains / samples")
    resampling: StrictStr | None = Field(None, description="SMC resampling scheme")
    ess_threshold: Number | None = Field(None, ge=0, le=1, description="SMC resamples when ESS < this * N")
    block_size: StrictInt | None = Field(None, ge=1, description="MH block size (default max_tokens // 4)")
    n_mcmc: StrictInt | None = Field(None, ge=0, description="MH steps per block")
    structured_outputs: dict[str, Any] | None = Field(
        None, description="vLLM's structured outputs: one of {json: schema, regex: pattern, choice: [strings], "
        "grammar: Lark text}; the target becomes p^alpha * 1[y in L], sampled exactly")


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="allow")
    include_usage: StrictBool = False


#: OpenAI field -> the values that leave the sampled distribution unchanged (None: omitted)
NEUTRAL: dict[str, tuple[Any, ...]] = {
    "temperature": (None, 1, 1.0),
    "top_p": (None, 1, 1.0),
    "frequency_penalty": (None, 0, 0.0),
    "presence_penalty": (None, 0, 0.0),
    "logit_bias": (None, {}),
    "logprobs": (None, False, 0),
    "top_logprobs": (None, 0),
    "echo": (None, False),
    "best_of": (None, 1),
    "suffix": (None, ""),
    "tools": (None, []),
    "functions": (None, []),
    "tool_choice": (None, "none", "auto"),
    "function_call": (None, "none", "auto"),
    "modalities": (None, ["text"]),
    "audio": (None,),
    "prediction": (None,),
    "web_search_options": (None,),
}

_WHY = {
    "temperature": "llmppl samples the target p^alpha: set alpha (extra_body) or method='lowtemp' instead",
    "top_p": "nucleus truncation is not part of the target p^alpha",
    "logprobs": "per-token log-probabilities are not returned; the llmppl object carries log p and weights",
    "top_logprobs": "per-token log-probabilities are not returned",
    "best_of": "use particles (extra_body): every method already draws several candidates",
    "echo": "the prompt is not echoed",
}


def _neutral(value: Any, allowed: tuple[Any, ...]) -> bool:
    for v in allowed:
        if v is None or value is None:
            if v is value:
                return True
        elif isinstance(value, bool) == isinstance(v, bool) and value == v:
            return True
    return False


def unsupported_fields(body: BaseModel) -> tuple[str, str] | None:
    """``(field, message)`` of the first OpenAI field set to a value the engines cannot honour."""
    for name, ok in NEUTRAL.items():
        if name not in type(body).model_fields:
            continue
        value = getattr(body, name)
        if _neutral(value, ok):
            continue
        why = _WHY.get(name, "the sampler cannot honour it exactly")
        allowed = " or ".join(repr(v) for v in ok if v is not None) or "null"
        return name, f"{name}={value!r} is not supported: {why} (allowed: omitted or {allowed})"
    return None


#: ``structured_outputs`` keys -> the constraint kind (vLLM's names)
STRUCTURED = {"json": "json_schema", "regex": "regex", "choice": "choice", "grammar": "grammar"}


def constraint_spec(body: BaseModel) -> tuple[str, str, Any] | None:
    """``(kind, param, value)`` of the grammar constraint a request asks for — ``response_format``
    ``{"type": "json_schema", "json_schema": {"schema": ...}}`` or ``{"type": "json_object"}`` (chat), or
    ``structured_outputs`` (vLLM's extension) — None for free text; ``ValueError`` for a malformed one."""
    rf = getattr(body, "response_format", None)
    so = getattr(body, "structured_outputs", None)
    if rf is not None and so is not None and rf != {"type": "text"}:
        raise ValueError("give response_format or structured_outputs, not both")
    if so is not None:
        keys = [k for k in so if so[k] is not None]
        if len(keys) != 1 or keys[0] not in STRUCTURED:
            raise ValueError(f"structured_outputs takes exactly one of {', '.join(STRUCTURED)}, got {sorted(so)}")
        return STRUCTURED[keys[0]], "structured_outputs", so[keys[0]]
    if rf is None:
        return None
    kind = rf.get("type") if isinstance(rf, dict) else None
    if kind == "text":
        return None
    if kind == "json_object":
        return "json_schema", "response_format", {"type": "object"}
    if kind == "json_schema":
        spec = rf.get("json_schema")
        if not isinstance(spec, dict) or not isinstance(spec.get("schema"), dict):
            raise ValueError("response_format json_schema needs {\"json_schema\": {\"name\": ..., \"schema\": {...}}}")
        return "json_schema", "response_format", spec["schema"]
    raise ValueError(f"response_format type must be text, json_object or json_schema, got {kind!r}")


class _Common(LLMPPLFields):
    model_config = ConfigDict(extra="forbid")

    model: StrictStr
    max_tokens: StrictInt | None = Field(None, ge=1)
    n: StrictInt = Field(1, ge=1)
    seed: StrictInt | None = Field(None, ge=0, le=2**63 - 1)
    stop: Any = None
    stream: StrictBool = False
    stream_options: StreamOptions | None = None
    user: StrictStr | None = None
    metadata: dict[str, Any] | None = None
    store: StrictBool | None = None
    service_tier: StrictStr | None = None
    # fields accepted only at their neutral value (see NEUTRAL)
    temperature: Any = None
    top_p: Any = None
    frequency_penalty: Any = None
    presence_penalty: Any = None
    logit_bias: Any = None

    @field_validator("stop")
    @classmethod
    def _stop(cls, v: Any) -> list[str] | None:
        if v is None:
            return None
        if isinstance(v, str):
            return [v]
        if isinstance(v, list) and all(isinstance(s, str) for s in v):
            return list(v)
        raise ValueError("must be a string or a list of strings")


class TextPart(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["text"]
    text: StrictStr


class ChatMessage(BaseModel):
    """One message; ``content`` is text or a list of text parts (images and audio are refused)."""

    model_config = ConfigDict(extra="allow")  # name, tool_calls, tool_call_id, refusal, ...
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: StrictStr | list[TextPart] | None = None

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(p.text for p in self.content)


class ChatCompletionRequest(_Common):
    messages: list[ChatMessage] = Field(..., min_length=1)
    max_completion_tokens: StrictInt | None = Field(None, ge=1)
    logprobs: Any = None
    top_logprobs: Any = None
    tools: Any = None
    tool_choice: Any = None
    functions: Any = None
    function_call: Any = None
    parallel_tool_calls: StrictBool | None = None
    response_format: Any = None
    modalities: Any = None
    audio: Any = None
    prediction: Any = None
    web_search_options: Any = None
    reasoning_effort: StrictStr | None = None
    safety_identifier: StrictStr | None = None
    prompt_cache_key: StrictStr | None = None
    verbosity: StrictStr | None = None


class CompletionRequest(_Common):
    prompt: Any = Field(..., description="a string, a list of strings, token ids or a list of token-id lists")
    logprobs: Any = None
    echo: Any = None
    best_of: Any = None
    suffix: Any = None

    @field_validator("prompt")
    @classmethod
    def _prompt(cls, v: Any) -> list[str | list[int]]:
        """One or several prompts, each a string or a list of token ids."""
        def ids(x: Any) -> bool:
            return isinstance(x, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in x)

        if isinstance(v, str):
            return [v]
        if isinstance(v, list):
            if not v:
                raise ValueError("must not be empty")
            if ids(v):
                return [list(v)]
            if all(isinstance(x, str) or ids(x) for x in v):
                return list(v)
        raise ValueError("must be a string, a list of strings, a list of token ids or a list of "
                         "token-id lists")
