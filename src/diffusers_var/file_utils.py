"""Files written whole or not at all: the content goes to a temporary file next to its target, which a rename then
puts in place, so a reader (or a restarted run) never sees half a file and an interrupted write leaves the old one.
Also the JSON-lines reading and the image-folder walk that the commands share."""

from __future__ import annotations

import errno
import json
import logging
import os
import re
import shutil
import socket
import tempfile
import threading
import time
from pathlib import Path
from typing import Callable

logger = logging.getLogger(__name__)

STAGING_MARKER = "diffusers-var-staging.json"
# the converters' list of the files they wrote (conversion/common.py's MANIFEST_NAME: that module also runs alone);
# --overwrite replaces a folder only when every file in it is listed, so a save into the folder adds its files
CONVERSION_MANIFEST = ".diffusers-var-manifest.json"
# in a folder whose files a save is replacing one by one; removed when the last has moved (see save_folder_atomic)
SAVING_MARKER = ".diffusers-var-saving.json"


def text_lines(text: str) -> list[str]:
    """The lines of a text file: split at ``\n`` (``\r\n`` too) only. ``str.splitlines`` also splits at form feeds,
    U+2028 and other separators, which a prompt or a JSON string may hold."""
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    return [line[:-1] if line.endswith("\r") else line for line in lines]


ATOMIC_TEMPORARY = re.compile(r"\.(?P<name>.+)\.\d+-\d+\.tmp\Z")  # write_atomic's temporary names


def is_atomic_temporary(name: str, of: str | None = None) -> bool:
    """Whether ``name`` is a temporary file of :func:`write_atomic` (of the file ``of``, if given), which a killed
    process may have left: the only hidden files the package removes."""
    match = ATOMIC_TEMPORARY.match(name)
    return match is not None and (of is None or match["name"] == of)


def _atomic_temporary(path: Path) -> Path:
    return path.with_name(f".{path.name}.{os.getpid()}-{threading.get_ident()}.tmp")


def _name_max(path: Path) -> int:
    """The longest file name, in bytes, that the file system of ``path``'s nearest existing folder takes (255, the
    usual limit, when it cannot be asked)."""
    folder = Path(path)
    while not os.path.isdir(folder) and folder.parent != folder:  # (os.path.isdir never raises; Path.is_dir does)
        folder = folder.parent
    try:
        return os.pathconf(folder, "PC_NAME_MAX")
    except (OSError, ValueError, AttributeError):  # AttributeError: no os.pathconf (Windows)
        return 255


def path_problem(path) -> str | None:
    """Why ``path`` cannot be looked up, else None (a path that is not there is no problem here): a name in it
    longer than the file system takes, or a look-up error other than "not there" (a path past the system's length
    limit, a folder we may not search). ``Path.exists()`` / ``is_dir()`` / ``is_file()`` raise these instead of
    answering False: check it first, and put the reason after the flag."""
    path = Path(path)
    limit = _name_max(path)
    for part in path.parts:
        size = len(os.fsencode(part))
        if size > limit:
            return f"the name {part[:40]!r}... in it is {size} bytes long, more than the {limit} the file system takes"
    try:
        os.stat(path)
    except OSError as err:
        if err.errno not in (errno.ENOENT, errno.ENOTDIR, errno.ELOOP, errno.EBADF):  # those pathlib answers False to
            return f"it cannot be looked up ({err.strerror or type(err).__name__})"
    except ValueError:  # an embedded NUL byte
        return "it holds a NUL character"
    return None


def _temporary_name_problem(path: Path, temporary: str, kind: str) -> str | None:
    """Why ``temporary``, a name made from ``path``'s to sit in its folder, is past the file system's limit on a name
    there, else None (``kind``: "file" or "folder", for the message)."""
    limit = _name_max(path.parent)
    extra = len(os.fsencode(temporary)) - len(os.fsencode(path.name))
    if len(os.fsencode(path.name)) + extra > limit:
        return f"the {kind} name {path.name[:40]!r}... is too long: at most {limit - extra} bytes here"
    return None


