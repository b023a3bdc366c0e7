"""Chat templates: render a model's Jinja2 template (tokenizer.chat_template) for a message list.

Templates are untrusted input (they come from model files), so they run in Jinja2's immutable
sandbox with only the helpers Hugging Face templates expect, and with bounds the sandbox lacks: a
render that runs past RENDER_SECONDS (nested loops over ranges), a repetition (`"x" * n`, `**`)
whose result would be huge, and any error inside the template all end as a SparrowError, so a
hostile or broken file can neither hang nor crash the host.
"""
from __future__ import annotations

import datetime
import sys
import time
from typing import Any, Sequence

from sparrow_py.errors import SparrowError


RENDER_SECONDS = 2.0          # a real template renders in milliseconds
MAX_REPEAT_ITEMS = 1 << 20     # elements a `*` repetition may produce (strings: characters)
MIN_OUTPUT_CHARS = 1 << 20     # the rendered prompt's bound: this plus 4x the messages' text


class _RenderTimeout(Exception):
    pass


def _sandbox_class():
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class BoundedSandbox(ImmutableSandboxedEnvironment):
        """The immutable sandbox with `*` and `**` checked: "x" * 10**10 would take the memory."""
        intercepted_binops = frozenset(["*", "**"])

        def call_binop(self, context, operator, left, right):
            if operator == "*":
                for seq, count in ((left, right), (right, left)):
                    if isinstance(seq, (str, list, tuple)) and isinstance(count, int) and \
                            len(seq) * max(count, 0) > MAX_REPEAT_ITEMS:
                        raise OverflowError(f"repetition of {len(seq)} x {count} items is too large")
            if operator == "**" and isinstance(right, int) and abs(right) > 1024 and \
                    isinstance(left, (int, float)) and abs(left) > 1:
                raise OverflowError(f"power {right} is too large")
            return super().call_binop(context, operator, left, right)

    return BoundedSandbox


def _render_with_deadline(compiled, seconds: float, max_chars: int, **variables: Any) -> str:
    """compiled.render(...), stopped with _RenderTimeout once `seconds` have passed, and with an
    OverflowError once the output passes max_chars characters. Jinja2 compiles
    templates to Python, so a trace function on this thread sees every line the template runs (the
    only way to stop a loop that calls nothing); the previous tracer (a debugger, coverage) is put
    back afterwards."""
    deadline = time.monotonic() + seconds

    def trace(frame, event, arg):
        if time.monotonic() > deadline:
            raise _RenderTimeout()
        return trace

    previous = sys.gettrace()
    sys.settrace(trace)
    try:
        pieces, size = [], 0
        for piece in compiled.generate(**variables):  # piece by piece: the output is bounded as it grows
            size += len(piece)
            if size > max_chars:
                raise OverflowError(f"the rendered prompt passed {max_chars} characters")
            pieces.append(piece)
        return "".join(pieces)
    finally:
        sys.settrace(previous)


def render_chat_template(
    template: str,
    messages: Sequence[dict[str, Any]],
    add_generation_prompt: bool = True,
    bos_token: str = "",
    eos_token: str = "",
    **extra: Any,
) -> str:
    try:
        import jinja2
    except ImportError as exc:  # pragma: no cover - jinja2 is a dependency
        raise SparrowError("chat templates need jinja2 (pip install jinja2)") from exc

    def raise_exception(message: str) -> None:
        raise SparrowError(f"chat template: {message}")

    def strftime_now(fmt: str) -> str:
        return datetime.datetime.now().strftime(fmt)

    env = _sandbox_class()(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = strftime_now
    try:
        compiled = env.from_string(template)
        # a template adds markup around the messages: far less than this bound
        max_chars = MIN_OUTPUT_CHARS + 4 * sum(len(str(m.get("content", ""))) for m in messages if isinstance(m, dict))
        return _render_with_deadline(compiled, RENDER_SECONDS, max_chars, messages=list(messages),
                                     add_generation_prompt=add_generation_prompt, bos_token=bos_token,
                                     eos_token=eos_token, **extra)
    except SparrowError:
        raise
    except _RenderTimeout:
        raise SparrowError(f"chat template failed: it ran for more than {RENDER_SECONDS:g} s") from None
    except jinja2.TemplateError as exc:
        raise SparrowError(f"chat template failed: {exc}") from exc
    except Exception as exc:  # anything a broken template raises inside its code (RecursionError too)
        raise SparrowError(f"chat template failed: {type(exc).__name__}: {exc}") from exc
