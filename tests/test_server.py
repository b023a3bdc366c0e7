"""`sparrow serve` (sparrow_py.server) through the `openai` client, on loopback.

The served model is the shipped demo (a tiny Qwen2-VL style video LLM, its vision file and its
Sparrow draft), so nothing is built or downloaded. References are computed in this process by an
Engine without a draft on the same files: the server's greedy text (speculative on) must equal the
Engine's plain text for the same messages, video or image, and the server's numbers must add up
with the Engine's. Every network wait has a timeout, so that nothing can hang.
"""
from __future__ import annotations

import base64
import io
import json
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx  # the test extra installs the client and the server stack: a missing one fails, never skips
import numpy as np
import openai
import pytest

import sparrow_py as sp
from sparrow_py.demo import demo_models, synthetic, video_question
from sparrow_py.server import BackgroundServer, ServerConfig
from sparrow_py.server.protocol import Sampling

API_KEY = "test-key"
TIMEOUT_S = 30.0
MODELS = demo_models()
MAX_PIXELS = MODELS.max_pixels
CLIP = np.load(MODELS.clip)


# ---- fixtures -------------------------------------------------------------------------------

@pytest.fixture(scope="module", autouse=True)
def no_proxies():
    """Loopback requests go straight to the server, whatever proxy the environment names."""
    with pytest.MonkeyPatch.context() as mp:
        for name in ("http_proxy", "https_proxy", "all_proxy", "HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY"):
            mp.delenv(name, raising=False)
        yield


def _npy_uri(array: np.ndarray) -> str:
    buf = io.BytesIO()
    np.save(buf, array)
    return "data:application/x-npy;base64," + base64.b64encode(buf.getvalue()).decode()


def _png_uri(image: np.ndarray) -> str:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _write_mp4(frames: np.ndarray, path: Path, rate: int = 4) -> Path:
    import av

    with av.open(str(path), "w", format="mp4") as container:
        stream = container.add_stream("mpeg4", rate=rate)
        stream.height, stream.width = frames.shape[1:3]
        stream.pix_fmt = "yuv420p"
        for frame in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


@pytest.fixture(scope="module")
def media_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("media")
    _write_mp4(CLIP, root / "clip.mp4")
    (root / "not-a-video.mp4").write_bytes(b"this is not a video file at all" * 10)
    # 448 x 448 frames: 256 visual tokens per frame pair at a 448 x 448 pixel budget
    _write_mp4(np.repeat(np.repeat(CLIP, 4, axis=1), 4, axis=2), root / "large.mp4")
    np.save(root / "clip.npy", CLIP)
    return root


@pytest.fixture(scope="module")
def reference():
    """The Engine the server's outputs are checked against: same files, no draft."""
    with sp.Engine(str(MODELS.target), mmproj=str(MODELS.mmproj), n_ctx=1024, n_threads=1) as engine:
        yield engine


@pytest.fixture(scope="module")
def server(media_dir):
    """Speculative (the demo draft), 2 slots, an API key, media under media_dir, a 1 MiB upload limit."""
    config = ServerConfig(model=str(MODELS.target), mmproj=str(MODELS.mmproj), draft=str(MODELS.draft), port=0,
                          api_key=API_KEY, parallel=2, ctx_size=2048, threads=1, queue_size=8,
                          media_path=str(media_dir), max_upload_mb=1.0)
    with BackgroundServer(config) as s:
        yield s


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key=API_KEY, max_retries=0, timeout=TIMEOUT_S)


MODEL = "target.gguf"


def _chat(client, messages, **kw):
    return client.chat.completions.create(model=MODEL, messages=messages, **kw)


def _streamed(client, messages, **kw):
    """(text, the last chunk) of a streamed chat."""
    pieces, last = [], None
    for chunk in _chat(client, messages, stream=True, **kw):
        if chunk.choices and chunk.choices[0].delta.content:
            pieces.append(chunk.choices[0].delta.content)
        last = chunk
    return "".join(pieces), last


def _reference_chat(engine, messages, **kw) -> tuple[str, list]:
    text = "".join(engine.chat(messages, **kw))
    return text, list(engine.last_tokens)


def _timings(response) -> dict:
    return response.model_extra["timings"]


DRAFT_EVERY_ROUND = {"adaptive": False}  # adaptive speculation may decode a short reply plainly


