"""Chat templates: render a model's Jinja2 template (tokenizer.chat_template) for a message list.

Templates are untrusted input (they come from model files), so they run in Jinja2's immutable
sandbox with only the helpers Hugging Face templates expect.
"""
from __future__ import annotations

import datetime
from typing import Any, Sequence

from sparrow_py.errors import SparrowError


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
        from jinja2.sandbox import ImmutableSandboxedEnvironment
    except ImportError as exc:  # pragma: no cover - jinja2 is a dependency
        raise SparrowError("chat templates need jinja2 (pip install jinja2)") from exc

    def raise_exception(message: str) -> None:
        raise SparrowError(f"chat template: {message}")

    def strftime_now(fmt: str) -> str:
        return datetime.datetime.now().strftime(fmt)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = strftime_now
    try:
        compiled = env.from_string(template)
        return compiled.render(
            messages=list(messages),
            add_generation_prompt=add_generation_prompt,
            bos_token=bos_token,
            eos_token=eos_token,
            **extra,
        )
    except jinja2.TemplateError as exc:
        raise SparrowError(f"chat template failed: {exc}") from exc
