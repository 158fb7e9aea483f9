"""Files written whole or not at all: the content goes to a temporary file next to its target, which a rename then
puts in place, so a reader (or a restarted run) never sees half a file and an interrupted write leaves the old one."""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Callable


def write_atomic(path: Path, write: Callable[[Path], None]) -> None:
    """``write(tmp)`` then rename ``tmp`` to ``path`` (the temporary name is hidden and unique to the process)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)  # only left when writing failed


def write_text_atomic(path: Path, text: str) -> None:
    write_atomic(path, lambda tmp: tmp.write_text(text))


# The weight files diffusers / transformers write for a weights name ``stem`` (single file, shards and their index):
# the files a new save of that component replaces, and the only ones a save into an existing folder removes.
def _weight_file_pattern(stem: str) -> re.Pattern:
    return re.compile(rf"{re.escape(stem)}(-\d{{5}}-of-\d{{5}})?\.(safetensors|bin)(\.index\.json)?\Z")


def _weight_stem(name: str) -> str | None:
    match = re.match(r"(.+?)(-\d{5}-of-\d{5})?\.(safetensors|bin)(\.index\.json)?\Z", name)
    return match.group(1) if match else None


def save_folder_atomic(target: Path, save: Callable[[Path], None]) -> Path:
    """``save(folder)`` into a hidden staging folder next to ``target``, then into place: a new ``target`` appears
    whole by one rename; into an existing one each file is renamed over its old version (files of the user's that
    the save does not write are kept; old weight files of a component the save rewrites, e.g. the shards of an
    earlier sharded save, are removed so that they cannot be loaded in place of the new ones). An interrupted save
    leaves ``target`` as it was (a new one does not appear) and no staging folder behind."""
    target = Path(target)
    if target.exists() and not target.is_dir():
        raise ValueError(f"`save_directory` {str(target)!r} is a file, not a folder.")
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.saving-", dir=target.parent))
    try:
        save(staging)
        os.chmod(staging, 0o755)  # mkdtemp's 0700 would carry over to a new target
        if not target.exists():
            os.replace(staging, target)
            return target
        written = sorted(path for path in staging.rglob("*") if path.is_file())
        for folder in {path.parent for path in written}:
            new_names = {path.name for path in written if path.parent == folder}
            patterns = [_weight_file_pattern(stem) for stem in filter(None, map(_weight_stem, new_names))]
            old_folder = target / folder.relative_to(staging)
            for old in old_folder.iterdir() if old_folder.is_dir() else ():
                if old.is_file() and old.name not in new_names and any(p.match(old.name) for p in patterns):
                    old.unlink()
        for path in written:
            destination = target / path.relative_to(staging)
            destination.parent.mkdir(parents=True, exist_ok=True)
            os.replace(path, destination)
        return target
    finally:
        shutil.rmtree(staging, ignore_errors=True)