def _check_numbers(response, n_generated: int, speculative: bool = False) -> None:
    """usage and timings agree with each other and with the reference's token count (and with
    speculative, the draft proposed tokens)."""
    t, u = _timings(response), response.usage
    assert u.completion_tokens == n_generated == t["predicted_n"]
    assert u.prompt_tokens == t["prompt_n"] + t["cache_n"] and u.total_tokens == u.prompt_tokens + u.completion_tokens
    assert t["prompt_ms"] >= 0 and t["predicted_ms"] >= 0 and t["predicted_per_second"] >= 0
    assert 0 <= t["draft_n_accepted"] <= t["draft_n"]
    if speculative:
        assert t["draft_n"] > 0, "the draft was not used"


# ---- the API --------------------------------------------------------------------------------

def test_models_health_and_slots(server, client):
    models = client.models.list()
    assert [m.id for m in models.data] == [MODEL]
    meta = models.data[0].model_extra["meta"]
    assert meta["vision"] and meta["draft"] and meta["n_slots"] == 2 and meta["n_ctx_slot"] == 1024
    health = httpx.get(server.url + "/health", timeout=TIMEOUT_S)  # no key needed
    assert health.status_code == 200 and health.json()["status"] == "ok"
    slots = httpx.get(server.url + "/slots", headers={"Authorization": f"Bearer {API_KEY}"}, timeout=TIMEOUT_S)
    assert [s["id"] for s in slots.json()] == [0, 1]


@pytest.mark.parametrize("prompt", synthetic.PROMPTS[:2])
def test_text_chat_equals_the_engine(client, reference, prompt):
    """Greedy, speculative on the server, plain in the reference: the same text, both ways of
    responding, and the numbers add up."""
    messages = [{"role": "system", "content": "You caption videos."}, {"role": "user", "content": prompt}]
    want, want_tokens = _reference_chat(reference, messages, max_tokens=24)
    r = _chat(client, messages, max_tokens=24, temperature=0, extra_body=DRAFT_EVERY_ROUND)
    assert r.choices[0].message.content == want
    assert r.choices[0].finish_reason == ("length" if len(want_tokens) == 24 else "stop")
    _check_numbers(r, len(want_tokens), speculative=True)
    text, last = _streamed(client, messages, max_tokens=24, temperature=0, extra_body=DRAFT_EVERY_ROUND)
    assert text == want
    assert last.choices[0].finish_reason == r.choices[0].finish_reason
    _check_numbers(last, len(want_tokens), speculative=True)  # usage and timings ride on the last chunk
    text, _ = _streamed(client, messages, max_tokens=24, extra_body={"speculative": "tree"})
    assert text == want


def test_text_parts_list_is_the_same_as_a_string(client):
    a = _chat(client, [{"role": "user", "content": "Describe the video."}], max_tokens=12)
    b = _chat(client, [{"role": "user", "content": [{"type": "text", "text": "Describe "},
                                                     {"type": "text", "text": "the video."}]}], max_tokens=12)
    assert a.choices[0].message.content == b.choices[0].message.content


def test_completions_equal_the_engine(client, reference):
    prompt = "<|im_start|>user\nWhat happens in this clip?<|im_end|>\n<|im_start|>assistant\n"
    want = "".join(reference.generate(prompt, max_tokens=20))
    n = len(reference.last_tokens)
    r = client.completions.create(model=MODEL, prompt=prompt, max_tokens=20)
    assert r.choices[0].text == want
    _check_numbers(r, n)
    streamed = client.completions.create(model=MODEL, prompt=prompt, max_tokens=20, stream=True)
    chunks = list(streamed)
    assert "".join(c.choices[0].text for c in chunks if c.choices) == want
    assert chunks[-1].model_extra["timings"]["predicted_n"] == n
    # token ids as the prompt
    ids = reference.tokenize(prompt)
    r = client.completions.create(model=MODEL, prompt=ids, max_tokens=20)
    assert r.choices[0].text == want