def atomic_name_problem(path: Path) -> str | None:
    """Why :func:`write_atomic` cannot write ``path`` (its temporary name, about 30 bytes longer than the name, is
    past the file system's limit on a name), else None: checked before the work whose result it writes."""
    path = Path(path)
    return _temporary_name_problem(path, _atomic_temporary(path).name, "file")


def staging_name_problem(path: Path, prefix: str) -> str | None:
    """Why a staging folder ``prefix`` + the 8 random characters of ``tempfile.mkdtemp``, made next to the folder
    ``path`` to become it, cannot be made (its name past the file system's limit), else None."""
    return _temporary_name_problem(Path(path), prefix + "x" * 8, "folder")


def write_atomic(path: Path, write: Callable[[Path], None], may_write_nothing: bool = False) -> None:
    """``write(tmp)`` then rename ``tmp`` to ``path`` (the temporary name is hidden and unique to the process and
    thread; it is removed when writing fails). ``may_write_nothing``: a ``write`` that made no file leaves ``path``
    as it is (a save function that writes on one process only)."""
    path = Path(path)
    problem = atomic_name_problem(path)
    if problem:  # (the temporary's ENAMETOOLONG, raised again by its clean-up, hid the cause)
        raise ValueError(f"cannot write {str(path)!r}: {problem}.")
    tmp = _atomic_temporary(path)
    try:
        write(tmp)
        if may_write_nothing and not tmp.exists():
            return
        os.chmod(tmp, _default_file_mode())  # safetensors writes 0600: others could not load what we save
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def is_hub_repo_id(text: str, bare_names: bool = False) -> bool:
    """Whether ``text`` is shaped like a Hugging Face Hub repository id: ``org/name`` (models), or also a bare
    ``name`` with ``bare_names`` (datasets, and what the Hub resolves for legacy models)."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(str(text))
    except HFValidationError:
        return False
    return bare_names or "/" in str(text)


def write_text_atomic(path: Path, text: str) -> None:
    write_atomic(path, lambda tmp: tmp.write_text(text))


def process_alive(pid: int) -> bool:
    """Whether a process of this host runs under ``pid``."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def _proc_umask() -> int | None:
    """The process's umask as Linux (4.7 and later) tells it, without changing it; None elsewhere."""
    try:
        with open("/proc/self/status", encoding="ascii", errors="replace") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    return None


_UMASK_LOCK = threading.Lock()
_UMASK_READ: list[int] = []  # where /proc cannot tell it: the umask, read once


def _umask() -> int:
    """The process's umask, unchanged: write_atomic runs in several threads (sample.py's images), and ``os.umask``,
    which reads it by setting it for every thread at once, gave files made meanwhile mode 0666 and could leave it 0
    for good (two reads at once). Where the system cannot tell it (no /proc), it is read so once, under a lock; a
    later change of the umask is not seen there."""
    umask = _proc_umask()
    if umask is not None:
        return umask
    with _UMASK_LOCK:
        if not _UMASK_READ:
            _UMASK_READ.append(os.umask(0o077))  # (the safer value, for the moment it is set)
            os.umask(_UMASK_READ[0])
        return _UMASK_READ[0]


def _default_folder_mode() -> int:
    """The mode a new folder gets under the process's umask (``mkdtemp`` makes 0700)."""
    return 0o777 & ~_umask()


def _default_file_mode() -> int:
    """The mode a new file gets under the process's umask (safetensors' ``save_file`` makes 0600)."""
    return 0o666 & ~_umask()


