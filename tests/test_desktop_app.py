"""The desktop app (examples/desktop) under QT_QPA_PLATFORM=offscreen, and what it uses from the
Python API for apps with a UI (abort and progress of the vision tower and the prefill, statistics
after each piece).

The app: it opens the bundled clip (thumbnails shown), its text view fills with exactly the text a
plain Engine produces for the same question and settings, streamed in several pieces, from a worker
thread, without ever holding up the UI thread; Stop ends a long generation within 2 s and the next
question works; a file it cannot read shows an error dialog and the app carries on. A screenshot of
the window is saved in the test's tmp dir and copied to /tmp/sparrow-desktop.png.

PySide6 (PySide6-Essentials) is in the `test` extra: without it these tests fail, they do not skip.
"""
from __future__ import annotations

import importlib.util
import os
import shutil
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

import sparrow_py as sp
from sparrow_py.demo import demo_models, synthetic, video_question
from sparrow_py.errors import SparrowError
from sparrow_py.vision import VisionEncoder

os.environ["QT_QPA_PLATFORM"] = "offscreen"  # before Qt starts: no display needed, nothing pops up

APP_PATH = Path(__file__).resolve().parent.parent / "examples" / "desktop" / "app.py"
SCREENSHOT_COPY = Path("/tmp/sparrow-desktop.png")
MODELS = demo_models()
CLIP = np.load(MODELS.clip)
QUESTION = synthetic.PROMPTS[1]
MAX_TOKENS = 64


def _plain_answer(video=CLIP, num_frames=None, speculative="chain") -> tuple[str, list, str]:
    """The answer of a plain Engine (no app): text, tokens, finish reason."""
    with sp.Engine(str(MODELS.target), mmproj=str(MODELS.mmproj), draft=str(MODELS.draft), n_threads=1) as engine:
        text = "".join(engine.chat(video_question(QUESTION), video=video, max_pixels=MODELS.max_pixels,
                                   num_frames=num_frames, max_tokens=MAX_TOKENS, speculative=speculative))
        return text, list(engine.last_tokens), engine.last_finish_reason


def _monotonic_to_one(values) -> bool:
    """Progress as promised: never going back, ending at exactly 1."""
    return bool(values) and all(a <= b for a, b in zip(values, values[1:])) and values[-1] == 1.0


@pytest.fixture(scope="module")
def plain():
    return _plain_answer()


# ---- the app -------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def qt():
    """(QApplication, the app module). Fails, with the reason, when PySide6 is missing."""
    try:
        from PySide6.QtWidgets import QApplication
    except ImportError as e:
        pytest.fail(f"PySide6 is not installed ({e}): the desktop app's tests need it; it is in the `test` extra "
                    "(pip install -e '.[test]', or pip install PySide6-Essentials)", pytrace=False)
    app = QApplication.instance() or QApplication([])
    # app.py is a script folder, not an installed package: load it by path (putting the checkout on
    # sys.path would shadow the installed sparrow_py and its compiled runtime, see conftest.py)
    spec = importlib.util.spec_from_file_location("sparrow_desktop_app", APP_PATH)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return app, module


