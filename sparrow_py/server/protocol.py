"""The OpenAI API's request and response shapes, as the server reads and writes them.

Requests are checked field by field here, so that every mistake in one is a 400 naming the field
before any work starts. Sampling fields carry OpenAI's and llama-server's names (max_tokens,
max_completion_tokens and n_predict; temperature, top_p, top_k, min_p, seed, stop, ignore_eos),
plus Sparrow's own: speculative ("none", "chain", "tree"), n_draft, draft_p_min (Engine.generate's)
and adaptive (false: draft every round, as Engine.generate's adaptive=False), and for videos fps,
num_frames and max_pixels (on the request, or on one video part to override it there).

Responses carry `usage` and a `timings` object with llama-server's field names (prompt_n,
prompt_ms, predicted_n, predicted_ms, predicted_per_second, draft_n, draft_n_accepted, cache_n ...)
and the media's (media_n, media_cached, media_ms), on the last chunk when streaming.
"""
from __future__ import annotations

import random
import time
import uuid
from dataclasses import dataclass, field, replace
from typing import Any, Optional, Union

from .errors import bad_request
from .media import VisualRef

_FINISH_REASONS = {"eog": "stop", "stop": "stop", "length": "length", "context": "length"}
_SPECULATIVE = ("none", "chain", "tree")


@dataclass(frozen=True)
class Sampling:
    """How to generate: the server's defaults, overridden by each request."""

    max_tokens: int = -1
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    seed: Optional[int] = None
    stop: tuple = ()
    ignore_eos: bool = False
    speculative: Optional[str] = None   # None: chain when the server has a draft
    n_draft: int = 4
    draft_p_min: float = 0.0
    adaptive: bool = True

    def generate_kwargs(self) -> dict:
        """Engine.generate's keyword arguments."""
        return dict(max_tokens=self.max_tokens, temperature=self.temperature, top_k=self.top_k, top_p=self.top_p,
                    min_p=self.min_p, seed=self.seed, stop=list(self.stop), ignore_eos=self.ignore_eos,
                    speculative=self.speculative, n_draft=self.n_draft, draft_p_min=self.draft_p_min,
                    adaptive=self.adaptive)


@dataclass(frozen=True)
class VideoOptions:
    fps: Optional[float] = None
    num_frames: Optional[int] = None
    max_pixels: Optional[int] = None


@dataclass
class GenerationRequest:
    """A checked /v1/chat/completions or /v1/completions request."""

    endpoint: str                              # "chat" or "completion"
    model: Optional[str]
    stream: bool
    include_usage: bool                        # stream_options.include_usage: a usage-only chunk at the end
    sampling: Sampling
    messages: Optional[list] = None            # chat: Hugging Face style messages (parts as {"type": ...})
    visuals: list = field(default_factory=list)  # chat: the VisualRefs, in message order
    prompt: Union[str, list, None] = None      # completion: text or token ids


# ---- field checks -------------------------------------------------------------------------

def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _float(body: dict, name: str, lo: float, hi: float = float("inf"), default=None):
    value = body.get(name)
    if value is None:
        return default
    if not _is_number(value) or not lo <= value <= hi:
        raise bad_request(f"'{name}' must be a number in [{lo}, {hi}], not {value!r}", name)
    return float(value)


def _int(body: dict, name: str, lo: int, hi: int = 2 ** 63 - 1, default=None):
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if not isinstance(value, int) or isinstance(value, bool) or not lo <= value <= hi:
        raise bad_request(f"'{name}' must be an integer in [{lo}, {hi}], not {value!r}", name)
    return value


def _bool(body: dict, name: str, default: bool = False) -> bool:
    value = body.get(name)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise bad_request(f"'{name}' must be true or false, not {value!r}", name)
    return value