# Weight files that a component's new save makes stale: the shard index of its weights name and variant, which a
# loader would read in place of a new single file, and the shards that index lists; for a new sharded save, the single
# file of that name and variant, which transformers reads in place of a new index (diffusers reads the index first).
# A single file over a single file is replaced by name. Another variant's files are left alone (they load on their own,
# ``variant=``), and so are shards no index lists and other formats (``.bin``: never read here). Stale files that a
# converted folder's manifest lists (ours) or whose index says a save of the package wrote them are deleted; others
# (a single file carries no such mark) are moved into a hidden ``.replaced-<time>`` folder beside them: files the
# package did not write are never deleted.
_WEIGHT_NAME = re.compile(
    r"(?P<stem>[^.]+?)(\.(?P<variant>\w+))?(-\d{5}-of-\d{5})?\.safetensors\Z"
    r"|(?P<index_stem>[^.]+)\.safetensors\.index(\.(?P<index_variant>\w+))?\.json\Z"
)


def _weight_key(name: str) -> tuple[str, str | None] | None:
    """``(stem, variant)`` of ``stem[.variant][-00001-of-00002].safetensors`` or its index
    ``stem.safetensors.index[.variant].json``; ``None`` for other files."""
    match = _WEIGHT_NAME.match(name)
    if match is None:
        return None
    if match["stem"] is not None:
        return match["stem"], match["variant"]
    return match["index_stem"], match["index_variant"]


# a shard index that a save of the package wrote names it in its metadata: its stale shards are ours to delete
_INDEX_WRITER = {"written_by": "diffusers-var"}


def _stale_weight_files(folder: Path, written: set[str]) -> list[tuple[Path, bool]]:
    """In ``folder``, read before the new files move in: the shard indices of the weights names and variants of the
    files being ``written`` there (unless rewritten) and the shards each lists (same name and variant, not rewritten),
    and the single file of a name and variant written as shards: what a loader would read in place of the new files,
    or shards no index will list; each with whether the index says a save of the package wrote it
    (:func:`_tag_shard_indices`; a single file: never known here). An index that cannot be read is stale itself (not
    ours), its shards are kept."""
    stale = []
    for stem, variant in {_weight_key(name) for name in written} - {None}:
        dot_variant = f".{variant}" if variant else ""
        shard = re.compile(rf"{re.escape(stem + dot_variant)}-\d{{5}}-of-\d{{5}}\.safetensors\Z")
        index = folder / f"{stem}.safetensors.index{dot_variant}.json"
        single = folder / f"{stem}{dot_variant}.safetensors"
        if index.name in written and single.name not in written and single.is_file():
            stale.append((single, False))
        if not index.is_file():
            continue
        try:
            content = json.loads(index.read_text())
            listed = set(content.get("weight_map", {}).values())
            ours = (content.get("metadata") or {}).get("written_by") == _INDEX_WRITER["written_by"]
        except (OSError, ValueError, AttributeError):
            listed, ours = set(), False
        if index.name not in written:
            stale.append((index, ours))
        stale += [
            (folder / name, ours)
            for name in listed
            if isinstance(name, str) and shard.match(name) and name not in written and (folder / name).is_file()
        ]
    return stale


def _tag_shard_indices(folder: Path) -> None:
    """Name the package in the metadata of the shard indices a save wrote into ``folder`` (staging): a later save
    that makes their shards stale deletes them, where shards of others are moved aside."""
    for index in folder.rglob("*.safetensors.index*.json"):
        try:
            content = json.loads(index.read_text())
        except (OSError, ValueError):
            continue
        if isinstance(content, dict):
            metadata = content.get("metadata") if isinstance(content.get("metadata"), dict) else {}
            content["metadata"] = {**metadata, **_INDEX_WRITER}
            index.write_text(json.dumps(content, indent=2, sort_keys=True) + "\n")


def entries_starting_with(folder: Path, prefix: str) -> list[Path]:
    """The entries of ``folder`` whose names start with ``prefix`` (``glob`` would read ``[ ] * ?`` in a folder's
    name as a pattern, and miss its own staging folders)."""
    return [path for path in folder.iterdir() if path.name.startswith(prefix)]