def test_sampling_parameters_reach_the_runtime(client, reference):
    """Seeded sampling with every filter, and stop strings: the same tokens as the Engine given
    the same values (speculation off for the sampled case: speculative sampling keeps the
    distribution, not the random stream)."""
    messages = [{"role": "user", "content": "Caption this video briefly."}]
    kw = dict(temperature=0.9, top_p=0.9, seed=1234, max_tokens=24)
    want, _ = _reference_chat(reference, messages, top_k=20, min_p=0.02, **kw)
    r = _chat(client, messages, extra_body={"top_k": 20, "min_p": 0.02, "speculative": "none"}, **kw)
    assert r.choices[0].message.content == want
    greedy, _ = _reference_chat(reference, messages, max_tokens=24)
    stop = greedy.split()[2]
    want_stop, _ = _reference_chat(reference, messages, max_tokens=24, stop=[stop])
    r = _chat(client, messages, max_tokens=24, stop=[stop])
    assert r.choices[0].message.content == want_stop and r.choices[0].finish_reason == "stop"
    assert stop not in r.choices[0].message.content


# ---- images and videos ------------------------------------------------------------------------

def _video_messages(part: dict, prompt: str = synthetic.PROMPTS[0]) -> list:
    return [{"role": "user", "content": [part, {"type": "text", "text": prompt}]}]


def test_video_chat_equals_the_engine_and_reuses_the_encoding(server, client, reference):
    """A video sent inline (a .npy array) and asked about twice: the text is the Engine's (plain
    decoding, the frames given directly), streamed and not; the second question finds the
    encoding in the cache and the video's rows in its slot's KV cache, as does a third, other
    question about it."""
    want, tokens = _reference_chat(reference, video_question(synthetic.PROMPTS[0]), video=CLIP, max_pixels=MAX_PIXELS,
                                   max_tokens=48)
    part = {"type": "video_url", "video_url": {"url": _npy_uri(CLIP), "max_pixels": MAX_PIXELS}}
    first = _chat(client, _video_messages(part), max_tokens=48, extra_body=DRAFT_EVERY_ROUND)
    assert first.choices[0].message.content == want
    _check_numbers(first, len(tokens), speculative=True)
    assert _timings(first)["media_n"] == 1
    text, last = _streamed(client, _video_messages(part), max_tokens=48, extra_body=DRAFT_EVERY_ROUND)
    assert text == want
    _check_numbers(last, len(tokens), speculative=True)
    assert _timings(last)["media_n"] == 1 and _timings(last)["media_cached"] == 1
    assert last.usage.prompt_tokens == first.usage.prompt_tokens > 64  # the 64 visual tokens are in the prompt
    # it went to the slot holding the video (routed by the video's reference), which kept its rows
    assert _timings(last)["cache_n"] >= 64
    # another question about the same video: its rows are kept too, the answer is the Engine's
    other, _ = _reference_chat(reference, video_question(synthetic.PROMPTS[1]), video=CLIP, max_pixels=MAX_PIXELS,
                               max_tokens=32)
    r = _chat(client, _video_messages(part, synthetic.PROMPTS[1]),
              max_tokens=32, extra_body=DRAFT_EVERY_ROUND)
    assert r.choices[0].message.content == other
    assert _timings(r)["cache_n"] >= 64, _timings(r)


def test_video_forms(client, reference, media_dir):
    """An mp4 file under --media-path (by path and by file:// URL), the same bytes inline as
    llama-server's input_video, and per-request frame options: each is what the Engine makes of
    the same file and options."""
    mp4 = media_dir / "clip.mp4"
    for options in ({}, {"num_frames": 4}):
        want, _ = _reference_chat(reference, video_question(synthetic.PROMPTS[1]), video=str(mp4),
                                  max_pixels=MAX_PIXELS, max_tokens=32, **options)
        data = base64.b64encode(mp4.read_bytes()).decode()
        parts = [{"type": "video_url", "video_url": {"url": "clip.mp4"}},
                 {"type": "video_url", "video_url": {"url": mp4.as_uri()}},
                 {"type": "input_video", "input_video": {"data": data, "format": "mp4"}}]
        for part in parts:
            r = _chat(client, _video_messages(part, synthetic.PROMPTS[1]), max_tokens=32,
                      extra_body={"max_pixels": MAX_PIXELS, **options})
            assert r.choices[0].message.content == want, part["type"]


def test_image_chat_equals_the_engine(client, reference):
    image = CLIP[3]
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe the video."}]}]
    want, tokens = _reference_chat(reference, messages, images=[image], max_pixels=MAX_PIXELS, max_tokens=24)
    part = {"type": "image_url", "image_url": {"url": _png_uri(image)}}
    r = _chat(client, _video_messages(part), max_tokens=24, extra_body={"max_pixels": MAX_PIXELS})
    assert r.choices[0].message.content == want
    _check_numbers(r, len(tokens))


