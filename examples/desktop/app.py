"""Sparrow desktop: ask a video LLM about a video file; the answer streams in as it is decoded.

    pip install -e ".[desktop]"                 # PySide6-Essentials
    python -m examples.desktop                  # the bundled demo models and clip
    python examples/desktop/app.py my.mp4       # a video of your own (.mp4/.mkv/.webm need PyAV,
                                                # extra `video`; .npy: [T, H, W, 3] uint8 frames)
    python -m examples.desktop --model qwen25vl.gguf --mmproj mmproj.gguf --draft draft.gguf clip.mp4

The window shows a few frames of the video, takes a question, streams the answer into a text view
and shows the speculative statistics live (accepted length: tokens per target forward pass;
tokens/s), with a progress bar for the model loading, the vision tower and the prompt's prefill.

Threads: the UI thread only touches widgets. A Worker object lives on its own QThread and does all
the slow work (loading the models, decoding the file, encoding the video, generating); the window
asks it through queued signals and hears back through queued signals, so the UI never waits on the
runtime. Stop sets a threading.Event, which the Engine's abort callback (asked by the runtime before
every layer, also inside the vision tower and a long prefill) and the worker's piece loop read: the
generation ends within one layer's time, and the Engine stays usable for the next question.
"""
from __future__ import annotations

import argparse
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Union

import numpy as np
from PySide6.QtCore import QObject, Qt, QThread, Signal, Slot
from PySide6.QtGui import QImage, QPixmap, QTextCursor
from PySide6.QtWidgets import (QApplication, QComboBox, QFileDialog, QHBoxLayout, QLabel, QLineEdit, QMainWindow,
                               QMessageBox, QPlainTextEdit, QProgressBar, QPushButton, QSpinBox, QVBoxLayout, QWidget)

from sparrow_py import Engine, SparrowError
from sparrow_py.demo import demo_models, synthetic, video_question

N_THUMBNAILS = 6
THUMBNAIL_HEIGHT = 96
VIDEO_FILTER = "Videos (*.mp4 *.mkv *.webm *.mov *.avi *.npy);;All files (*)"
# Pieces are handed to the UI at most this often: a small model decodes thousands of tokens per
# second, and one queued signal per token would flood the UI thread (which would then lag behind
# the worker, and react late to Stop).
PIECE_INTERVAL_S = 0.03


@dataclass(frozen=True)
class Models:
    """The files the app runs, and how videos are sampled for them."""

    target: str
    mmproj: str
    draft: Optional[str] = None
    max_pixels: Optional[int] = None    # per frame (Qwen's smart_resize budget); None: the family's
    num_frames: Optional[int] = None    # frames sampled from a file; None: the family's rule (fps)
    question: str = "Describe the video."
    clip: Optional[str] = None          # opened at start

    @classmethod
    def demo(cls) -> "Models":
        """The bundled tiny video captioner (what `sparrow demo` runs) and its clip."""
        m = demo_models()
        return cls(str(m.target), str(m.mmproj), str(m.draft), max_pixels=m.max_pixels,
                   num_frames=synthetic.N_FRAMES, question=synthetic.PROMPTS[0], clip=str(m.clip))


@dataclass(frozen=True)
class Question:
    text: str
    max_tokens: int = 128
    speculative: str = "chain"          # "chain", "tree" or "none" (the draft is not used)
    ignore_eos: bool = False            # keep going past the end of the answer (timing runs)


@dataclass(frozen=True)
class Video:
    path: str
    source: Union[np.ndarray, str]      # what Engine.chat takes as video=: the frames of a .npy, else the path
    thumbnails: list                    # a few HxWx3 uint8 frames, evenly spread
    summary: str


