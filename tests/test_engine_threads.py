"""An Engine shared by Python threads: generations take turns, never corrupt each other.

Before, 16 threads generating on one Engine crashed the process (a segfault, a hang, or heap
corruption): they raced on its one context. The runtime now refuses a second call into a busy
context (tests/cpp/test_threads.cpp) and the Engine serializes its generations.
"""
import threading
from pathlib import Path

import pytest

import sparrow_py as sp
from sparrow_py.errors import SparrowError

DEMO = Path(sp.__file__).parent / "demo" / "data"
QUESTIONS = ["What happens in this clip?", "Describe the video.", "Which shapes move?", "Tell me about colours."]


def prompt(i):
    return f"<|im_start|>user\n{QUESTIONS[i % len(QUESTIONS)]}<|im_end|>\n<|im_start|>assistant\n"


def job_kwargs(i):
    mode = ("none", "chain", "tree")[i % 3]
    sampled = i % 4 == 3  # sampled jobs decode plainly: with a fixed seed their draws do not depend on timing
    return dict(max_tokens=24, speculative="none" if sampled else mode, temperature=0.9 if sampled else 0.0,
                seed=11 + i, add_special=False)


@pytest.fixture(scope="module")
def engine():
    with sp.Engine(str(DEMO / "target.gguf"), draft=str(DEMO / "draft.gguf"), n_ctx=512, n_threads=2) as e:
        yield e


@pytest.fixture(scope="module")
def expected(engine):
    out = []  # (text, tokens) of each job, generated alone
    for i in range(8):
        text = "".join(engine.generate(prompt(i), **job_kwargs(i)))
        out.append((text, list(engine.last_tokens)))
    return out


def test_threads_sharing_an_engine_get_their_own_outputs(engine, expected):
    results, errors = {}, []

    def worker(w):
        try:
            for r in range(3):
                i = (w + r) % len(expected)
                results[(w, r)] = (i, "".join(engine.generate(prompt(i), **job_kwargs(i))))
                engine.last_stats  # a context call from a thread with no open generation waits its turn too
        except Exception as e:  # noqa: BLE001 - collected and reported below
            errors.append(repr(e))

    threads = [threading.Thread(target=worker, args=(w,)) for w in range(12)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=600)
    assert not any(t.is_alive() for t in threads), "a generation never finished"
    assert not errors, errors
    assert len(results) == 36
    for i, text in results.values():
        assert text == expected[i][0], f"job {i}"


def test_a_second_generate_on_the_same_thread_supersedes_the_first(engine, expected):
    first = engine.generate(prompt(1), **job_kwargs(1))
    next(first)
    "".join(engine.generate(prompt(2), **job_kwargs(2)))
    assert engine.last_tokens == expected[2][1]
    with pytest.raises(SparrowError, match="superseded"):
        next(first)
    "".join(engine.generate(prompt(0), **job_kwargs(0)))  # the Engine is free again
    assert engine.last_tokens == expected[0][1]


def test_other_threads_wait_for_an_open_generation(engine, expected):
    stream = engine.generate(prompt(4), **job_kwargs(4))
    next(stream)
    done = threading.Event()

    def other():
        "".join(engine.generate(prompt(5), **job_kwargs(5)))
        done.set()

    t = threading.Thread(target=other)
    t.start()
    assert not done.wait(0.5), "another thread generated while this thread's generation was open"
    rest = "".join(stream)  # this thread's generation is untouched, and ends its turn
    assert rest is not None and engine.last_tokens == expected[4][1]
    t.join(timeout=120)
    assert done.is_set()


def test_an_abandoned_stream_frees_the_engine(engine, expected):
    stream = engine.generate(prompt(6), **job_kwargs(6))
    next(stream)
    del stream  # collected: its turn ends
    out = []
    t = threading.Thread(target=lambda: out.append("".join(engine.generate(prompt(7), **job_kwargs(7)))))
    t.start()
    t.join(timeout=120)
    assert out, "the abandoned stream kept the Engine"


def test_close_while_another_thread_generates():
    e = sp.Engine(str(DEMO / "target.gguf"), draft=str(DEMO / "draft.gguf"), n_ctx=512, n_threads=1)
    started, proceed, errors = threading.Event(), threading.Event(), []

    def generation():
        try:
            for _ in e.generate(prompt(0), max_tokens=200, ignore_eos=True, add_special=False):
                started.set()
                proceed.wait(60)
        except SparrowError as err:
            errors.append(str(err))

    t = threading.Thread(target=generation)
    t.start()
    assert started.wait(60)
    e.close()  # the generation's thread is between steps: its next step stops with an error
    proceed.set()
    t.join(timeout=60)
    assert not t.is_alive()
    assert errors and "closed" in errors[0]
