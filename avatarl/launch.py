"""Hand a run over to Modal (TRAINING_MODE=modal, `--mode modal`, `make modal`)."""

from __future__ import annotations

import sys
from collections.abc import Mapping


def hand_over_to_modal(env_file: str | None, cli: Mapping[str, str]) -> int:
    """Start the Modal run with this machine's settings (env > .env > flags); secrets travel as a
    Modal secret, never as function arguments."""
    try:
        import modal  # noqa: F401
    except ImportError:
        print("error: TRAINING_MODE=modal needs the Modal client: pip install 'avatarl[modal]' and run "
              "`modal setup` (or use TRAINING_MODE=generic to train on this machine).", file=sys.stderr)
        return 2
    from avatarl.modal_app import ModalSetupError, collect_settings, run_modal

    try:
        return run_modal(collect_settings(env_file, cli))
    except ModalSetupError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
