"""`sparrow serve`'s settings and command line (llama-server's flag names where it has the flag)."""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Optional

from .protocol import Sampling


@dataclass
class ServerConfig:
    model: str
    mmproj: Optional[str] = None
    draft: Optional[str] = None
    alias: Optional[str] = None          # the model id clients see (default: the model file's name)
    host: str = "127.0.0.1"
    port: int = 8080
    api_key: Optional[str] = None
    parallel: int = 1                    # slots: contexts generating at once
    ctx_size: int = 0                    # total context tokens, split evenly among the slots (0: the model's, per slot)
    threads: int = 0                     # CPU threads per slot (0: the cores divided among the slots)
    batch_size: int = 256
    queue_size: int = 16                 # requests that may wait for a slot before the server answers 503
    media_path: Optional[str] = None
    allow_remote_media: bool = False
    max_upload_mb: float = 64.0          # request bodies and media items
    media_cache_mb: float = 512.0        # encoded media kept for reuse
    sampling: Sampling = field(default_factory=Sampling)

    @property
    def model_id(self) -> str:
        return self.alias or os.path.basename(self.model)

    @property
    def n_ctx_per_slot(self) -> int:
        return self.ctx_size // self.parallel if self.ctx_size else 0

    @property
    def threads_per_slot(self) -> int:
        if self.threads:
            return self.threads
        return max(1, (os.cpu_count() or 1) // self.parallel)

    @property
    def max_upload_bytes(self) -> int:
        return int(self.max_upload_mb * 1024 * 1024)

    def check(self) -> None:
        from sparrow_py.errors import SparrowError

        if self.parallel < 1:
            raise SparrowError(f"--parallel must be at least 1, not {self.parallel}")
        if self.ctx_size < 0 or (self.ctx_size and self.ctx_size // self.parallel < 16):
            raise SparrowError(f"--ctx-size {self.ctx_size} leaves too little context for {self.parallel} slots")
        if self.queue_size < 0:
            raise SparrowError(f"--queue-size must be >= 0, not {self.queue_size}")
        if self.max_upload_mb <= 0 or self.media_cache_mb < 0:
            raise SparrowError("--max-upload-mb must be > 0 and --media-cache-mb >= 0")
        if self.media_path is not None and not os.path.isdir(self.media_path):
            raise SparrowError(f"--media-path {self.media_path}: not a directory")


def add_serve_command(sub) -> None:
    p = sub.add_parser(
        "serve", help="serve a model over the OpenAI API (chat with videos and images, speculative decoding)",
        description="An OpenAI-compatible HTTP server: POST /v1/chat/completions (streamed or not; text, image_url, "
                    "video_url and input_video parts), POST /v1/completions, GET /v1/models, GET /health, GET /slots. "
                    "Needs the `server` extra: pip install \"sparrow-vidllm[server]\".")
    p.add_argument("-m", "--model", required=True, help="target GGUF model file")
    p.add_argument("--mmproj", help="the model's vision GGUF: requests may then carry images and videos")
    p.add_argument("--draft", "-md", "--model-draft", dest="draft",
                   help="Sparrow draft GGUF: requests decode speculatively (the output stays the model's own)")
    p.add_argument("-a", "--alias", help="the model id clients see in /v1/models (default: the model file's name)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8080, help="port to listen on (default 8080)")
    p.add_argument("--api-key", default=os.environ.get("SPARROW_API_KEY"),
                   help="require 'Authorization: Bearer KEY' on every endpoint but /health "
                        "(default: $SPARROW_API_KEY; none: no key needed)")
    p.add_argument("-np", "--parallel", type=int, default=1, help="slots: requests generating at once, each with its "
                                                                  "own context on the one loaded model (default 1)")
    p.add_argument("-c", "--ctx-size", type=int, default=0,
                   help="context tokens in all, split evenly among the slots as llama-server does (default 0: each "
                        "slot gets the model's training context, at most 32768)")
    p.add_argument("-t", "--threads", type=int, default=0, help="CPU threads per slot (default: the cores divided "
                                                                "among the slots)")
    p.add_argument("-b", "--batch-size", type=int, default=256, help="prompt tokens per forward pass (default 256)")
    p.add_argument("--queue-size", type=int, default=16,
                   help="requests that may wait for a free slot; more are answered 503 at once (default 16)")
    p.add_argument("--media-path", help="serve local media files under this folder (file:// URLs and paths in "
                                        "image_url / video_url parts); nothing outside it is read")
    p.add_argument("--allow-remote-media", action="store_true", help="fetch http(s) media URLs (refused by default)")
    p.add_argument("--max-upload-mb", type=float, default=64.0, help="largest request body and media item in MiB "
                                                                     "(default 64)")
    p.add_argument("--media-cache-mb", type=float, default=512.0,
                   help="memory for encoded images and videos kept for later questions (default 512 MiB)")
    g = p.add_argument_group("default generation settings (a request's own fields override them)")
    g.add_argument("-n", "--n-predict", type=int, default=-1, help="tokens to generate (-1: until the end of text or "
                                                                    "the context; default -1)")
    g.add_argument("--temp", type=float, default=0.0, help="temperature (default 0 = greedy)")
    g.add_argument("--top-k", type=int, default=0, help="top-k filter (0 = off)")
    g.add_argument("--top-p", type=float, default=1.0, help="top-p filter (1 = off)")
    g.add_argument("--min-p", type=float, default=0.0, help="min-p filter (0 = off)")
    g.add_argument("-s", "--seed", type=int, default=None, help="sampling seed")
    g.add_argument("--draft-max", "--n-draft", dest="n_draft", type=int, default=4,
                   help="with --draft: tokens drafted per verification, at most (default 4)")
    g.add_argument("--draft-p-min", type=float, default=0.0,
                   help="with --draft: a chain stops before a token, after its first, whose draft distribution's "
                        "likeliest token has a probability below this (0..1; default 0 = off)")
    g.add_argument("--speculative", choices=["chain", "tree"], default=None,
                   help="with --draft: a chain of --draft-max tokens or an EAGLE-2 dynamic tree (default chain)")
    g.add_argument("--no-adaptive", dest="adaptive", action="store_false",
                   help="always draft --draft-max tokens; by default each round drafts what pays on this machine")
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"],
                   help="uvicorn's log level (default info)")
    p.set_defaults(func=_serve)


def config_from_args(args) -> ServerConfig:
    sampling = Sampling(max_tokens=args.n_predict, temperature=args.temp, top_k=args.top_k, top_p=args.top_p,
                        min_p=args.min_p, seed=args.seed, speculative=args.speculative, n_draft=args.n_draft,
                        draft_p_min=args.draft_p_min, adaptive=args.adaptive)
    return ServerConfig(model=args.model, mmproj=args.mmproj, draft=args.draft, alias=args.alias, host=args.host,
                        port=args.port, api_key=args.api_key or None, parallel=args.parallel, ctx_size=args.ctx_size,
                        threads=args.threads, batch_size=args.batch_size, queue_size=args.queue_size,
                        media_path=args.media_path, allow_remote_media=args.allow_remote_media,
                        max_upload_mb=args.max_upload_mb, media_cache_mb=args.media_cache_mb, sampling=sampling)


def _serve(args) -> int:
    import sys

    from sparrow_py.errors import SparrowError

    try:
        from .launch import serve
    except ImportError as e:
        print(f"sparrow: error: `sparrow serve` needs the server extra: pip install \"sparrow-vidllm[server]\" ({e})",
              file=sys.stderr)
        return 1
    try:
        return serve(config_from_args(args), log_level=args.log_level)
    except SparrowError as e:
        print(f"sparrow: error: {e}", file=sys.stderr)
        return 1
