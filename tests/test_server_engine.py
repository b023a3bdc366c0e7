"""What the server needs from the Engine: Engines sharing one loaded model (share()), the abort
callback, and a chat prompt built from encodings made earlier (encode_visuals + chat_prompt).
Checked against a single Engine doing the same work alone."""
from __future__ import annotations

import threading

import numpy as np
import pytest

import sparrow_py as sp
from sparrow_py.demo import demo_models, synthetic, video_question

MODELS = demo_models()
CLIP = np.load(MODELS.clip)


def _engine(**kw):
    return sp.Engine(str(MODELS.target), mmproj=str(MODELS.mmproj), draft=str(MODELS.draft), n_ctx=512, n_threads=1,
                     **kw)


def _caption(engine, prompt, **kw):
    text = "".join(engine.chat(video_question(prompt), video=CLIP, max_pixels=MODELS.max_pixels, max_tokens=40, **kw))
    return text, list(engine.last_tokens)


def test_shared_engines_run_in_parallel_as_one_would_alone():
    with _engine() as base:
        want = {p: _caption(base, p, speculative="none") for p in synthetic.PROMPTS}
        shared = [base.share(n_ctx=512, n_threads=1) for _ in range(2)]
        try:
            assert all(e._model == base._model and e._draft == base._draft and e._vision is base._vision
                       for e in shared), "the weights were loaded again"
            got: dict = {}

            def run(engine, prompt):
                got[prompt] = _caption(engine, prompt)  # speculative (chain): the same tokens as plain

            threads = [threading.Thread(target=run, args=(e, p)) for e, p in zip([base, *shared], synthetic.PROMPTS)]
            for t in threads:
                t.start()
            for t in threads:
                t.join(60)
            assert got == want
        finally:
            for e in shared:
                e.close()


def test_shared_files_stay_loaded_until_the_last_engine_closes():
    base = _engine()
    want = _caption(base, synthetic.PROMPTS[0])
    other = base.share(n_ctx=256, n_threads=1)
    weights = base._weights
    base.close()
    assert weights.model != sp._native.ffi.NULL
    assert _caption(other, synthetic.PROMPTS[0]) == want  # model, draft and vision file still there
    assert other.n_ctx == 256
    other.close()
    assert weights.model == sp._native.ffi.NULL and weights.draft == sp._native.ffi.NULL and weights.vision is None
    with pytest.raises(sp.SparrowError, match="closed"):
        base.share()


def test_abort_callback_stops_prefill_and_the_engine_stays_usable():
    calls = {"n": 0, "stop_at": None}

    def abort():
        calls["n"] += 1
        return calls["stop_at"] is not None and calls["n"] >= calls["stop_at"]

    with _engine(abort=abort) as engine:
        want = _caption(engine, synthetic.PROMPTS[1])
        assert calls["n"] > 0, "the runtime never asked the abort callback"
        calls.update(n=0, stop_at=2)  # stop inside the video prompt's prefill
        with pytest.raises(sp.SparrowError) as info:
            _caption(engine, synthetic.PROMPTS[1])
        assert info.value.status == "SPARROW_ERR_ABORTED"
        calls["stop_at"] = None
        assert _caption(engine, synthetic.PROMPTS[1]) == want


def test_an_abort_callback_that_raises_stops_the_generation():
    def abort():
        raise RuntimeError("boom")

    with sp.Engine(str(MODELS.target), n_ctx=256, n_threads=1, abort=abort) as engine:
        with pytest.raises(sp.SparrowError) as info:
            "".join(engine.generate("Describe the video.", max_tokens=4))
        assert info.value.status == "SPARROW_ERR_ABORTED"


def test_chat_prompt_from_earlier_encodings_equals_chat():
    with _engine() as engine:
        want = _caption(engine, synthetic.PROMPTS[2], speculative="none")
        visuals = engine.encode_visuals(video=CLIP, max_pixels=MODELS.max_pixels)
        assert [kind for kind, _ in visuals] == ["video"]
        for _ in range(2):  # the encoding is reusable
            tokens, media = engine.chat_prompt(video_question(synthetic.PROMPTS[2]), visuals)
            assert tokens.count(sp.MEDIA_TOKEN) == len(visuals[0][1].embd) and media == [visuals[0][1]]
            text = "".join(engine.generate(tokens, media=media, max_tokens=40, speculative="none"))
            assert (text, engine.last_tokens) == want
        text_only, media = engine.chat_prompt([{"role": "user", "content": "Hi"}])
        assert media == [] and sp.MEDIA_TOKEN not in text_only
