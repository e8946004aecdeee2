"""Files written whole or not at all: a temporary sibling, then an atomic rename; the sibling is removed when either
step fails (a folder in the way, a value JSON cannot hold), so no temporary file outlives a failure."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path


def write_json_atomic(path: str | Path, payload: dict) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", dir=path.parent, delete=False, suffix=".tmp") as f:
        temporary = Path(f.name)
        try:
            json.dump(payload, f, indent=2)
        except BaseException:
            f.close()
            temporary.unlink(missing_ok=True)
            raise
    try:
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
