"""Images and videos of chat requests: where their bytes come from, how they are decoded, and the
cache of their encodings.

A content part names its bytes by a URL:
    data:[<mime>][;base64],<payload>    inline (the usual way: OpenAI clients send images so)
    file:///abs/path, /abs/path, rel/path   a file under --media-path (nothing outside it is read,
                                        symbolic links included); refused without --media-path
    http(s)://...                       refused unless --allow-remote-media
Images decode with Pillow; videos with PyAV (the `video` extra). A NumPy .npy array (mime
application/x-npy, or a .npy file) of HxWx3 (image) or TxHxWx3 (video) uint8 RGB is taken as it is.

MediaCache keeps the vision tower's output for recent items, keyed by a hash of the bytes and the
preprocessing options, so a second question about the same video skips decoding and the tower.
"""
from __future__ import annotations

import base64
import binascii
import hashlib
import io
import os
import tempfile
import threading
import time
import urllib.parse
import urllib.request
from collections import OrderedDict
from dataclasses import dataclass
from typing import Optional

import numpy as np

from sparrow_py.engine import Media

from .errors import ApiError, bad_request


@dataclass(frozen=True)
class VisualRef:
    """One image or video part of a request, before its bytes are fetched."""

    kind: str                          # "image" or "video"
    url: str                           # data: URI, file path or remote URL (see the module's docstring)
    fps: Optional[float] = None        # video frame sampling (Qwen's rule; the model family's default if neither)
    num_frames: Optional[int] = None
    max_pixels: Optional[int] = None   # pixel budget per frame (Qwen's smart_resize)


@dataclass
class MediaBytes:
    data: bytes
    suffix: str       # a file name suffix that says the format: ".npy", ".mp4", ".png", ...
    path: Optional[str] = None  # the file they were read from, when a decoder wants a path


_MIME_SUFFIX = {"application/x-npy": ".npy", "application/npy": ".npy", "video/mp4": ".mp4", "video/webm": ".webm",
                "video/quicktime": ".mov", "video/x-matroska": ".mkv", "video/x-msvideo": ".avi", "image/gif": ".gif"}