def read_video(path: str) -> Video:
    """Open a video for the app: a .npy array of [T, H, W, 3] uint8 frames, or a file PyAV reads
    (only the thumbnails are decoded here; the Engine samples the file itself). Raises ValueError
    (VideoInputError), OSError or ImportError with a message for the user."""
    from sparrow_py.video import as_frame_array
    from sparrow_py.video.sampling import uniform_select_frames

    p = Path(path)
    if not p.is_file():
        raise ValueError(f"{path}: no such file")
    if p.suffix.lower() == ".npy":
        try:
            frames = as_frame_array(np.load(p, allow_pickle=False))
        except ValueError as e:
            raise ValueError(f"{p.name}: not an array of video frames ({e})") from None
        pick = uniform_select_frames(len(frames), num_frames=min(N_THUMBNAILS, len(frames))).indices
        return Video(str(p), frames, [frames[i] for i in pick],
                     f"{p.name}: {len(frames)} frames, {frames.shape[2]}x{frames.shape[1]}")
    from sparrow_py.video.decode import read_frames

    frames, _, info = read_frames(p, lambda info: uniform_select_frames(
        info.total_frames, num_frames=min(N_THUMBNAILS, info.total_frames), source_fps=info.fps))
    return Video(str(p), str(p), list(frames),
                 f"{p.name}: {info.total_frames} frames, {info.width}x{info.height}, {info.fps:.1f} fps")


def format_stats(stats: dict) -> str:
    """The live figures: accepted length (tokens per target forward pass), tokens/s, counts."""
    text = (f"accepted length {stats['mean_accepted_length']:.2f}  ·  {stats['decode_tokens_per_s']:.0f} tokens/s  ·  "
            f"{stats['n_generated']} tokens")
    if stats["n_drafted"]:
        text += f"  ·  drafted {stats['n_drafted']}, accepted {stats['n_accepted']}"
    return text


class Worker(QObject):
    """The slow work, on its own thread. Slots are called through queued signals (so they run on
    the worker's thread); results go back as signals. stop() is the one method other threads call
    directly."""

    opened = Signal(object)                 # Video
    progress = Signal(str, float)           # stage, fraction done
    piece = Signal(str, object)             # text (pieces since the last signal), stats so far
    finished = Signal(str, object)          # "eog" | "length" | "stop" | "context" | "stopped", stats
    failed = Signal(str, str)               # title, message

    def __init__(self, models: Models, n_threads: int = 0, n_ctx: int = 0):
        super().__init__()
        self.models = models
        self.n_threads = n_threads
        self.n_ctx = n_ctx
        self.engine: Optional[Engine] = None
        self._stop = threading.Event()

    def stop(self) -> None:
        """Ask the running generation to stop (any thread): the runtime's abort callback and the
        piece loop read the flag."""
        self._stop.set()

    def _should_abort(self) -> bool:  # the Engine's abort callback (runtime thread = this worker)
        return self._stop.is_set()

    @Slot(str)
    def open_video(self, path: str) -> None:
        try:
            video = read_video(path)
        except Exception as e:  # noqa: BLE001 - whatever the file does, the app reports it and goes on
            self.failed.emit("Cannot open the video", str(e) or type(e).__name__)
            return
        self.opened.emit(video)

    def _load(self) -> Engine:
        if self.engine is None:
            m = self.models
            self.engine = Engine(m.target, mmproj=m.mmproj, draft=m.draft, n_ctx=self.n_ctx, n_threads=self.n_threads,
                                 abort=self._should_abort,
                                 progress=lambda f: self._report("Loading the model", f))
        return self.engine

    def _report(self, stage: str, fraction: float) -> bool:
        self.progress.emit(stage, fraction)
        return not self._stop.is_set()

    @Slot(object, object)
    def ask(self, video: Video, question: Question) -> None:
        self._stop.clear()
        stats: dict = {}
        try:
            engine = self._load()
            m = self.models
            speculative = question.speculative if m.draft else "none"
            stream = engine.chat(video_question(question.text), video=video.source, max_pixels=m.max_pixels,
                                 num_frames=m.num_frames if isinstance(video.source, str) else None,
                                 max_tokens=question.max_tokens, speculative=speculative,
                                 ignore_eos=question.ignore_eos,
                                 vision_progress=lambda f: self._report("Encoding the video", f),
                                 progress=lambda f: self._report("Reading the prompt", f))
            pending, last_emit = "", 0.0
            try:
                for text in stream:
                    pending += text
                    now = time.monotonic()
                    if now - last_emit >= PIECE_INTERVAL_S:
                        stats = engine.last_stats  # the figures so far (this thread reads the stream)
                        self.piece.emit(pending, stats)
                        pending, last_emit = "", now
                    if self._stop.is_set():
                        break
            finally:
                stream.close()
            stats = engine.last_stats
            if pending:
                self.piece.emit(pending, stats)
            # a stream left early (Stop) has no finish reason; one that ended by itself keeps its own
            reason = engine.last_finish_reason or "stopped"
            self.finished.emit(reason, stats)
        except SparrowError as e:
            if e.status == "SPARROW_ERR_ABORTED" and self._stop.is_set():
                self.finished.emit("stopped", self._stats_or(stats))
            else:
                self.failed.emit("Generation failed", str(e))
        except Exception as e:  # noqa: BLE001 - a bad video (VideoInputError), a missing PyAV ...: reported
            self.failed.emit("Generation failed", f"{type(e).__name__}: {e}")

    def _stats_or(self, stats: dict) -> dict:
        try:
            return self.engine.last_stats if self.engine is not None else stats
        except SparrowError:
            return stats

    def close(self) -> None:
        """Release the Engine (once the worker's thread has ended)."""
        if self.engine is not None:
            self.engine.close()
            self.engine = None


