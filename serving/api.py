"""The chat API's wire format: OpenAI-compatible request/response models and their validation.

`ChatCompletionRequest` carries the limits (nanochat's web server's, kept here in one place): at most
`MAX_MESSAGES` messages of at most `MAX_MESSAGE_CHARS` characters each and `MAX_TOTAL_CHARS` in all,
temperature in [0, 2], top-k in [0, 200] (0 = no top-k), top-p in (0, 1], max_tokens in [1, 4096].
Messages must alternate user/assistant after an optional system message and end with a user turn.

Everything that fails validation becomes HTTP 400 with OpenAI's error body
(`{"error": {"message", "type", "param", "code"}}`) through `error_body`; the app installs the
handlers, so bad input is never a 500. This module imports neither torch nor ray.
"""

from __future__ import annotations

import time
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

MAX_MESSAGES = 500
MAX_MESSAGE_CHARS = 8000
MAX_TOTAL_CHARS = 32000
MAX_TOKENS_LIMIT = 4096
MAX_TOP_K = 200

DEFAULT_TEMPERATURE = 0.8
DEFAULT_TOP_K = 50
DEFAULT_MAX_TOKENS = 512


class TextPart(BaseModel):
    type: Literal["text"]
    text: str = Field(max_length=MAX_MESSAGE_CHARS)


class ChatMessage(BaseModel):
    role: Literal["system", "user", "assistant"]
    content: str | list[TextPart] = Field(description="text, or OpenAI-style text parts")

    @property
    def text(self) -> str:
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)

    @model_validator(mode="after")
    def _content_fits(self) -> ChatMessage:
        if len(self.text) > MAX_MESSAGE_CHARS:
            raise ValueError(
                f"a message may have at most {MAX_MESSAGE_CHARS} characters, got {len(self.text)}"
            )
        return self


class StreamOptions(BaseModel):
    include_usage: bool = False


class ChatCompletionRequest(BaseModel):
    """POST /v1/chat/completions. Unknown OpenAI fields (user, logprobs, ...) are accepted and ignored."""

    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    messages: list[ChatMessage] = Field(min_length=1, max_length=MAX_MESSAGES)
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_k: int | None = Field(default=None, ge=0, le=MAX_TOP_K, description="0 disables top-k")
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    max_tokens: int | None = Field(default=None, ge=1, le=MAX_TOKENS_LIMIT)
    max_completion_tokens: int | None = Field(default=None, ge=1, le=MAX_TOKENS_LIMIT)
    seed: int | None = Field(default=None, ge=0, le=2**63 - 1)
    n: int = Field(default=1, ge=1, le=1, description="only one choice per request")
    stream: bool = False
    stream_options: StreamOptions | None = None

    @field_validator("messages")
    @classmethod
    def _conversation_shape(cls, messages: list[ChatMessage]) -> list[ChatMessage]:
        total = sum(len(m.text) for m in messages)
        if total > MAX_TOTAL_CHARS:
            raise ValueError(
                f"the messages may have at most {MAX_TOTAL_CHARS} characters in all, got {total}"
            )
        turns = messages[1:] if messages[0].role == "system" else messages
        if not turns:
            raise ValueError("a system message must be followed by a user message")
        for i, message in enumerate(turns):
            expected = "user" if i % 2 == 0 else "assistant"
            if message.role != expected:
                raise ValueError(
                    f"message {i + len(messages) - len(turns)}: expected role {expected!r}, got "
                    f"{message.role!r} (after an optional system message, roles alternate user/assistant)"
                )
        if turns[-1].role != "user":
            raise ValueError("the last message must be from the user")
        return messages

    def conversation(self) -> dict[str, Any]:
        """The request as a nanorun conversation (`nanorun.trainer.chat.conversation`)."""
        return {"messages": [{"role": m.role, "content": m.text} for m in self.messages]}

    def sampling(self) -> dict[str, Any]:
        """Sampling parameters with the server's defaults filled in."""
        max_tokens = self.max_completion_tokens or self.max_tokens or DEFAULT_MAX_TOKENS
        return {
            "temperature": DEFAULT_TEMPERATURE if self.temperature is None else self.temperature,
            "top_k": DEFAULT_TOP_K if self.top_k is None else (self.top_k or None),
            "top_p": self.top_p,
            "max_tokens": max_tokens,
            "seed": self.seed,
        }


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


FinishReason = Literal["stop", "length"]


class Choice(BaseModel):
    index: int = 0
    message: AssistantMessage
    finish_reason: FinishReason


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[Choice]
    usage: Usage


class Delta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChunkChoice(BaseModel):
    index: int = 0
    delta: Delta
    finish_reason: FinishReason | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChunkChoice]
    usage: Usage | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "nanorun"


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorDetail


def completion_id() -> str:
    return f"chatcmpl-{uuid.uuid4().hex[:24]}"


def now() -> int:
    return int(time.time())


def error_body(
    message: str, type_: str = "invalid_request_error", param: str | None = None, code: str | None = None
) -> dict[str, Any]:
    return ErrorResponse(error=ErrorDetail(message=message, type=type_, param=param, code=code)).model_dump()


def validation_error_body(errors: list[dict[str, Any]]) -> dict[str, Any]:
    """OpenAI error body for pydantic/FastAPI validation errors: the first error names the parameter."""
    if not errors:
        return error_body("invalid request")
    first = errors[0]
    loc = [str(p) for p in first.get("loc", ()) if p != "body"]
    param = ".".join(loc) or None
    if first.get("type") == "json_invalid":
        message = "the request body is not valid JSON"
        code = "invalid_json"
    else:
        message = f"{param}: {first.get('msg')}" if param else str(first.get("msg"))
        code = str(first.get("type")) if first.get("type") else None
    if len(errors) > 1:
        message += f" (and {len(errors) - 1} more problem{'s' if len(errors) > 2 else ''})"
    return error_body(message, param=param, code=code)