class MediaLoader:
    """Fetches the bytes a VisualRef names, within the server's limits."""

    def __init__(self, media_path: Optional[str], allow_remote: bool, max_bytes: int, remote_timeout_s: float = 20.0):
        self.media_root = os.path.realpath(media_path) if media_path else None
        self.allow_remote = allow_remote
        self.max_bytes = max_bytes
        self.remote_timeout_s = remote_timeout_s

    def load(self, ref: VisualRef) -> MediaBytes:
        url = ref.url
        if not isinstance(url, str) or not url:
            raise bad_request(f"the {ref.kind} part has no url", "messages")
        if url.startswith("data:"):
            return self._data_uri(url)
        scheme = urllib.parse.urlsplit(url).scheme.lower()
        if scheme in ("http", "https"):
            return self._remote(url)
        if scheme == "file" or scheme == "" or (len(scheme) == 1 and os.name == "nt"):
            return self._local(urllib.parse.unquote(urllib.parse.urlsplit(url).path) if scheme == "file" else url)
        raise bad_request(f"unsupported media URL scheme {scheme!r}: use a data: URI, a file under --media-path, "
                          "or http(s) where the server allows it", "messages")

    def _too_large(self, size: int) -> ApiError:
        return ApiError(413, f"the media item has {size} bytes, more than the server's limit of {self.max_bytes} "
                             "(--max-upload-mb)", "invalid_request_error", "messages")

    def _data_uri(self, url: str) -> MediaBytes:
        header, sep, payload = url[5:].partition(",")
        if not sep:
            raise bad_request("malformed data: URI (no comma)", "messages")
        fields = header.split(";")
        mime = fields[0].strip().lower()
        if "base64" not in fields[1:]:
            raise bad_request("data: URIs must be base64 encoded (data:<mime>;base64,...)", "messages")
        if len(payload) * 3 // 4 > self.max_bytes:
            raise self._too_large(len(payload) * 3 // 4)
        try:
            data = base64.b64decode(payload, validate=True)
        except (binascii.Error, ValueError) as e:
            raise bad_request(f"the data: URI is not valid base64 ({e})", "messages") from None
        suffix = _MIME_SUFFIX.get(mime) or ("." + mime.split("/", 1)[1] if "/" in mime else "")
        return MediaBytes(data, suffix)

    def _local(self, path: str) -> MediaBytes:
        if self.media_root is None:
            raise ApiError(403, "local media files are refused: start the server with --media-path DIR to serve "
                                "files under DIR", "permission_error", "messages")
        full = os.path.realpath(os.path.join(self.media_root, path))  # an absolute path replaces the root
        if os.path.commonpath([full, self.media_root]) != self.media_root:
            raise ApiError(403, f"{path}: outside the server's --media-path", "permission_error", "messages")
        try:
            size = os.path.getsize(full)
            if size > self.max_bytes:
                raise self._too_large(size)
            with open(full, "rb") as f:
                data = f.read()
        except OSError as e:
            raise bad_request(f"{path}: cannot read the file ({e.strerror})", "messages") from None
        return MediaBytes(data, os.path.splitext(full)[1].lower(), path=full)

    def _remote(self, url: str) -> MediaBytes:
        if not self.allow_remote:
            raise bad_request("remote media URLs are refused: send the bytes as a data: URI, or start the server "
                              "with --allow-remote-media", "messages")
        try:
            with urllib.request.urlopen(url, timeout=self.remote_timeout_s) as response:
                data = response.read(self.max_bytes + 1)
                mime = response.headers.get_content_type()
        except (OSError, ValueError) as e:
            raise bad_request(f"{url}: cannot fetch ({e})", "messages") from None
        if len(data) > self.max_bytes:
            raise self._too_large(len(data))
        suffix = _MIME_SUFFIX.get(mime) or os.path.splitext(urllib.parse.urlsplit(url).path)[1].lower()
        return MediaBytes(data, suffix)


def decode_image(item: MediaBytes) -> np.ndarray:
    """HxWx3 uint8 RGB."""
    if item.suffix == ".npy":
        return _load_npy(item.data, "image")
    try:
        from PIL import Image, UnidentifiedImageError
    except ImportError:
        raise ApiError(501, "decoding images needs Pillow on the server (pip install pillow), or send a .npy array",
                       "not_supported_error") from None
    try:
        with Image.open(io.BytesIO(item.data)) as im:
            return np.asarray(im.convert("RGB"))
    except (UnidentifiedImageError, OSError, ValueError) as e:
        raise bad_request(f"cannot decode the image ({e})", "messages") from None


def _load_npy(data: bytes, kind: str) -> np.ndarray:
    try:
        return np.load(io.BytesIO(data), allow_pickle=False)
    except (OSError, ValueError, EOFError) as e:
        raise bad_request(f"cannot read the {kind}'s .npy array ({e})", "messages") from None


class VideoInput:
    """What Engine.encode_visuals takes for a video: frames for .npy, else a file path (PyAV
    decodes from files). Bytes that came inline are written to a temporary file for the decoder,
    removed on close."""

    def __init__(self, item: MediaBytes):
        self._tmp: Optional[str] = None
        if item.suffix == ".npy":
            self.value = _load_npy(item.data, "video")
        elif item.path is not None:
            self.value = item.path
        else:
            fd, self._tmp = tempfile.mkstemp(prefix="sparrow-video-", suffix=item.suffix or ".bin")
            with os.fdopen(fd, "wb") as f:
                f.write(item.data)
            self.value = self._tmp

    def close(self) -> None:
        if self._tmp is not None:
            try:
                os.unlink(self._tmp)
            except OSError:
                pass
            self._tmp = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


@dataclass
class CacheStats:
    hits: int = 0
    misses: int = 0
    bytes: int = 0
    items: int = 0


class MediaCache:
    """LRU of encoded media (the vision tower's output), capped by memory. Thread-safe."""

    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self._items: "OrderedDict[tuple, Media]" = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()
        self.stats = CacheStats()

    @staticmethod
    def key(ref: VisualRef, item: MediaBytes) -> tuple:
        digest = hashlib.blake2b(item.data, digest_size=20).hexdigest()
        return (ref.kind, digest, item.suffix, ref.fps, ref.num_frames, ref.max_pixels)

    def get(self, key: tuple) -> Optional[Media]:
        with self._lock:
            media = self._items.get(key)
            if media is None:
                self.stats.misses += 1
                return None
            self._items.move_to_end(key)
            self.stats.hits += 1
            return media

    def put(self, key: tuple, media: Media) -> None:
        size = media.embd.nbytes
        if size > self.max_bytes:
            return  # larger than the whole cache: keeping it would evict everything else for one item
        with self._lock:
            if key in self._items:
                return
            self._items[key] = media
            self._bytes += size
            while self._bytes > self.max_bytes:
                _, old = self._items.popitem(last=False)
                self._bytes -= old.embd.nbytes
            self.stats.bytes, self.stats.items = self._bytes, len(self._items)


@dataclass
class EncodedVisuals:
    items: list               # [(kind, Media)] in request order
    n_cached: int = 0         # of which the cache held
    encode_ms: float = 0.0    # fetching and hashing them all; decoding and the vision tower for the rest


def encode_visuals(engine, refs: list, loader: MediaLoader, cache: MediaCache, cancelled=None) -> EncodedVisuals:
    """Fetch, decode and encode refs (through the cache) with engine's vision file."""
    out = EncodedVisuals([])
    t0 = time.perf_counter()
    for ref in refs:
        if cancelled is not None and cancelled():
            break
        item = loader.load(ref)
        key = cache.key(ref, item)
        media = cache.get(key)
        if media is not None:
            out.items.append((ref.kind, media))
            out.n_cached += 1
            continue
        # a client that leaves stops the vision tower too (between its layers), not only the prefill
        if ref.kind == "image":
            encoded = engine.encode_visuals(images=[decode_image(item)], max_pixels=ref.max_pixels, abort=cancelled)
        else:
            with VideoInput(item) as video:
                encoded = engine.encode_visuals(video=video.value, fps=ref.fps, num_frames=ref.num_frames,
                                                max_pixels=ref.max_pixels, abort=cancelled)
        (kind, media), = encoded
        cache.put(key, media)
        out.items.append((kind, media))
    out.encode_ms = (time.perf_counter() - t0) * 1000.0
    return out