@pytest.mark.parametrize("speculative", ["none", "chain"])
def test_kv_prefix_is_reused_for_a_follow_up(client, reference, speculative):
    """A follow-up question in a conversation (text, with the draft or without) prefills only the
    new turn, and answers as a fresh Engine does."""
    first = [{"role": "user", "content": "Describe the video."}]
    r1 = _chat(client, first, max_tokens=16, extra_body={"speculative": speculative})
    follow = first + [{"role": "assistant", "content": r1.choices[0].message.content},
                      {"role": "user", "content": "What happens in this clip?"}]
    r2 = _chat(client, follow, max_tokens=16, extra_body={"speculative": speculative})
    want, _ = _reference_chat(reference, follow, max_tokens=16)
    assert r2.choices[0].message.content == want
    t = _timings(r2)
    assert t["cache_n"] >= r1.usage.prompt_tokens, "the first turn was prefilled again"
    assert t["prompt_n"] < r2.usage.prompt_tokens - r1.usage.prompt_tokens + 8


# ---- concurrency --------------------------------------------------------------------------------

def test_concurrent_clients_get_their_own_answers(server, client, reference):
    """8 requests from 4 threads over 2 slots, videos and text, streamed and not: each gets the
    Engine's answer to its own question, within the time bound."""
    clips = {seed: synthetic.clip(seed).frames for seed in (11, 12)}
    jobs = []
    for i in range(8):
        seed = 11 + i % 2
        if i % 4 < 2:
            messages = video_question(synthetic.PROMPTS[i % 3])
            want, _ = _reference_chat(reference, messages, video=clips[seed], max_pixels=MAX_PIXELS, max_tokens=32)
            part = {"type": "video_url", "video_url": {"url": _npy_uri(clips[seed])}}
            jobs.append((_video_messages(part, synthetic.PROMPTS[i % 3]), want, i % 2 == 0))
        else:
            messages = [{"role": "user", "content": synthetic.PROMPTS[i % 3] + f" ({i})"}]
            jobs.append((messages, _reference_chat(reference, messages, max_tokens=32)[0], i % 2 == 0))
    results: dict = {}

    def worker(k: int) -> None:
        for j in range(k, len(jobs), 4):
            messages, _, stream = jobs[j]
            try:
                if stream:
                    results[j] = _streamed(client, messages, max_tokens=32, extra_body={"max_pixels": MAX_PIXELS})[0]
                else:
                    r = _chat(client, messages, max_tokens=32, extra_body={"max_pixels": MAX_PIXELS})
                    results[j] = r.choices[0].message.content
            except Exception as e:  # noqa: BLE001 - reported by the assertion below
                results[j] = e

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(4)]
    t0 = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join(TIMEOUT_S)
    assert not any(t.is_alive() for t in threads), "concurrent requests did not finish in time"
    assert time.monotonic() - t0 < TIMEOUT_S
    for j, (_, want, _) in enumerate(jobs):
        assert results.get(j) == want, (j, results.get(j))
    slots = httpx.get(server.url + "/slots", headers={"Authorization": f"Bearer {API_KEY}"}, timeout=TIMEOUT_S).json()
    assert all(not s["is_processing"] for s in slots) and all(s["n_served"] > 0 for s in slots)


@pytest.fixture(scope="module")
def busy_server():
    """One slot with a long context (long generations to cancel), a queue of one."""
    config = ServerConfig(model=str(MODELS.target), port=0, parallel=1, ctx_size=16384, threads=1, queue_size=1,
                          sampling=Sampling(speculative="none"))
    with BackgroundServer(config) as s:
        yield s


LONG = {"model": MODEL, "messages": [{"role": "user", "content": "Describe the video."}], "max_tokens": 16000,
        "ignore_eos": True}


def _slot0(server) -> dict:
    return httpx.get(server.url + "/slots", timeout=TIMEOUT_S).json()[0]


def _wait_for(predicate, what: str, timeout_s: float = 10.0):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


