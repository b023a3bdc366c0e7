"""Sparrow desktop: a small Qt (PySide6) app that asks a video LLM about a video file and streams
its answer, with live speculative statistics. See app.py; run it with `python -m examples.desktop`."""