class UiClock:
    """Runs the UI thread's event loop until a condition holds, and records the longest a single
    pass took: the UI was blocked that long (a slot doing slow work would show here)."""

    def __init__(self, app):
        self.app = app
        self.longest = 0.0

    def wait(self, condition, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while not condition():
            if time.monotonic() > deadline:
                return False
            t0 = time.monotonic()
            self.app.processEvents()
            self.longest = max(self.longest, time.monotonic() - t0)
            time.sleep(0.002)
        return True


@pytest.fixture
def window(qt):
    app, desk = qt
    w = desk.MainWindow(desk.Models.demo(), n_threads=1)
    w.show()
    yield w
    w.close()
    app.processEvents()


def _open(window, clock, path) -> None:
    window.video = None
    window.open_video(str(path))
    assert clock.wait(lambda: window.video is not None, 20), f"the app did not open {path}"


def _thumbnails(window) -> list:
    from PySide6.QtWidgets import QLabel

    items = [window.thumbnails.itemAt(i).widget() for i in range(window.thumbnails.count())]
    return [w for w in items if isinstance(w, QLabel) and w.pixmap() is not None and not w.pixmap().isNull()]


def test_the_app_answers_as_the_engine_does(qt, window, plain, tmp_path):
    app, desk = qt
    clock = UiClock(app)
    _open(window, clock, MODELS.clip)
    assert len(_thumbnails(window)) == min(desk.N_THUMBNAILS, len(CLIP))
    assert window.ask_button.isEnabled() and not window.stop_button.isEnabled()

    # every piece the worker emits, and the thread it emits from (a direct connection runs there)
    from PySide6.QtCore import Qt

    emitted, threads, stages = [], set(), {}

    def record(text, stats):
        emitted.append((text, stats["n_generated"]))
        threads.add(threading.get_ident())

    def record_progress(stage, fraction):
        stages.setdefault(stage, []).append(fraction)

    window.worker.piece.connect(record, Qt.ConnectionType.DirectConnection)
    window.worker.progress.connect(record_progress, Qt.ConnectionType.DirectConnection)
    desk.PIECE_INTERVAL_S = 0.0  # one signal per piece here: the stream is seen piece by piece
    try:
        window.question_edit.setText(QUESTION)
        window.max_tokens_spin.setValue(MAX_TOKENS)
        window.mode_combo.setCurrentText("chain")
        window.ask_button.click()
        assert window.stop_button.isEnabled() and not window.ask_button.isEnabled()
        assert clock.wait(lambda: window.last_finish is not None, 30), "no answer"
    finally:
        desk.PIECE_INTERVAL_S = 0.03
        window.worker.piece.disconnect(record)
        window.worker.progress.disconnect(record_progress)

    text, tokens, reason = plain
    assert window.answer_view.toPlainText() == text
    assert window.last_finish == reason
    assert "".join(t for t, _ in emitted) == text
    assert len(emitted) > 1, "the answer came in one piece: not streamed"
    counts = [n for _, n in emitted]
    assert counts == sorted(counts) and counts[-1] == len(tokens)
    assert threads and threading.get_ident() not in threads, "the generation ran on the UI thread"
    # the progress bar's stages, in order, each rising to 1
    assert list(stages) == ["Loading the model", "Encoding the video", "Reading the prompt"]
    assert all(_monotonic_to_one(v) for v in stages.values()), stages
    stats = window.last_stats
    assert stats["n_generated"] == len(tokens) and 0 <= stats["n_accepted"] <= stats["n_drafted"]
    shown = window.stats_label.text()
    assert f"accepted length {stats['mean_accepted_length']:.2f}" in shown and "tokens/s" in shown
    assert clock.longest < 0.5, f"the UI thread was blocked for {clock.longest:.2f} s"

    # the screenshot: the window with the speculative answer, saved and looked at
    clock.wait(lambda: False, 0.1)  # let the layout settle (labels resized to their new text)
    shot = tmp_path / "sparrow-desktop.png"
    assert window.grab().save(str(shot))
    from PySide6.QtGui import QImage

    image = QImage(str(shot))
    assert image.width() >= 600 and image.height() >= 400
    pixels = np.array([image.pixel(x, y) for x in range(0, image.width(), 37) for y in range(0, image.height(), 29)])
    assert len(np.unique(pixels)) > 20, "the screenshot is blank"
    shutil.copyfile(shot, SCREENSHOT_COPY)

    # a second question on the same Engine, plain decoding: the same text (speculation is lossless)
    window.mode_combo.setCurrentText("none")
    window.ask()
    assert clock.wait(lambda: window.last_finish is not None, 30)
    assert window.answer_view.toPlainText() == text and window.last_stats["n_drafted"] == 0


def test_stop_ends_a_long_generation_quickly(qt, plain):
    app, desk = qt
    # a context long enough for a generation of many seconds (the demo model answers in a few
    # milliseconds, so it is told to keep going past its end of text)
    w = desk.MainWindow(desk.Models.demo(), n_threads=1, n_ctx=32768)
    w.show()
    try:
        clock = UiClock(app)
        _open(w, clock, MODELS.clip)
        w.ask(desk.Question(QUESTION, max_tokens=30000, ignore_eos=True))
        assert clock.wait(lambda: w.answer_view.toPlainText() != "", 30), "nothing was generated"
        t_stop = time.monotonic()
        w.stop_button.click()
        assert clock.wait(lambda: w.last_finish is not None, 10), "Stop did not end the generation"
        latency = time.monotonic() - t_stop
        assert w.last_finish == "stopped"
        assert latency < 2.0, f"the generation ended {latency:.2f} s after Stop"
        assert 0 < w.last_stats["n_generated"] < 30000
        assert clock.longest < 0.5, f"the UI thread was blocked for {clock.longest:.2f} s"
        assert w.ask_button.isEnabled() and not w.stop_button.isEnabled()

        # the Engine is usable afterwards: the next question gets the usual answer
        w.ask(desk.Question(QUESTION, max_tokens=MAX_TOKENS))
        assert clock.wait(lambda: w.last_finish is not None, 30)
        assert w.answer_view.toPlainText() == plain[0]

        # closing the window in the middle of a long generation does not hang
        w.ask(desk.Question(QUESTION, max_tokens=30000, ignore_eos=True))
        assert clock.wait(lambda: w.answer_view.toPlainText() != "", 30)
        t_close = time.monotonic()
        w.close()
        assert time.monotonic() - t_close < 2.0 and not w.worker_thread.isRunning() and w.worker.engine is None
    finally:
        w.close()
        app.processEvents()


def _error_boxes(app) -> list:
    from PySide6.QtWidgets import QMessageBox

    return [w for w in app.topLevelWidgets() if isinstance(w, QMessageBox) and w.isVisible()]


def test_a_bad_file_shows_an_error_dialog(qt, window, tmp_path):
    app, _ = qt
    clock = UiClock(app)
    _open(window, clock, MODELS.clip)
    opened = window.video
    broken = tmp_path / "broken.mp4"
    broken.write_bytes(b"\x00\x00\x00\x18ftypmp42 this is not a video" * 50)
    not_frames = tmp_path / "numbers.npy"
    np.save(not_frames, np.arange(12.0))
    for path, words in ((broken, "broken.mp4"), (not_frames, "numbers.npy"), (tmp_path / "missing.webm", "no such file")):
        window.open_video(str(path))
        assert clock.wait(lambda: _error_boxes(app), 20), f"no error dialog for {path.name}"
        box = _error_boxes(app)[0]
        assert words in box.text(), box.text()
        assert box.windowTitle() == "Cannot open the video"
        box.close()  # the dialog was opened without blocking: the test goes on while it shows
        assert clock.wait(lambda: not _error_boxes(app), 5)
        assert window.video is opened and window.ask_button.isEnabled() and window.worker_thread.isRunning()


def test_the_app_reads_a_video_file(qt, window, tmp_path):
    """An .mp4 (PyAV): thumbnails from the file, and the answer of a plain Engine given the same
    file with the demo's frame count."""
    import av

    app, desk = qt
    path = tmp_path / "shapes.mp4"
    with av.open(str(path), "w") as container:
        stream = container.add_stream("mpeg4", rate=4)
        stream.width = stream.height = synthetic.FRAME_SIZE
        stream.pix_fmt = "yuv420p"
        for frame in np.repeat(CLIP, 2, axis=0):  # 16 frames at 4 fps; the Engine samples 8
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    clock = UiClock(app)
    _open(window, clock, path)
    assert len(_thumbnails(window)) == desk.N_THUMBNAILS and "4.0 fps" in window.video_label.text()
    window.ask(desk.Question(QUESTION, max_tokens=MAX_TOKENS))
    assert clock.wait(lambda: window.last_finish is not None, 30)
    assert window.answer_view.toPlainText() == _plain_answer(str(path), num_frames=synthetic.N_FRAMES)[0]


# ---- the API for apps with a UI ------------------------------------------------------------------

def test_vision_encode_cancelled_from_another_thread():
    encoder = VisionEncoder(str(MODELS.mmproj), n_threads=1)
    rng = np.random.default_rng(0)
    pixels = rng.standard_normal((256 * 16 * 16, 3 * 2 * 14 * 14), dtype=np.float32)  # seconds of work
    started, stop = threading.Event(), threading.Event()
    seen, outcome = [], {}

    def progress(fraction):
        seen.append(fraction)
        started.set()

    def encode():
        try:
            encoder.encode(pixels, [256, 16, 16], progress=progress, abort=stop.is_set)
            outcome["error"] = None
        except SparrowError as e:
            outcome["error"] = e
        outcome["t"] = time.monotonic()

    worker = threading.Thread(target=encode)
    worker.start()
    assert started.wait(30)
    t_stop = time.monotonic()
    stop.set()
    worker.join(30)
    assert outcome["error"] is not None and outcome["error"].status == "SPARROW_ERR_ABORTED"
    assert outcome["t"] - t_stop < 1.0, "the encode did not stop within 1 s"
    assert seen[-1] < 0.5

    # the encoder works as before; progress rises to exactly 1
    small, grid = pixels[: 4 * 64], [4, 8, 8]
    seen.clear()
    np.testing.assert_array_equal(encoder.encode(small, grid, progress=seen.append), encoder.encode(small, grid))
    assert _monotonic_to_one(seen) and len(seen) == 5  # 4 blocks and the merger, one chunk

    # an exception in a callback stops the encode and is the error's cause
    def broken(_fraction):
        raise KeyError("from the callback")

    with pytest.raises(SparrowError) as info:
        encoder.encode(small, grid, progress=broken)
    assert info.value.status == "SPARROW_ERR_ABORTED" and isinstance(info.value.__cause__, KeyError)
    encoder.close()


def test_engine_progress_abort_and_stats_per_piece(plain):
    stop = threading.Event()
    with sp.Engine(str(MODELS.target), mmproj=str(MODELS.mmproj), draft=str(MODELS.draft), n_threads=1, n_batch=16,
                   abort=stop.is_set) as engine:
        vision, prefill, pieces, per_piece = [], [], [], []
        for piece in engine.chat(video_question(QUESTION), video=CLIP, max_pixels=MODELS.max_pixels,
                                 max_tokens=MAX_TOKENS, vision_progress=vision.append, progress=prefill.append):
            pieces.append(piece)
            per_piece.append(engine.last_stats)  # the figures so far, read by the thread reading the stream
        assert "".join(pieces) == plain[0] and engine.last_tokens == plain[1]
        assert _monotonic_to_one(vision) and _monotonic_to_one(prefill)
        n_prompt = engine.last_stats["n_prompt"]
        assert len(prefill) == -(-n_prompt // 16), "one report per 16-token chunk of the prompt"
        assert prefill[0] == pytest.approx(16 / n_prompt)
        counts = [s["n_generated"] for s in per_piece]
        assert counts == sorted(counts) and counts[-1] == len(plain[1]) and len(set(counts)) > 1
        for s in per_piece:
            assert 0 <= s["n_accepted"] <= s["n_drafted"]
            if s["n_target_forwards"]:
                assert s["mean_accepted_length"] == pytest.approx(
                    (s["n_accepted"] + s["n_target_forwards"]) / s["n_target_forwards"])
        assert engine.detokenize(engine.last_tokens) == "".join(pieces)

        # the Engine's abort stops the vision tower of generate()/chat() too; the Engine stays usable
        def stop_in_the_tower(_fraction):
            stop.set()

        with pytest.raises(SparrowError) as info:
            engine.chat(video_question(QUESTION), video=CLIP, max_pixels=MODELS.max_pixels, max_tokens=MAX_TOKENS,
                        vision_progress=stop_in_the_tower)
        assert info.value.status == "SPARROW_ERR_ABORTED"
        stop.clear()
        # a progress callback that returns False cancels the prefill
        with pytest.raises(SparrowError) as info:
            "".join(engine.chat(video_question(QUESTION), video=CLIP, max_pixels=MODELS.max_pixels,
                                max_tokens=MAX_TOKENS, progress=lambda f: False))
        assert info.value.status == "SPARROW_ERR_ABORTED"
        assert "".join(engine.chat(video_question(QUESTION), video=CLIP, max_pixels=MODELS.max_pixels,
                                   max_tokens=MAX_TOKENS)) == plain[0]