def test_queue_bound_and_cancellation_when_streaming(busy_server):
    """A long streamed generation holds the one slot; the next request waits in the queue, the one
    after is refused with 503; the first client disconnects: its generation stops (the slot is
    free long before 16000 tokens), and the waiting request is served."""
    c = openai.OpenAI(base_url=busy_server.url + "/v1", api_key="none", max_retries=0, timeout=TIMEOUT_S)
    cancelled_before = _slot0(busy_server)["n_cancelled"]
    with httpx.Client(timeout=TIMEOUT_S) as http:
        with http.stream("POST", busy_server.url + "/v1/chat/completions", json={**LONG, "stream": True}) as long:
            assert long.status_code == 200
            lines = long.iter_lines()
            assert next(line for line in lines if line.startswith("data:"))  # generating now
            waiting: dict = {}
            queued = threading.Thread(target=lambda: waiting.update(r=_chat(c, [{"role": "user", "content": "Hi"}],
                                                                               max_tokens=8)))
            queued.start()
            _wait_for(lambda: httpx.get(busy_server.url + "/health", timeout=TIMEOUT_S).json()["requests_waiting"] == 1,
                      "the request to wait in the queue")
            with pytest.raises(openai.APIStatusError) as refused:
                _chat(c, [{"role": "user", "content": "Hi"}], max_tokens=8)
            assert refused.value.status_code == 503
            assert refused.value.body["type"] == "unavailable_error"
            assert _slot0(busy_server)["is_processing"]
        # the stream is closed: the client is gone
    queued.join(TIMEOUT_S)
    assert not queued.is_alive() and waiting["r"].choices[0].message.content is not None
    slot = _wait_for(lambda: (lambda s: s if not s["is_processing"] else None)(_slot0(busy_server)),
                     "the slot to be free")
    assert slot["n_cancelled"] == cancelled_before + 1
    assert slot["last_finish_reason"] in ("length", "eog")  # the queued request, served after the cancellation


def test_cancellation_stops_the_runtime(busy_server):
    """A client that gives up on a long non-streamed request: the generation stops midway."""
    c = openai.OpenAI(base_url=busy_server.url + "/v1", api_key="none", max_retries=0, timeout=0.5)
    with pytest.raises(openai.APITimeoutError):
        c.chat.completions.create(model=MODEL, messages=LONG["messages"], max_tokens=LONG["max_tokens"],
                                  extra_body={"ignore_eos": True})
    slot = _wait_for(lambda: (lambda s: s if not s["is_processing"] else None)(_slot0(busy_server)), "the slot to be free")
    assert slot["last_finish_reason"] == "cancelled"
    assert 0 < slot["last_n_generated"] < 16000
    # and a streamed one, cancelled by closing the connection
    with httpx.Client(timeout=TIMEOUT_S) as http:
        with http.stream("POST", busy_server.url + "/v1/chat/completions", json={**LONG, "stream": True}) as long:
            next(line for line in long.iter_lines() if line.startswith("data:"))
    slot = _wait_for(lambda: (lambda s: s if not s["is_processing"] else None)(_slot0(busy_server)), "the slot to be free")
    assert slot["last_finish_reason"] == "cancelled" and slot["last_n_generated"] < 16000
    # the server keeps serving
    ok = openai.OpenAI(base_url=busy_server.url + "/v1", api_key="none", max_retries=0, timeout=TIMEOUT_S)
    assert _chat(ok, [{"role": "user", "content": "Hi"}], max_tokens=4).usage.completion_tokens <= 4


# ---- bad input ------------------------------------------------------------------------------------

def _post(server, body, key=API_KEY, path="/v1/chat/completions", raw=None):
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    if raw is not None:
        headers["Content-Type"] = "application/json"
        return httpx.post(server.url + path, content=raw, headers=headers, timeout=TIMEOUT_S)
    return httpx.post(server.url + path, json=body, headers=headers, timeout=TIMEOUT_S)


def _error(response, status: int, type_: str = None) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["code"] == status and error["message"]
    if type_:
        assert error["type"] == type_
    return error