def model_index_components(model_index: dict) -> list[str]:
    """The components a pipeline folder's ``model_index.json`` names with a library and class (``[library, class]``),
    each loaded from the subfolder of its name; not its settings (``default_size``, ``_class_name``, ...)."""
    return [
        name
        for name, entry in model_index.items()
        if isinstance(entry, (list, tuple)) and len(entry) == 2 and all(isinstance(part, str) for part in entry)
    ]


def _clean_stale_staging(folder: Path, prefix: str) -> None:
    """Remove staging folders ``folder/<prefix>*`` that a killed save of this host left (marker checked)."""
    for staging in entries_starting_with(folder, prefix):
        try:
            marker = json.loads((staging / STAGING_MARKER).read_text())
        except (OSError, ValueError):
            continue  # not recognisably ours: never touched
        if isinstance(marker, dict) and marker.get("host") == socket.gethostname():
            if not process_alive(int(marker.get("pid", -1))):
                shutil.rmtree(staging, ignore_errors=True)


def make_folder(path: Path, name: str) -> None:
    """``path`` and its missing parents (``mkdir -p``); a folder that cannot be made (a file in the way, no permission,
    a read-only or virtual file system) is a ValueError naming the parameter ``name``."""
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        reason = err.strerror or type(err).__name__
        raise ValueError(f"`{name}` {str(path)!r} cannot be made: {reason} ({err.filename or path}).") from None


def save_folder_atomic(target: Path, save: Callable[[Path], None]) -> Path:
    """``save(folder)`` into a hidden staging folder, then into ``target``.

    A new ``target`` appears whole, by one rename (the staging folder sits next to it). Into an existing one (the
    staging folder sits inside it, on the same filesystem as every file it replaces) each new file is renamed over
    its old version, so each file is whole at any moment; only then are the old shards and shard indices of a
    rewritten component removed (a loader would read them in place of a new single file). Files of the user's that
    the save does not write are kept. A save that fails leaves ``target`` as it was; one killed while the files move
    can leave some of them new, and leaves :data:`SAVING_MARKER` in ``target``, which the loaders refuse
    (:func:`refuse_interrupted_save`) until a save into it completes. Staging folders of killed saves are removed by
    the next save."""
    target = Path(target)
    # before any work: these were raw OS errors (a NUL: "embedded null byte") that did not name the parameter
    problem = path_problem(target)
    if problem is None and target.is_symlink() and not target.exists():
        problem = f"it is a link to {os.readlink(target)!r}, which leads to nothing"
    if problem is None and not target.exists():
        problem = staging_name_problem(target, f".{target.name}.saving-")  # the staging folder beside it
    if problem:
        raise ValueError(f"`save_directory` {str(target)!r} cannot be saved into: {problem}.")
    if target.exists() and not target.is_dir():
        raise ValueError(f"`save_directory` {str(target)!r} is a file, not a folder.")
    existing = target.exists()
    if not existing:
        make_folder(target.parent, "save_directory")
    where, prefix = (target, ".saving-") if existing else (target.parent, f".{target.name}.saving-")
    if not os.access(where, os.W_OK | os.X_OK):  # (mkdtemp's bare OSError named no parameter)
        raise ValueError(f"`save_directory`: {str(where)!r} is not writable; nothing was saved.")
    _clean_stale_staging(where, prefix)
    try:
        staging = Path(tempfile.mkdtemp(prefix=prefix, dir=where))
    except OSError as err:  # a folder that takes no new entries (/proc) though os.access says it is writable
        raise ValueError(
            f"`save_directory`: cannot make a folder in {str(where)!r} ({err.strerror or err}); nothing was saved."
        ) from None
    try:
        (staging / STAGING_MARKER).write_text(json.dumps({"host": socket.gethostname(), "pid": os.getpid()}))
        new = staging / "new"
        save(new)
        _tag_shard_indices(new)
        files = [path for path in new.rglob("*") if path.is_file()]
        file_mode = _default_file_mode()
        for path in files:  # safetensors writes 0600: other users could not load the folder
            os.chmod(path, file_mode)
        if not existing:
            os.chmod(new, _default_folder_mode())
            os.replace(new, target)
            return target
        written = sorted(path.relative_to(new) for path in files)
        _check_destinations(target, written)  # before anything moves: a refusal leaves the folder as it was
        marker = target / SAVING_MARKER  # until every file has moved, a loader refuses the mix of old and new
        write_text_atomic(
            marker, json.dumps({"host": socket.gethostname(), "pid": os.getpid(), "files": len(written)})
        )
        stale = [  # read from the old indices before the new files replace them
            old
            for folder in {relative.parent for relative in written}
            for old in _stale_weight_files(target / folder, {r.name for r in written if r.parent == folder})
        ]
        for relative in written:
            (target / relative).parent.mkdir(parents=True, exist_ok=True)
            os.replace(new / relative, target / relative)
        _remove_stale_weights(target, stale)
        _list_in_conversion_manifest(target, written)
        marker.unlink(missing_ok=True)
        return target
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _remove_stale_weights(target: Path, stale: list[tuple[Path, bool]]) -> None:
    """Delete the stale weight files that a save of the package wrote (their index says so, or ``target``'s
    conversion manifest lists them); move the others into ``.replaced-<time>`` in their folder (a loader does not
    look there), with a warning."""
    listed = _manifest_files(target)
    aside = {}
    for old, ours in stale:
        if ours or old.relative_to(target).as_posix() in listed:
            old.unlink(missing_ok=True)
        elif old.is_file():
            folder = aside.get(old.parent)
            if folder is None:
                folder = aside[old.parent] = old.parent / time.strftime(".replaced-%Y%m%d-%H%M%S")
                folder.mkdir(exist_ok=True)
            os.replace(old, folder / old.name)
    for folder in aside.values():
        logger.warning(
            "moved weight files that the new save replaces (not known to be written by diffusers-var, so not "
            "deleted) into %s; a loader reads the new files",
            folder,
        )


