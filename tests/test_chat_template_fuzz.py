"""Chat templates come from model files, so they are untrusted: hostile ones (loops that never end,
repetitions that take the memory, recursion) and broken ones (random mutations of real templates)
must end in a SparrowError, quickly, and leave the Engine working."""
from __future__ import annotations

import random
import time
from pathlib import Path

import pytest

import sparrow_py as sp
from sparrow_py.chat import RENDER_SECONDS, render_chat_template
from sparrow_py.errors import SparrowError

from conftest import CHATML_TEMPLATE
from gguf_edit import copy_gguf

DEMO = Path(sp.__file__).parent / "demo" / "data"
MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Describe the clip."},
            {"role": "assistant", "content": "A red square."}, {"role": "user", "content": "And then?"}]

HOSTILE = {
    "nested loops": "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}",
    "huge repetition": "{{ 'x' * 10**10 }}",
    "huge list repetition": "{{ ([1] * 100000) * 100000 }}",
    "huge power": "{{ 7 ** 123456789 }}",
    "output explosion": "{% for i in range(100000) %}{{ 'x' * 100000 }}{% endfor %}",
    "recursion": "{% macro f(n) %}{{ f(n + 1) }}{% endmacro %}{{ f(0) }}",
    "division by zero": "{{ 1 / 0 }}",
    "missing message": "{{ messages[99]['content'] }}",
    "unsafe attribute": "{{ messages.__class__.__mro__[1].__subclasses__() }}",
    "mutation": "{% set x = [] %}{{ x.append(1) }}",
    "raise_exception": "{{ raise_exception('this model has no system role') }}",
    "syntax error": "{% for m in messages %}{{ m.content }",
    "bad type": "{{ messages + 1 }}",
}


@pytest.mark.parametrize("name", sorted(HOSTILE))
def test_a_hostile_template_is_refused_in_bounded_time(name):
    t0 = time.monotonic()
    with pytest.raises(SparrowError, match="chat template"):
        render_chat_template(HOSTILE[name], MESSAGES)
    # the deadline (or an earlier bound) stopped it: a hang would be minutes
    assert time.monotonic() - t0 < RENDER_SECONDS + 3


def test_a_real_template_renders_as_before():
    got = render_chat_template(CHATML_TEMPLATE, MESSAGES)
    want = "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in MESSAGES) + "<|im_start|>assistant\n"
    assert got == want


# pieces of Jinja syntax the mutations insert, so that many mutants still parse and run
_SNIPPETS = ["{{", "}}", "{%", "%}", "{% for m in messages %}", "{% endfor %}", "{% if ", "{% endif %}", "'", '"',
             "messages", "[0]", "['role']", ".content", " + ", " * 3", "loop.index", "|length", "|join(',')",
             "range(5)", "}", "{", "%", "(", ")", "raise_exception('x')", "bos_token", "{% set x = 1 %}", "\n"]


def _mutate(template: str, rng: random.Random) -> str:
    for _ in range(rng.randint(1, 4)):
        i = rng.randrange(len(template) + 1)
        choice = rng.random()
        if choice < 0.35 and template:                         # delete a span
            template = template[:i] + template[i + rng.randint(1, 8):]
        elif choice < 0.8:                                     # insert Jinja syntax
            template = template[:i] + rng.choice(_SNIPPETS) + template[i:]
        else:                                                  # duplicate a span
            j = min(len(template), i + rng.randint(1, 40))
            template = template[:j] + template[i:j] + template[j:]
    return template


def test_mutated_real_templates_render_or_fail_cleanly():
    """Mutants of the chatml template and of the demo model's own template: each renders to a string
    or raises SparrowError, never anything else."""
    with sp.Engine(str(DEMO / "target.gguf"), vocab_only=True) as e:
        demo_template = e.metadata("tokenizer.chat_template")
    assert demo_template
    rng = random.Random(1234)
    outcomes = {"rendered": 0, "refused": 0}
    for source in (CHATML_TEMPLATE, demo_template):
        for _ in range(150):
            mutant = _mutate(source, rng)
            try:
                out = render_chat_template(mutant, MESSAGES, bos_token="<s>", eos_token="</s>")
            except SparrowError:
                outcomes["refused"] += 1
                continue
            assert isinstance(out, str)
            outcomes["rendered"] += 1
    assert outcomes["rendered"] > 20 and outcomes["refused"] > 20, outcomes  # both paths exercised


def test_an_engine_with_a_hostile_template_refuses_chat_and_keeps_working(tmp_path):
    path = tmp_path / "hostile.gguf"
    copy_gguf(DEMO / "target.gguf", path, replace_kv={"tokenizer.chat_template": HOSTILE["nested loops"]})
    with sp.Engine(str(path), n_ctx=256, n_threads=1) as e:
        with pytest.raises(SparrowError, match=f"more than {RENDER_SECONDS:g} s"):
            "".join(e.chat([{"role": "user", "content": "hi"}], max_tokens=4))
        # the Engine is usable afterwards: plain prompts still generate
        assert len("".join(e.generate("A red square", max_tokens=4, ignore_eos=True))) > 0