def test_bad_requests_get_error_objects(server, client, media_dir):
    hi = [{"role": "user", "content": "Hi"}]
    _error(_post(server, None, raw=b'{"messages": [}'), 400, "invalid_request_error")
    _error(_post(server, None, raw=b"\xff\xfe not json"), 400)
    _error(_post(server, None, raw=b"[1, 2]"), 400)
    _error(_post(server, {"model": MODEL}), 400)                      # no messages
    assert _error(_post(server, {"messages": hi, "temperature": "hot"}), 400)["param"] == "temperature"
    assert _error(_post(server, {"messages": hi, "n": 2}), 400)["param"] == "n"
    assert _error(_post(server, {"messages": hi, "draft_p_min": 1.5}), 400)["param"] == "draft_p_min"
    _error(_post(server, {"messages": [{"role": "user", "content": [{"type": "audio"}]}]}), 400)
    _error(_post(server, {"prompt": ""}, path="/v1/completions"), 400)
    _error(_post(server, {"prompt": [10 ** 6]}, path="/v1/completions"), 400)
    # model, key
    with pytest.raises(openai.NotFoundError) as e:
        client.chat.completions.create(model="gpt-4o", messages=hi)
    assert e.value.body["param"] == "model"
    _error(_post(server, {"messages": hi}, key=None), 401, "authentication_error")
    _error(_post(server, {"messages": hi}, key="wrong"), 401, "authentication_error")
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=server.url + "/v1", api_key="wrong", max_retries=0, timeout=TIMEOUT_S).models.list()
    # a prompt longer than a slot's context (1024 tokens)
    long = [{"role": "user", "content": "frames patches " * 1200}]
    _error(_post(server, {"messages": long}), 400, "exceed_context_size_error")
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model=MODEL, prompt="frames patches " * 1200)
    # media: unreadable, over the size limit, remote, outside --media-path, missing
    def video(url):
        return {"messages": _video_messages({"type": "video_url", "video_url": {"url": url}})}

    _error(_post(server, video("not-a-video.mp4")), 400)
    junk = "data:video/mp4;base64," + base64.b64encode(b"\x00junk" * 100).decode()
    _error(_post(server, video(junk)), 400)
    _error(_post(server, video("data:video/mp4;base64,@@@not base64@@@")), 400)
    big = "data:application/x-npy;base64," + "A" * (2 * 1024 * 1024)
    _error(_post(server, video(big)), 413)
    _error(_post(server, video("https://example.com/clip.mp4")), 400)
    _error(_post(server, video("../outside.mp4")), 403, "permission_error")
    _error(_post(server, video("/etc/passwd")), 403, "permission_error")
    _error(_post(server, video("missing.mp4")), 400)
    # a video prompt longer than the context: known only once the video is encoded
    large = video("large.mp4")
    large.update(num_frames=8, max_pixels=448 * 448)
    _error(_post(server, large), 400, "exceed_context_size_error")
    _error(_post(server, {"messages": _video_messages({"type": "video_url", "video_url": {"url": _npy_uri(CLIP)},
                                                       "num_frames": 0})}), 400)
    # routes and methods
    _error(httpx.get(server.url + "/v1/nothing", timeout=TIMEOUT_S), 404)
    _error(httpx.get(server.url + "/v1/chat/completions", timeout=TIMEOUT_S), 405)
    # and the server keeps serving
    assert _chat(client, hi, max_tokens=4).choices[0].message.content is not None
    assert httpx.get(server.url + "/health", timeout=TIMEOUT_S).json()["slots_processing"] == 0


def test_media_needs_a_vision_file_and_speculation_a_draft(busy_server):
    """The busy server has neither --mmproj nor --draft."""
    url = busy_server.url
    body = {"messages": _video_messages({"type": "video_url", "video_url": {"url": _npy_uri(CLIP)}})}
    _error(_post(busy_server, body, key=None), 400)
    _error(httpx.post(url + "/v1/chat/completions", json={"messages": [{"role": "user", "content": "Hi"}],
                                                          "speculative": "chain"}, timeout=TIMEOUT_S), 400)


# ---- the command line -------------------------------------------------------------------------------

def test_serve_command(media_dir, tmp_path):
    from sparrow_py.cli import main

    with pytest.raises(SystemExit) as e:
        main(["serve", "--help"])
    assert e.value.code == 0
    proc = subprocess.Popen([sys.executable, "-m", "sparrow_py.cli", "serve", "-m", str(MODELS.target), "--port", "0",
                             "-c", "2048", "-np", "2", "-t", "1", "--log-level", "warning"],
                            stderr=subprocess.PIPE, text=True, cwd=tmp_path)  # not the checkout: see conftest
    try:
        line = ""
        deadline = time.monotonic() + TIMEOUT_S
        while "http://" not in line and time.monotonic() < deadline:
            line = proc.stderr.readline()
            if not line and proc.poll() is not None:
                break
        found = re.search(r"http://[\w.:\[\]]+", line)
        assert found, line
        url = found.group(0)
        r = httpx.post(url + "/v1/chat/completions", json={"messages": [{"role": "user", "content": "Hi"}],
                                                           "max_tokens": 4}, timeout=TIMEOUT_S)
        assert r.status_code == 200 and json.loads(r.text)["usage"]["completion_tokens"] <= 4
    finally:
        proc.terminate()
        try:
            proc.wait(TIMEOUT_S)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(TIMEOUT_S)


