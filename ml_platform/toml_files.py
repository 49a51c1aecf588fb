"""Reading a deployment's TOML override file (monitoring thresholds, unit prices): the file a
setting names, as a dict, with errors that name the setting and the file."""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any


def read_toml(path: str | Path, setting: str) -> dict[str, Any]:
    """The TOML document at `path`, which the environment variable `setting` named."""
    path = Path(path).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"{setting} names {path}, which does not exist")
    try:
        return tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as exc:
        raise ValueError(f"{path} ({setting}): not valid TOML: {exc}") from exc