def parse_sampling(body: dict, defaults: Sampling) -> Sampling:
    max_tokens = defaults.max_tokens
    for name in ("max_tokens", "max_completion_tokens", "n_predict"):  # OpenAI, OpenAI's newer name, llama-server
        value = _int(body, name, -1)
        if value is not None:
            max_tokens = value
    n = _int(body, "n", 1)
    if n is not None and n != 1:
        raise bad_request("only n = 1 is supported: one choice per request", "n")
    if body.get("logprobs") not in (None, False) or body.get("top_logprobs") is not None:
        raise bad_request("logprobs are not supported", "logprobs")
    stop = body.get("stop")
    if stop is None:
        stop = list(defaults.stop)
    elif isinstance(stop, str):
        stop = [stop]
    elif not (isinstance(stop, list) and all(isinstance(s, str) for s in stop)):
        raise bad_request("'stop' must be a string or a list of strings", "stop")
    seed = _int(body, "seed", -1, 2 ** 64 - 1, defaults.seed)
    if seed == -1:  # llama-server: a random seed
        seed = random.SystemRandom().randrange(1, 2 ** 63)
    speculative = body.get("speculative", defaults.speculative)
    if speculative is not None and speculative not in _SPECULATIVE:
        raise bad_request(f"'speculative' must be one of {', '.join(_SPECULATIVE)}, not {speculative!r}", "speculative")
    return replace(
        defaults,
        max_tokens=max_tokens,
        temperature=_float(body, "temperature", 0.0, default=defaults.temperature),
        top_k=_int(body, "top_k", 0, default=defaults.top_k),
        top_p=_float(body, "top_p", 0.0, 1.0, defaults.top_p),
        min_p=_float(body, "min_p", 0.0, 1.0, defaults.min_p),
        seed=seed,
        stop=tuple(s for s in stop if s),
        ignore_eos=_bool(body, "ignore_eos", defaults.ignore_eos),
        speculative=speculative,
        n_draft=_int(body, "n_draft", 1, 32, defaults.n_draft),
        draft_p_min=_float(body, "draft_p_min", 0.0, 1.0, defaults.draft_p_min),
        adaptive=_bool(body, "adaptive", defaults.adaptive),
    )


def _video_options(obj: dict, base: VideoOptions) -> VideoOptions:
    return VideoOptions(fps=_float(obj, "fps", 1e-3, default=base.fps),
                        num_frames=_int(obj, "num_frames", 1, 100000, base.num_frames),
                        max_pixels=_int(obj, "max_pixels", 56 * 56, 2 ** 31, base.max_pixels))


def _common(body: dict, endpoint: str, defaults: Sampling) -> GenerationRequest:
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise bad_request("'model' must be a string", "model")
    stream = _bool(body, "stream")
    options = body.get("stream_options")
    if options is not None and not isinstance(options, dict):
        raise bad_request("'stream_options' must be an object", "stream_options")
    include_usage = _bool(options or {}, "include_usage")
    return GenerationRequest(endpoint, model or None, stream, include_usage, parse_sampling(body, defaults))


# ---- chat ---------------------------------------------------------------------------------

_ROLES = ("system", "user", "assistant", "tool", "developer")


def _part_url(part: dict, key: str) -> tuple[Optional[str], dict]:
    """The URL of an image_url / video_url / input_video part, and the object that holds it
    (where per-part video options may be)."""
    value = part.get(key)
    if isinstance(value, str):
        return value, {}
    if not isinstance(value, dict):
        raise bad_request(f"a '{part.get('type')}' part needs a '{key}' object", "messages")
    if key == "input_video" and "data" in value:  # llama-server's input_audio shape: {"data": base64, "format": ...}
        fmt = value.get("format") or "mp4"
        if not isinstance(value["data"], str) or not isinstance(fmt, str):
            raise bad_request("input_video's 'data' and 'format' must be strings", "messages")
        mime = "application/x-npy" if fmt == "npy" else f"video/{fmt}"
        return f"data:{mime};base64,{value['data']}", value
    return value.get("url"), value


def parse_chat(body: dict, defaults: Sampling) -> GenerationRequest:
    req = _common(body, "chat", defaults)
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise bad_request("'messages' must be a non-empty list", "messages")
    request_video = _video_options(body, VideoOptions())
    out = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or message.get("role") not in _ROLES:
            raise bad_request(f"messages[{i}] must be an object with a 'role' of {', '.join(_ROLES)}", "messages")
        content = message.get("content")
        if content is None or isinstance(content, str):
            out.append({"role": message["role"], "content": content or ""})
            continue
        if not isinstance(content, list):
            raise bad_request(f"messages[{i}].content must be a string or a list of parts", "messages")
        parts = []
        for part in content:
            kind = part.get("type") if isinstance(part, dict) else None
            if kind == "text":
                if not isinstance(part.get("text"), str):
                    raise bad_request(f"messages[{i}]: a text part needs a 'text' string", "messages")
                parts.append({"type": "text", "text": part["text"]})
            elif kind in ("image_url", "video_url", "input_video"):
                url, holder = _part_url(part, kind)
                visual = "image" if kind == "image_url" else "video"
                opts = _video_options(holder, _video_options(part, request_video))
                if visual == "image":  # frames options mean nothing for a still image; the budget does
                    opts = VideoOptions(max_pixels=opts.max_pixels)
                req.visuals.append(VisualRef(visual, url, opts.fps, opts.num_frames, opts.max_pixels))
                parts.append({"type": visual})
            else:
                raise bad_request(f"messages[{i}]: unsupported content part type {kind!r} (text, image_url, "
                                  "video_url, input_video)", "messages")
        if all(p["type"] == "text" for p in parts):  # plain text: any chat template renders a string
            out.append({"role": message["role"], "content": "".join(p["text"] for p in parts)})
        else:
            out.append({"role": message["role"], "content": parts})
    req.messages = out
    return req


