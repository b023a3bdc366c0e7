"""`sparrow serve` under load, on loopback: requests/s and latency for 1, 2 and 4 concurrent
clients, and a video's first vs second question time to first token (the media cache and the KV
prefix at work).

    python bench/bench_server.py [--requests 24] [--parallel 4] [--threads 1] [--clips 8]
    python bench/bench_server.py -m target.gguf --mmproj mmproj.gguf --draft draft.gguf --video clip.mp4

By default it serves the shipped demo pair (a tiny video LLM and its Sparrow draft). Load: each
client sends chat requests one after another (a video question about a clip of its own, or text),
greedy, max_tokens 64, speculative (the server's default: chain, adaptive); printed are requests/s,
p50/p95 latency of whole (non-streamed) requests and the ratio of requests/s to one client's.
First vs second question: for fresh clips, one question, then another about the same clip, both
streamed; time to first token is measured by the client, the server's timings say how long the
media took (media_ms) and whether it was cached.
"""
from __future__ import annotations

import argparse
import base64
import io
import json
import os
import statistics
import sys
import threading
import time

import numpy as np

from compare_llamacpp import cpu_model  # bench/ is the script's folder, so on sys.path


def npy_uri(frames: np.ndarray) -> str:
    buf = io.BytesIO()
    np.save(buf, frames)
    return "data:application/x-npy;base64," + base64.b64encode(buf.getvalue()).decode()


def video_uri(path: str) -> str:
    ext = os.path.splitext(path)[1].lstrip(".").lower() or "mp4"
    with open(path, "rb") as f:
        return f"data:video/{ext};base64," + base64.b64encode(f.read()).decode()


def percentile(values: list, q: float) -> float:
    return float(np.percentile(np.array(values), q))


def chat(http, url: str, messages: list, extra: dict) -> dict:
    r = http.post(url + "/v1/chat/completions", json={"messages": messages, **extra})
    r.raise_for_status()
    return r.json()


def first_token(http, url: str, messages: list, extra: dict) -> tuple[float, dict]:
    """(seconds to the first non-empty content chunk, the last chunk's timings) of a streamed chat."""
    t0 = time.perf_counter()
    ttft, timings = None, {}
    with http.stream("POST", url + "/v1/chat/completions", json={"messages": messages, "stream": True, **extra}) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if ttft is None and chunk["choices"] and chunk["choices"][0]["delta"].get("content"):
                ttft = time.perf_counter() - t0
            timings = chunk.get("timings", timings)
    return ttft if ttft is not None else time.perf_counter() - t0, timings


