"""OpenAI request bodies (the fields vattn reads) and the OpenAI-style error body.

Unknown fields are accepted and ignored, as OpenAI clients send more than a server needs;
fields we cannot honour (n > 1, echo, logprobs, tools) are a 400 that says so.
vattn adds `vattn_spec` (the attention spec of this request), `ignore_eos` and
`stop_token_ids` (as vLLM does).
"""
from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationError


class ApiError(Exception):
    """An HTTP error with an OpenAI-style body: {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, message: str, status: int = 400, param: str | None = None, code: str | None = None,
                 type: str = "invalid_request_error"):
        super().__init__(message)
        self.message, self.status, self.param, self.code, self.type = message, status, param, code, type

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


class StreamOptions(BaseModel):
    include_usage: bool = False


class _Common(BaseModel):
    model_config = ConfigDict(extra="allow")
    model: str | None = None
    max_tokens: int | None = None
    temperature: float | None = None   # None: OpenAI's default, 1
    top_p: float | None = None
    n: int | None = None
    stop: str | list[str] | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    seed: int | None = None
    vattn_spec: str | None = None
    ignore_eos: bool = False
    stop_token_ids: list[int] | None = None


class CompletionRequest(_Common):
    prompt: str | list[int] | list[str] | list[list[int]]
    echo: bool = False
    logprobs: int | None = None


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: str
    content: str | list[dict[str, Any]] | None = None

    def text(self) -> str:
        """The message's text; content parts other than text are an error."""
        if self.content is None or isinstance(self.content, str):
            return self.content or ""
        out = []
        for part in self.content:
            if part.get("type") != "text":
                raise ApiError(f"message content of type {part.get('type')!r} is not supported; send text",
                               param="messages")
            out.append(str(part.get("text", "")))
        return "".join(out)


class ChatRequest(_Common):
    messages: list[ChatMessage]
    max_completion_tokens: int | None = None
    logprobs: bool = False
    tools: list | None = None


def parse(model: type[BaseModel], body) -> BaseModel:
    """Validate a decoded JSON body; a bad field is an ApiError naming it."""
    if not isinstance(body, dict):
        raise ApiError(f"the request body must be a JSON object, got {type(body).__name__}")
    try:
        return model.model_validate(body)
    except ValidationError as e:
        err = e.errors()[0]
        loc = ".".join(str(x) for x in err["loc"] if not isinstance(x, int)) or None
        if err["type"] == "missing":
            msg = f"the field {loc!r} is required"
        else:
            msg = f"invalid value for {loc!r}: {err['msg']} (got {err.get('input')!r})"
        raise ApiError(msg, param=loc, code="invalid_value") from None


def unsupported(req: _Common) -> None:
    """Raise for fields this server does not implement, rather than silently ignore them."""
    if req.n not in (None, 1):
        raise ApiError(f"n must be 1 (one choice per prompt), got {req.n}", param="n")
    extra = req.model_extra or {}
    for name in ("frequency_penalty", "presence_penalty", "repetition_penalty"):
        if extra.get(name) not in (None, 0, 0.0, 1.0 if name == "repetition_penalty" else 0):
            raise ApiError(f"{name} is not supported; drop it (it would change the text)", param=name)
    if extra.get("logit_bias"):
        raise ApiError("logit_bias is not supported; drop it", param="logit_bias")
    if extra.get("best_of") not in (None, 1):
        raise ApiError("best_of must be 1", param="best_of")
    if getattr(req, "echo", False):
        raise ApiError("echo is not supported; drop it", param="echo")
    if getattr(req, "logprobs", None):
        raise ApiError("logprobs are not supported; drop the field", param="logprobs")
    if getattr(req, "tools", None):
        raise ApiError("tools are not supported by this server", param="tools")