# ---- completions ----------------------------------------------------------------------------

def parse_completion(body: dict, defaults: Sampling) -> GenerationRequest:
    req = _common(body, "completion", defaults)
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]  # a batch of one
    if isinstance(prompt, list):
        if not prompt or not all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
            raise bad_request("'prompt' must be a string or a list of token ids (one prompt per request)", "prompt")
    elif not isinstance(prompt, str) or not prompt:
        raise bad_request("'prompt' must be a non-empty string or a list of token ids", "prompt")
    req.prompt = prompt
    return req


# ---- responses ------------------------------------------------------------------------------

@dataclass
class Outcome:
    """How a generation ended, and its numbers."""

    finish_reason: str           # the Engine's: eog, stop, length, context
    stats: dict                  # Engine.last_stats
    n_media: int = 0
    n_media_cached: int = 0
    media_ms: float = 0.0

    @property
    def openai_finish_reason(self) -> str:
        return _FINISH_REASONS.get(self.finish_reason, "stop")

    def usage(self) -> dict:
        s = self.stats
        return {"prompt_tokens": s["n_prompt"], "completion_tokens": s["n_generated"],
                "total_tokens": s["n_prompt"] + s["n_generated"],
                "prompt_tokens_details": {"cached_tokens": s["n_prompt_cached"]}}

    def timings(self) -> dict:
        s = self.stats
        prompt_n = s["n_prompt"] - s["n_prompt_cached"]  # llama-server: the tokens actually prefilled
        predicted_n = s["n_generated"]
        return {
            "cache_n": s["n_prompt_cached"],
            "prompt_n": prompt_n,
            "prompt_ms": s["prefill_ms"],
            "prompt_per_token_ms": s["prefill_ms"] / prompt_n if prompt_n else 0.0,
            "prompt_per_second": s["prefill_tokens_per_s"],
            "predicted_n": predicted_n,
            "predicted_ms": s["decode_ms"],
            "predicted_per_token_ms": s["decode_ms"] / predicted_n if predicted_n else 0.0,
            "predicted_per_second": s["decode_tokens_per_s"],
            "draft_n": s["n_drafted"],
            "draft_n_accepted": s["n_accepted"],
            "media_n": self.n_media,
            "media_cached": self.n_media_cached,
            "media_ms": self.media_ms,
        }


class ResponseWriter:
    """Builds one request's response objects (whole, or chunk by chunk)."""

    def __init__(self, req: GenerationRequest, model_id: str):
        self.chat = req.endpoint == "chat"
        self.id = ("chatcmpl-" if self.chat else "cmpl-") + uuid.uuid4().hex
        self.created = int(time.time())
        self.model = model_id

    def _envelope(self, obj: str) -> dict:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model,
                "system_fingerprint": "sparrow"}

    def whole(self, text: str, outcome: Outcome) -> dict:
        out = self._envelope("chat.completion" if self.chat else "text_completion")
        if self.chat:
            choice = {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None}
        else:
            choice = {"index": 0, "text": text, "logprobs": None}
        choice["finish_reason"] = outcome.openai_finish_reason
        out.update(choices=[choice], usage=outcome.usage(), timings=outcome.timings())
        return out

    def chunk(self, text: Optional[str], outcome: Optional[Outcome] = None, first: bool = False) -> dict:
        out = self._envelope("chat.completion.chunk" if self.chat else "text_completion")
        if self.chat:
            delta: dict[str, Any] = {"role": "assistant", "content": text or ""} if first else \
                ({"content": text} if text is not None else {})
            choice = {"index": 0, "delta": delta, "logprobs": None}
        else:
            choice = {"index": 0, "text": text or "", "logprobs": None}
        choice["finish_reason"] = outcome.openai_finish_reason if outcome else None
        out["choices"] = [choice]
        if outcome is not None:  # llama-server: the last chunk carries the numbers
            out.update(usage=outcome.usage(), timings=outcome.timings())
        return out

    def usage_chunk(self, outcome: Outcome) -> dict:
        """OpenAI's stream_options.include_usage: a last chunk with no choices and the usage."""
        out = self._envelope("chat.completion.chunk" if self.chat else "text_completion")
        out.update(choices=[], usage=outcome.usage(), timings=outcome.timings())
        return out
