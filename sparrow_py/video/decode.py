"""Video files -> RGB frames, with PyAV (the `video` extra: pip install "sparrow-vidllm[video]").

Frames are decoded in order and only the selected ones are converted to RGB and kept, so memory
holds the sampled frames, never the whole file; decoding stops after the last selected frame.
Frame numbers count decoded frames in presentation order, as transformers' PyAV reader counts them.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from .frames import VideoInputError
from .sampling import FrameSelection


def _import_av():
    try:
        import av  # noqa: F401
    except ImportError:
        raise ImportError("reading video files needs PyAV: pip install av "
                          "(or pass the frames as a list of HxWx3 uint8 arrays)") from None
    return av


@dataclass(frozen=True)
class VideoInfo:
    path: Path
    total_frames: int
    fps: float
    width: int
    height: int


def probe(path: str | Path) -> VideoInfo:
    """Frame count, frame rate and size of a video file's first video stream."""
    av = _import_av()
    path = Path(path)
    if not path.is_file():
        raise VideoInputError(f"{path}: no such file")
    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                raise VideoInputError(f"{path}: no video stream")
            stream = container.streams.video[0]
            fps = float(stream.average_rate or stream.guessed_rate or 0)
            total = int(stream.frames or 0)
            if total <= 0:
                # The container does not record a count: count packets (demux only, no decoding).
                total = sum(1 for packet in container.demux(stream) if packet.size > 0)
            width, height = stream.codec_context.width, stream.codec_context.height
    except av.error.FFmpegError as e:
        raise VideoInputError(f"{path}: cannot read video ({e})") from None
    if total <= 0:
        raise VideoInputError(f"{path}: no frames")
    if fps <= 0:
        raise VideoInputError(f"{path}: unknown frame rate")
    return VideoInfo(path, total, fps, width, height)


def read_frames(path: str | Path, select: Callable[[VideoInfo], FrameSelection]
                ) -> tuple[np.ndarray, FrameSelection, VideoInfo]:
    """Decode the frames `select(info)` picks; returns [n, H, W, 3] uint8, the selection, the info.

    If the stream turns out shorter than its header said, the selection is redone on the frames
    actually decoded (the header's count was wrong), by decoding again.
    """
    av = _import_av()
    info = probe(path)
    selection = select(info)
    frames = _decode_selected(av, info, selection.indices)
    if len(frames) < len(selection.indices):
        decoded_total = _count_decoded(av, info)
        info = VideoInfo(info.path, decoded_total, info.fps, info.width, info.height)
        selection = select(info)
        frames = _decode_selected(av, info, selection.indices)
    if len(frames) == 0:
        raise VideoInputError(f"{info.path}: no frames could be decoded")
    return np.stack(frames), selection, info


def _decode_selected(av, info: VideoInfo, indices: np.ndarray) -> list[np.ndarray]:
    wanted = np.asarray(indices, dtype=np.int64)
    frames: list[np.ndarray] = []
    if len(wanted) == 0:
        return frames
    last = int(wanted[-1])
    cursor = 0  # position in `wanted`; an index may repeat, so one decoded frame can fill several
    try:
        with av.open(str(info.path)) as container:
            stream = container.streams.video[0]
            stream.thread_type = "AUTO"
            for number, frame in enumerate(container.decode(stream)):
                if number > last:
                    break
                if number < wanted[cursor]:
                    continue
                rgb = frame.to_ndarray(format="rgb24")
                while cursor < len(wanted) and wanted[cursor] == number:
                    frames.append(rgb)
                    cursor += 1
                if cursor == len(wanted):
                    break
    except av.error.FFmpegError as e:
        raise VideoInputError(f"{info.path}: decoding failed ({e})") from None
    return frames


def _count_decoded(av, info: VideoInfo) -> int:
    with av.open(str(info.path)) as container:
        return sum(1 for _ in container.decode(container.streams.video[0]))
