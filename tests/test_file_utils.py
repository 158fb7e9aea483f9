"""file_utils' writes on their own: the modes they give files, from several threads at once."""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor

import pytest

from diffusers_var import file_utils


def _write_from_threads(folder, count: int = 200) -> dict[str, int]:
    """``count`` files written by write_atomic from 8 threads (as sample.py writes its images); their modes."""

    def write(number: int) -> None:
        file_utils.write_atomic(folder / f"{number:04d}.txt", lambda tmp: tmp.write_bytes(b"x"))

    with ThreadPoolExecutor(8) as pool:
        list(pool.map(write, range(count)))
    return {path.name: path.stat().st_mode & 0o777 for path in folder.iterdir()}


@pytest.mark.parametrize("proc", [True, False], ids=["proc", "no-proc"])
def test_the_umask_is_read_without_changing_it_under_threads(tmp_path, monkeypatch, proc):
    """The probe: reading the umask set it to 0 and back on every write; writes from 8 threads gave files mode 0666
    and could leave the process's umask 0. Linux tells it in /proc (never set); elsewhere it is set and put back once
    for the process, under a lock."""
    if proc and file_utils._proc_umask() is None:
        pytest.skip("no /proc/self/status Umask line here")
    previous = os.umask(0o027)
    try:
        calls = []
        real_umask = os.umask

        def counted(mask: int) -> int:
            calls.append(mask)
            return real_umask(mask)

        monkeypatch.setattr(os, "umask", counted)
        if not proc:
            monkeypatch.setattr(file_utils, "_proc_umask", lambda: None)
            monkeypatch.setattr(file_utils, "_UMASK_READ", [])
        modes = _write_from_threads(tmp_path)
        monkeypatch.undo()
        assert len(modes) == 200 and set(modes.values()) == {0o640}
        assert len(calls) == (0 if proc else 2)  # no-proc: read once (set, put back), for all 200 writes
        assert os.umask(0o027) == 0o027  # left as it was
    finally:
        os.umask(previous)
