"""matplotlib for the commands that draw PNGs (`avatarl report`, `avatarl bench learning`): pyplot on the
file-only Agg backend, or an ImportError that says how to install it."""

from __future__ import annotations

from typing import Any


def require_pyplot(command: str) -> Any:
    """matplotlib.pyplot on the Agg backend (no display needed), or ImportError naming `command` (e.g.
    "avatarl report") and the install hint, for the caller to report in one line."""
    try:
        import matplotlib
    except ImportError:
        raise ImportError(f"`{command}` draws with matplotlib, which is not installed: "
                          "pip install 'avatarl[plot]' (or pip install matplotlib).") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt
