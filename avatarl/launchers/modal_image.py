"""The image the Modal functions run (training and `modal_prepare`): AVATARL_IMAGE pulled from its registry
when it names one (ghcr.io/you/avatarl:0.1.0, you/avatarl:0.1.0 on Docker Hub), else docker/Dockerfile built
by Modal from this checkout. Both are the image compose and Kubernetes run.

A name without a registry or namespace (compose's local tag avatarl:latest, which `make` exports by default)
exists only in this machine's Docker, where Modal cannot reach it: such a name builds the Dockerfile, and
says so.
"""

from __future__ import annotations

import re
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from avatarl.config import LAUNCHER_VARIABLES
from avatarl.errors import ConfigError

DOCKERFILE = "docker/Dockerfile"
# What `make` and compose call the image they build here.
LOCAL_DEFAULT = next(default for name, default, _ in LAUNCHER_VARIABLES if name == "AVATARL_IMAGE")
# Docker's reference grammar, simplified: [host[:port]/]path[:tag][@sha256:digest], lower-case paths.
_COMPONENT = r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*"
IMAGE_REFERENCE = re.compile(rf"(?:[A-Za-z0-9.-]+(?::[0-9]+)?/)?{_COMPONENT}(?:/{_COMPONENT})*"
                             r"(?::\w[\w.-]{0,127})?(?:@sha256:[0-9a-f]{64})?")


def image_setting(settings: Mapping[str, str]) -> str:
    """AVATARL_IMAGE of the settings, stripped ("" when unset); ConfigError for a value that is no image
    reference at all, so that a plan fails before anything reaches Modal."""
    name = settings.get("AVATARL_IMAGE", "").strip()
    if name and not IMAGE_REFERENCE.fullmatch(name):
        raise ConfigError([f"AVATARL_IMAGE={name!r} is not an image reference: give [registry/]name[:tag], "
                           "e.g. ghcr.io/you/avatarl:0.1.0 (lower-case name)."])
    return name


def pulled_from_registry(name: str) -> bool:
    """Whether Modal pulls image `name` (it names a registry or namespace) or builds the Dockerfile."""
    return "/" in name


def repo_root() -> Path:
    """The source checkout holding docker/Dockerfile, which is also the image's build context."""
    root = Path(__file__).resolve().parents[2]
    if not (root / DOCKERFILE).is_file():
        raise ConfigError([f"{root / DOCKERFILE} not found: run Modal from a source checkout (git clone ...; "
                           "pip install -e '.[modal]'), or set AVATARL_IMAGE to an image in a registry."])
    return root


def function_image(modal: Any, name: str) -> Any:
    """The modal.Image for AVATARL_IMAGE=`name` (image_setting); one line on stderr says which it is."""
    if pulled_from_registry(name):
        print(f"[avatarl] Modal image: {name} (AVATARL_IMAGE), pulled from its registry", file=sys.stderr)
        return modal.Image.from_registry(name)
    root = repo_root()
    why = (f"; AVATARL_IMAGE={name} is a local tag, which Modal cannot pull (push it to a registry and name "
           "that, e.g. ghcr.io/you/avatarl:0.1.0)" if name and name != LOCAL_DEFAULT else "")
    print(f"[avatarl] Modal image: {DOCKERFILE} of {root}, built by Modal{why}", file=sys.stderr)
    return modal.Image.from_dockerfile(str(root / DOCKERFILE), context_dir=str(root))
