"""Errors the server answers with: OpenAI-style error objects, with llama-server's type names.

    {"error": {"message": "...", "type": "invalid_request_error", "param": "messages", "code": 400}}

OpenAI clients raise by the HTTP status (openai.BadRequestError for 400 ...) and keep this body;
llama-server writes the status as `code`, so dashboards made for it read the same field.
"""
from __future__ import annotations

from typing import Optional

from sparrow_py.errors import SparrowError


class ApiError(Exception):
    """A request the server refuses or could not serve: the HTTP status and the error object."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: Optional[str] = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.status}}


def bad_request(message: str, param: Optional[str] = None) -> ApiError:
    return ApiError(400, message, "invalid_request_error", param)


def context_exceeded(n_prompt: int, n_ctx: int) -> ApiError:
    return ApiError(400, f"the prompt has {n_prompt} tokens but a slot's context holds {n_ctx} (leave room to "
                         "generate; start the server with a larger --ctx-size)", "exceed_context_size_error", "messages")


def from_sparrow_error(e: SparrowError) -> ApiError:
    """The answer to a runtime error met while serving a request. The runtime checks what it is
    given (token ids, media, sampling values) and says what is wrong: those are the client's
    mistakes (4xx); anything else is the server's."""
    status = getattr(e, "status", None)
    if status == "SPARROW_ERR_CONTEXT_FULL":
        return ApiError(400, str(e), "exceed_context_size_error")
    if status == "SPARROW_ERR_INVALID_ARGUMENT":  # also the Python layer's own checks of its input
        return bad_request(str(e))
    if status == "SPARROW_ERR_OUT_OF_MEMORY":
        return ApiError(507, str(e), "server_error")
    return ApiError(500, str(e), "server_error")
