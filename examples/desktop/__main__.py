"""`python -m examples.desktop [VIDEO]`: the desktop app (app.py)."""
import sys
from pathlib import Path

# `python -m` puts the checkout first on sys.path, where sparrow_py has no compiled runtime unless
# it was installed editable: drop it, so the installed package is imported (as tests/conftest.py
# does). This package itself is already imported, and app is found through its own __path__.
_CHECKOUT = Path(__file__).resolve().parents[2]
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _CHECKOUT]

from .app import main  # noqa: E402 - after the sys.path fix

sys.exit(main())