def _our_manifest(target: Path) -> dict | None:
    """``target``'s conversion manifest, if it is one of ours with its list of files."""
    try:
        manifest = json.loads((target / CONVERSION_MANIFEST).read_text())
    except (OSError, ValueError):
        return None  # no manifest (a folder the converters did not write), or not one of ours
    ours = isinstance(manifest, dict) and manifest.get("written_by") == "diffusers-var"  # (common.py's WRITER)
    return manifest if ours and isinstance(manifest.get("files"), list) else None


def _manifest_of(target: Path) -> tuple[Path, str, dict] | None:
    """``(folder, prefix, manifest)``: the conversion manifest that lists files saved into ``target``, its own or,
    for a component folder the converter wrote (a model's ``save_pretrained`` into it), its pipeline folder's, with
    the prefix of ``target``'s files there; None without one of ours."""
    manifest = _our_manifest(target)
    if manifest is not None:
        return target, "", manifest
    prefix = f"{target.name}/"
    manifest = _our_manifest(target.parent)
    if manifest is not None and any(str(name).startswith(prefix) for name in manifest["files"]):
        return target.parent, prefix, manifest
    return None


def _manifest_files(target: Path) -> set[str]:
    """The files of ``target`` that our conversion manifest lists, relative to ``target`` (empty without one)."""
    found = _manifest_of(target)
    if found is None:
        return set()
    _, prefix, manifest = found
    return {name.removeprefix(prefix) for name in map(str, manifest["files"]) if name.startswith(prefix)}


def _list_in_conversion_manifest(target: Path, written: list[Path]) -> None:
    """Add the files a save wrote into a converted folder (or into one of its component folders) to its manifest: a
    later ``--overwrite`` of the folder (which replaces only folders whose every file is listed) refused the new
    files, e.g. a ``variant`` save's."""
    found = _manifest_of(target)
    if found is None:
        return
    folder, prefix, manifest = found
    names = {prefix + relative.as_posix() for relative in written}
    manifest["files"] = sorted(set(map(str, manifest["files"])) | names)
    write_text_atomic(folder / CONVERSION_MANIFEST, json.dumps(manifest, indent=1) + "\n")


