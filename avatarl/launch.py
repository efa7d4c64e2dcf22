"""Hand a run over to Modal (TRAINING_MODE=modal, `--mode modal`, `make modal`)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

from avatarl.config import LAUNCHER_NAMES, config_fields, is_secret, read_dotenv


def settings_to_forward(env_file: str | None) -> dict[str, str]:
    """Every setting given in `.env` or the environment (environment wins); secrets are left out
    because they travel as Modal secrets, never as plain arguments."""
    names = set(config_fields()) | LAUNCHER_NAMES
    dotenv_path = Path(env_file or ".env")
    layered = {**(read_dotenv(dotenv_path) if dotenv_path.is_file() else {}), **os.environ}
    return {name: value for name, value in layered.items() if name in names and not is_secret(name)}


def hand_over_to_modal(env_file: str | None) -> int:
    try:
        import modal  # noqa: F401
    except ImportError:
        print("error: TRAINING_MODE=modal needs the Modal client: pip install 'avatarl[modal]' and run "
              "`modal setup` (or use TRAINING_MODE=generic to train on this machine).", file=sys.stderr)
        return 2
    from avatarl.modal_app import run_modal

    return run_modal(settings_to_forward(env_file))