def to_pixmap(frame: np.ndarray, height: int = THUMBNAIL_HEIGHT) -> QPixmap:
    frame = np.ascontiguousarray(frame, dtype=np.uint8)
    h, w = frame.shape[:2]
    image = QImage(frame.data, w, h, 3 * w, QImage.Format.Format_RGB888).copy()  # copy: frame may go away
    return QPixmap.fromImage(image).scaledToHeight(height, Qt.TransformationMode.SmoothTransformation)


class MainWindow(QMainWindow):
    open_requested = Signal(str)
    ask_requested = Signal(object, object)

    def __init__(self, models: Models, n_threads: int = 0, n_ctx: int = 0):
        super().__init__()
        self.models = models
        self.video: Optional[Video] = None
        self.busy = False
        self.last_finish: Optional[str] = None   # why the last answer ended (tests read it)
        self.last_stats: dict = {}
        self.error_box: Optional[QMessageBox] = None
        self.setWindowTitle("Sparrow: ask a video")

        self.worker_thread = QThread(self)  # (not self.thread: QObject.thread() is Qt's)
        self.worker = Worker(models, n_threads=n_threads, n_ctx=n_ctx)
        self.worker.moveToThread(self.worker_thread)
        self.open_requested.connect(self.worker.open_video)
        self.ask_requested.connect(self.worker.ask)
        self.worker.opened.connect(self._on_opened)
        self.worker.progress.connect(self._on_progress)
        self.worker.piece.connect(self._on_piece)
        self.worker.finished.connect(self._on_finished)
        self.worker.failed.connect(self._on_failed)
        self.worker_thread.start()
        self._build()
        self._set_busy(False)

    # ---- layout ------------------------------------------------------------------------------
    def _build(self) -> None:
        self.open_button = QPushButton("Open video…")
        self.open_button.clicked.connect(self._choose_file)
        self.video_label = QLabel("No video")
        self.thumbnails = QHBoxLayout()
        self.thumbnails.addStretch(1)
        self.question_edit = QLineEdit(self.models.question)
        self.question_edit.setPlaceholderText("Ask about the video")
        self.question_edit.returnPressed.connect(self.ask)
        self.ask_button = QPushButton("Ask")
        self.ask_button.clicked.connect(self.ask)
        self.stop_button = QPushButton("Stop")
        self.stop_button.clicked.connect(self.stop)
        self.mode_combo = QComboBox()
        self.mode_combo.addItems(["chain", "tree", "none"])
        self.mode_combo.setToolTip("Speculative decoding: a chain of draft tokens, an EAGLE-2 tree, or none")
        self.mode_combo.setEnabled(self.models.draft is not None)
        self.max_tokens_spin = QSpinBox()
        self.max_tokens_spin.setRange(1, 32768)
        self.max_tokens_spin.setValue(128)
        self.max_tokens_spin.setPrefix("max tokens ")
        self.progress_bar = QProgressBar()
        self.progress_bar.setRange(0, 1000)
        self.progress_bar.setTextVisible(False)
        self.status_label = QLabel("")
        self.answer_view = QPlainTextEdit()
        self.answer_view.setReadOnly(True)
        self.answer_view.setPlaceholderText("The answer appears here as it is decoded.")
        self.stats_label = QLabel("")
        self.stats_label.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)

        top = QHBoxLayout()
        top.addWidget(self.open_button)
        top.addWidget(self.video_label, 1)
        ask_row = QHBoxLayout()
        ask_row.addWidget(self.question_edit, 1)
        ask_row.addWidget(QLabel("speculative"))
        ask_row.addWidget(self.mode_combo)
        ask_row.addWidget(self.max_tokens_spin)
        ask_row.addWidget(self.ask_button)
        ask_row.addWidget(self.stop_button)
        progress_row = QHBoxLayout()
        progress_row.addWidget(self.progress_bar, 1)
        progress_row.addWidget(self.status_label)
        layout = QVBoxLayout()
        layout.addLayout(top)
        layout.addLayout(self.thumbnails)
        layout.addLayout(ask_row)
        layout.addLayout(progress_row)
        layout.addWidget(self.answer_view, 1)
        layout.addWidget(self.stats_label)
        central = QWidget()
        central.setLayout(layout)
        self.setCentralWidget(central)
        self.resize(820, 520)

    def _set_busy(self, busy: bool) -> None:
        self.busy = busy
        self.ask_button.setEnabled(not busy and self.video is not None)
        self.open_button.setEnabled(not busy)
        self.stop_button.setEnabled(busy)

    # ---- actions (UI thread) -----------------------------------------------------------------
    def _choose_file(self) -> None:
        path, _ = QFileDialog.getOpenFileName(self, "Open a video", "", VIDEO_FILTER)
        if path:
            self.open_video(path)

    def open_video(self, path: str) -> None:
        """Open a video (the worker decodes its thumbnails; _on_opened or an error dialog follows)."""
        self.status_label.setText(f"Opening {Path(path).name}…")
        self.open_requested.emit(str(path))

    def question(self) -> Question:
        return Question(self.question_edit.text().strip() or self.models.question,
                        max_tokens=self.max_tokens_spin.value(), speculative=self.mode_combo.currentText())

    def ask(self, question: Optional[Question] = None) -> None:
        """Ask about the open video (the question in the window, or the one given)."""
        if self.busy or self.video is None:
            return
        self.answer_view.clear()
        self.stats_label.setText("")
        self.last_finish = None
        self._set_busy(True)
        self.ask_requested.emit(self.video, question if isinstance(question, Question) else self.question())

    def stop(self) -> None:
        self.status_label.setText("Stopping…")
        self.worker.stop()  # a flag: thread-safe, and the worker's event loop is busy with ask()

    # ---- what the worker reports (UI thread, queued) -----------------------------------------
    @Slot(object)
    def _on_opened(self, video: Video) -> None:
        self.video = video
        self.video_label.setText(video.summary)
        while self.thumbnails.count() > 1:  # keep the trailing stretch
            item = self.thumbnails.takeAt(0)
            if item.widget():
                item.widget().deleteLater()
        for i, frame in enumerate(video.thumbnails):
            label = QLabel()
            label.setPixmap(to_pixmap(frame))
            self.thumbnails.insertWidget(i, label)
        self.status_label.setText("")
        self.answer_view.clear()
        self._set_busy(self.busy)

    @Slot(str, float)
    def _on_progress(self, stage: str, fraction: float) -> None:
        self.progress_bar.setValue(int(round(1000 * fraction)))
        self.status_label.setText(stage if fraction < 1 else "")

    @Slot(str, object)
    def _on_piece(self, text: str, stats: dict) -> None:
        cursor = self.answer_view.textCursor()
        cursor.movePosition(QTextCursor.MoveOperation.End)
        cursor.insertText(text)
        self.answer_view.setTextCursor(cursor)
        self.answer_view.ensureCursorVisible()
        self._show_stats(stats)

    @Slot(str, object)
    def _on_finished(self, reason: str, stats: dict) -> None:
        self._show_stats(stats)
        self.progress_bar.setValue(self.progress_bar.maximum())
        self.status_label.setText({"stopped": "Stopped", "length": "Reached max tokens",
                                   "context": "The context is full"}.get(reason, "Done"))
        self.last_finish = reason
        self._set_busy(False)

    @Slot(str, str)
    def _on_failed(self, title: str, message: str) -> None:
        self.status_label.setText("")
        self.last_finish = "error"
        self._set_busy(False)
        self.show_error(title, message)

    def _show_stats(self, stats: dict) -> None:
        if stats:
            self.last_stats = stats
            self.stats_label.setText(format_stats(stats))

    def show_error(self, title: str, message: str) -> None:
        """An error dialog, window-modal but not blocking: open(), not exec(), so the event loop
        (and the worker's signals) keep running."""
        box = QMessageBox(QMessageBox.Icon.Critical, title, message, QMessageBox.StandardButton.Ok, self)
        box.setAttribute(Qt.WidgetAttribute.WA_DeleteOnClose)
        box.open()
        self.error_box = box

    def shutdown(self) -> None:
        """Stop any generation, end the worker's thread, release the models."""
        self.worker.stop()
        self.worker_thread.quit()
        self.worker_thread.wait()
        self.worker.close()

    def closeEvent(self, event) -> None:  # noqa: N802 - Qt's name
        self.shutdown()
        super().closeEvent(event)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m examples.desktop", description=__doc__.split("\n")[0])
    p.add_argument("video", nargs="?", help="a video file (.mp4/.mkv/.webm, extra `video`) or a .npy of [T, H, W, 3] "
                                            "uint8 frames (default with the demo models: the bundled clip)")
    p.add_argument("-m", "--model", help="target GGUF (default: the bundled demo target)")
    p.add_argument("--mmproj", help="the target's vision GGUF (needed with --model)")
    p.add_argument("--draft", help="a Sparrow draft GGUF for the target (speculative decoding)")
    p.add_argument("--max-pixels", type=int, default=None, help="pixel budget per frame (Qwen's smart_resize)")
    p.add_argument("--num-frames", type=int, default=None, help="frames sampled from a video file")
    p.add_argument("-t", "--threads", type=int, default=0, help="CPU threads (default: all cores)")
    p.add_argument("-c", "--ctx-size", type=int, default=0, help="context window (default: the model's)")
    return p.parse_args(argv)


def models_from_args(args: argparse.Namespace) -> Models:
    if args.model is None:
        m = Models.demo()
        if args.max_pixels is not None or args.num_frames is not None:
            m = Models(m.target, m.mmproj, m.draft, args.max_pixels or m.max_pixels, args.num_frames or m.num_frames,
                       m.question, m.clip)
        return m
    if args.mmproj is None:
        raise SystemExit("--model needs the model's vision file: --mmproj FILE")
    return Models(args.model, args.mmproj, args.draft, args.max_pixels, args.num_frames)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        models = models_from_args(args)
    except SparrowError as e:
        print(f"sparrow desktop: {e}", file=sys.stderr)
        return 1
    app = QApplication.instance() or QApplication(sys.argv[:1])
    window = MainWindow(models, n_threads=args.threads, n_ctx=args.ctx_size)
    window.show()
    video = args.video or models.clip
    if video:
        window.open_video(video)
    return app.exec()


if __name__ == "__main__":
    sys.exit(main())