def _check_destinations(target: Path, written: list[Path]) -> None:
    """A ValueError naming ``save_directory`` when a file of the save cannot be moved into ``target``: a file of the
    user's where a component folder goes, a folder where a file goes, or a folder that is not writable."""
    for folder in sorted({relative.parent for relative in written}):
        places = [target / folder, *(target / parent for parent in folder.parents)]  # up to ``target`` itself
        blocking = next((place for place in places if place.exists() and not place.is_dir()), None)
        if blocking is not None:
            raise ValueError(
                f"`save_directory`: {str(blocking)!r} is a file where the save puts a folder; move it away first."
            )
        existing = next(place for place in places if place.exists())
        if not os.access(existing, os.W_OK | os.X_OK):
            raise ValueError(f"`save_directory`: {str(existing)!r} is not writable; nothing was saved into it.")
    for relative in written:
        if (target / relative).is_dir():
            raise ValueError(
                f"`save_directory`: {str(target / relative)!r} is a folder where the save writes a file; move it "
                "away first."
            )


SAFETENSORS_ONLY = (
    "safe_serialization=False: diffusers-var writes safetensors only (a pickle can run code when loaded); writing "
    "safetensors."
)


def refuse_interrupted_save(folder) -> None:
    """A ValueError naming ``pretrained_model_name_or_path`` when ``folder`` (a pipeline or component folder), or its
    parent (the pipeline of a component), holds the marker a killed save left; nothing for other paths (Hub ids)."""
    folder = Path(folder)
    for place in (folder, folder.parent):
        if (place / SAVING_MARKER).is_file():
            raise ValueError(
                f"`pretrained_model_name_or_path`: {str(place)!r} was left partly rewritten by a save_pretrained that "
                "did not finish (some files new, some old, which may not belong together); save into it again, or "
                f"delete {SAVING_MARKER!r} there if you know its files match."
            )


def json_lines(lines: list[str], path: Path, flag: str) -> list[tuple[int, object]]:
    """``(line number, value)`` of every non-blank line of a JSON-lines file; a line that is not JSON is a
    ValueError naming ``flag``, the file and the line."""
    entries = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            entries.append((number, json.loads(line, parse_constant=_refuse_constant)))
        except json.JSONDecodeError as err:
            raise ValueError(f"`{flag}` {str(path)!r} line {number} is not JSON ({err.msg}).") from None
        except ValueError as err:  # NaN / Infinity: Python's json reads them, no other JSON reader does
            raise ValueError(f"`{flag}` {str(path)!r} line {number}: {err}.") from None
    return entries


def _refuse_constant(name: str):
    raise ValueError(f"{name} is not JSON (write a number, or the value as a string)")


def is_hidden(name: str) -> bool:
    """A file or folder name that :func:`files_under` leaves out (``.ipynb_checkpoints``, ``__MACOSX``)."""
    return name.startswith((".", "__"))


def files_under(root: Path, wanted: Callable[[str], bool], broken_links: bool = False) -> list[Path]:
    """The files under ``root`` whose names ``wanted(name)`` accepts, sorted. Folder links are followed (each real
    folder once, so a link back up is no loop); hidden files and folders (``.ipynb_checkpoints``, ``__MACOSX``) are
    left out, as HF ``datasets``' imagefolder does. With ``broken_links``, links to nothing are listed too (their
    reader then says what it cannot read: an image set that left them out was smaller than its folder, silently)."""
    found, seen = [], set()
    for folder, subfolders, names in os.walk(root, followlinks=True):
        real = os.path.realpath(folder)
        if real in seen:
            subfolders[:] = []
            continue
        seen.add(real)
        subfolders[:] = sorted(name for name in subfolders if not is_hidden(name))
        found += [Path(folder, name) for name in names if not is_hidden(name) and wanted(name)]
    return sorted(path for path in found if path.is_file() or (broken_links and path.is_symlink()))