def test_remote_media_is_fetched_only_when_allowed(tmp_path):
    """MediaLoader against a loopback HTTP server: refused by default; when allowed, fetched
    within the size limit."""
    import functools
    import http.server

    from sparrow_py.server.errors import ApiError
    from sparrow_py.server.media import MediaLoader, VisualRef

    (tmp_path / "frame.npy").write_bytes(b"x" * 1000)
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(tmp_path))
    handler.log_message = lambda *a: None
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        ref = VisualRef("image", f"http://127.0.0.1:{httpd.server_address[1]}/frame.npy")
        with pytest.raises(ApiError) as refused:
            MediaLoader(None, allow_remote=False, max_bytes=10_000).load(ref)
        assert refused.value.status == 400 and "--allow-remote-media" in refused.value.message
        item = MediaLoader(None, allow_remote=True, max_bytes=10_000).load(ref)
        assert item.data == b"x" * 1000 and item.suffix == ".npy"
        with pytest.raises(ApiError) as too_large:
            MediaLoader(None, allow_remote=True, max_bytes=999).load(ref)
        assert too_large.value.status == 413
        with pytest.raises(ApiError) as missing:
            MediaLoader(None, allow_remote=True, max_bytes=10_000).load(VisualRef("image", ref.url + ".gone"))
        assert missing.value.status == 400
    finally:
        httpd.shutdown()
        httpd.server_close()


def test_llava_onevision_video_through_the_server(tiny_llava_ov_dir, tmp_path):
    """The paper's headline family through the server: a tiny LLaVA-OneVision (SigLIP frames pooled 2x2,
    a newline, 1-D positions) with a Sparrow draft; the server's greedy speculative text about a video
    equals an Engine's plain text for the same messages and frames."""
    from sparrow_py.convert import convert, convert_mmproj

    from draft_util import make_draft

    from gguf_edit import copy_gguf

    lm, mmproj = tmp_path / "lm.gguf", tmp_path / "mmproj.gguf"
    convert(tiny_llava_ov_dir, tmp_path / "plain.gguf", outtype="f32", progress=False)
    # chatml that writes content parts as llava-hf's template does: "<video>\n" before the text
    template = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{% if m['content'] is string %}{{ m['content'] }}"
                "{% else %}{% for p in m['content'] %}{% if p['type'] == 'video' %}<video>\n{% elif p['type'] == 'image' %}"
                "<image>\n{% else %}{{ p['text'] }}{% endif %}{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
                "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    copy_gguf(tmp_path / "plain.gguf", lm, replace_kv={"tokenizer.chat_template": template})
    convert_mmproj(tiny_llava_ov_dir, mmproj, outtype="f32", progress=False)
    draft = make_draft(tiny_llava_ov_dir, tmp_path / "draft", glimpses=3, anchors=4, window=16, seed=1, scale=0.1)
    frames = np.random.default_rng(5).integers(0, 256, size=(4, 60, 80, 3), dtype=np.uint8)
    question = "What moves?"
    with sp.Engine(str(lm), mmproj=str(mmproj), n_ctx=512, n_threads=1) as engine:
        want, tokens = _reference_chat(engine, [{"role": "user", "content": [{"type": "video"},
                                                                            {"type": "text", "text": question}]}],
                                       video=frames, max_tokens=24, ignore_eos=True)
    config = ServerConfig(model=str(lm), mmproj=str(mmproj), draft=str(draft), port=0, parallel=1, ctx_size=512,
                          threads=1)
    with BackgroundServer(config) as s:
        llava = openai.OpenAI(base_url=s.url + "/v1", api_key="none", max_retries=0, timeout=TIMEOUT_S)
        part = {"type": "video_url", "video_url": {"url": _npy_uri(frames)}}
        reply = llava.chat.completions.create(model="lm.gguf", messages=_video_messages(part, question), max_tokens=24,
                                              extra_body={"ignore_eos": True, **DRAFT_EVERY_ROUND})
    assert reply.choices[0].message.content == want
    _check_numbers(reply, len(tokens), speculative=True)
    assert reply.usage.prompt_tokens > 4 * 4 + 1  # the frames' pooled tokens and the newline are in the prompt