class Server:
    """`sparrow serve` in a process of its own, so that the clients here do not share its
    interpreter lock; `url` is where it listens."""

    def __init__(self, cmd: list):
        import re
        import subprocess
        import tempfile

        # not from the checkout, whose sparrow_py has no compiled runtime: the installed one
        self.proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True, cwd=tempfile.gettempdir())
        line = ""
        while "http://" not in line:
            line = self.proc.stderr.readline()
            if not line and self.proc.poll() is not None:
                raise RuntimeError("the server did not start")
        self.url = re.search(r"http://[\w.:\[\]]+", line).group(0)
        # keep reading its log so that a full pipe never blocks it
        threading.Thread(target=lambda: [None for _ in self.proc.stderr], daemon=True).start()

    def __enter__(self) -> "Server":
        return self

    def __exit__(self, *exc) -> None:
        self.proc.terminate()
        self.proc.wait(30)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-m", "--model", help="target GGUF (default: the shipped demo target)")
    ap.add_argument("--mmproj", help="its vision GGUF")
    ap.add_argument("--draft", help="its Sparrow draft GGUF")
    ap.add_argument("--video", help="a video file for the questions (default: the demo's synthetic clips)")
    ap.add_argument("--requests", type=int, default=24, help="requests per concurrency level (default 24)")
    ap.add_argument("--parallel", type=int, default=4, help="server slots (default 4)")
    ap.add_argument("--threads", type=int, default=1, help="CPU threads per slot (default 1)")
    ap.add_argument("--clips", type=int, default=8, help="clips for the first vs second question (default 8)")
    ap.add_argument("--max-tokens", type=int, default=64)
    args = ap.parse_args()

    import httpx

    from sparrow_py.demo import demo_models, synthetic

    extra = {"max_tokens": args.max_tokens}
    if args.model:
        # absolute: the server runs outside the checkout (see Server)
        model, mmproj, draft = (os.path.abspath(p) if p else p for p in (args.model, args.mmproj, args.draft))
        videos = [video_uri(args.video)] if args.video else []
        fresh = list(videos)  # one file: one first question
    else:
        demo = demo_models()
        model, mmproj, draft = str(demo.target), str(demo.mmproj), str(demo.draft)
        extra["max_pixels"] = demo.max_pixels
        videos = [npy_uri(synthetic.clip(500 + i).frames) for i in range(4)]        # the load's clips
        fresh = [npy_uri(synthetic.clip(900 + i).frames) for i in range(args.clips)]  # first vs second question
    prompts = list(synthetic.PROMPTS)

    cmd = [sys.executable, "-m", "sparrow_py.cli", "serve", "-m", model, "--port", "0", "-np", str(args.parallel),
           "-t", str(args.threads), "-c", str(1024 * args.parallel), "--queue-size", "64", "--log-level", "warning"]
    cmd += ["--mmproj", mmproj] if mmproj else []
    cmd += ["--draft", draft] if draft else []
    print(f"# sparrow serve on loopback (its own process): {os.path.basename(model)}{' + draft' if draft else ''}, "
          f"{args.parallel} slots x {args.threads} thread(s), {cpu_model()}, {os.cpu_count()} cores")
    with Server(cmd) as server, httpx.Client(timeout=300) as http:
        def question(i: int) -> list:
            if videos and i % 2 == 0:
                return [{"role": "user", "content": [{"type": "video_url", "video_url": {"url": videos[i % len(videos)]}},
                                                     {"type": "text", "text": prompts[i % 3]}]}]
            return [{"role": "user", "content": prompts[i % 3] + f" ({i})"}]

        if mmproj and fresh:  # before the load, so that the first questions find nothing cached
            firsts, seconds, media_first, media_second, cached, kept = [], [], [], [], 0, []
            for url in fresh:
                q1, q2 = ([{"role": "user", "content": [{"type": "video_url", "video_url": {"url": url}},
                                                        {"type": "text", "text": p}]}] for p in prompts[:2])
                ttft1, t1 = first_token(http, server.url, q1, extra)
                ttft2, t2 = first_token(http, server.url, q2, extra)
                firsts.append(ttft1)
                seconds.append(ttft2)
                media_first.append(t1.get("media_ms", 0.0))
                media_second.append(t2.get("media_ms", 0.0))
                cached += t2.get("media_cached", 0)
                kept.append((t2.get("cache_n", 0), t2.get("cache_n", 0) + t2.get("prompt_n", 0)))
            f, s_ = statistics.median(firsts), statistics.median(seconds)
            print(f"video, time to first token (median of {len(firsts)} clips): first question {f * 1e3:.1f} ms "
                  f"(media {statistics.median(media_first):.1f} ms), second question {s_ * 1e3:.1f} ms "
                  f"(media {statistics.median(media_second):.1f} ms, cached {cached}/{len(seconds)}; "
                  f"prompt rows kept {statistics.median(k for k, _ in kept):.0f} of "
                  f"{statistics.median(n for _, n in kept):.0f}): {f / s_:.2f}x sooner")

        for i in range(4):  # warm up (and fill the media cache with the load's clips: the load measures serving)
            chat(http, server.url, question(i), extra)
        print(f"{'clients':>7} {'requests/s':>11} {'vs 1 client':>12} {'p50 ms':>8} {'p95 ms':>8} {'tokens/s':>9}")
        base = None
        for clients in (1, 2, 4):
            latencies, tokens, errors = [], [], []
            counter = iter(range(args.requests))
            lock = threading.Lock()

            def client() -> None:
                with httpx.Client(timeout=300) as own:
                    while True:
                        with lock:
                            i = next(counter, None)
                        if i is None:
                            return
                        t0 = time.perf_counter()
                        try:
                            r = chat(own, server.url, question(i), extra)
                        except Exception as e:  # noqa: BLE001 - counted and printed
                            errors.append(e)
                            continue
                        latencies.append(time.perf_counter() - t0)
                        tokens.append(r["usage"]["completion_tokens"])

            t0 = time.perf_counter()
            threads = [threading.Thread(target=client) for _ in range(clients)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            wall = time.perf_counter() - t0
            if errors:
                print(f"{clients} clients: {len(errors)} requests failed: {errors[0]}", file=sys.stderr)
                return 1
            rps = len(latencies) / wall
            base = base or rps
            print(f"{clients:>7} {rps:11.1f} {rps / base:11.2f}x {percentile(latencies, 50) * 1e3:8.1f} "
                  f"{percentile(latencies, 95) * 1e3:8.1f} {sum(tokens) / wall:9.0f}")

    return 0


if __name__ == "__main__":
    sys.exit(main())
