"""What every converter shares: safe checkpoint loading, rule-based key renaming, coverage checks,
and atomic writing of a diffusers folder."""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Callable, Iterable, Mapping

import torch

# Known scale schedules of the original repositories, by total token count L.
KNOWN_PATCH_NUMS = {
    680: (1, 2, 3, 4, 5, 6, 8, 10, 13, 16),  # 256 px
    2240: (1, 2, 3, 4, 6, 9, 13, 18, 24, 32),  # 512 px
    9451: (1, 2, 3, 4, 5, 7, 9, 12, 16, 21, 27, 36, 48, 64),  # 1024 px
}


class ConversionError(ValueError):
    """A checkpoint cannot be converted (wrong family, truncated, ambiguous configuration)."""


def load_checkpoint(path: str | os.PathLike, param_name: str) -> dict[str, torch.Tensor]:
    """Load an original ``.pth`` with ``torch.load(weights_only=True)`` (never executes pickled code).

    Errors name the command-line parameter (``param_name``) the file was given to.
    """
    path = Path(path)
    if not path.is_file():
        raise ConversionError(f"`{param_name}`: no such file {str(path)!r}.")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as err:  # truncated zip, pickle with code, not a torch file at all
        raise ConversionError(
            f"`{param_name}`: {str(path)!r} is not a readable PyTorch checkpoint (truncated, corrupted, or it "
            f"needs arbitrary code to unpickle, which is refused): {type(err).__name__}: {str(err).splitlines()[0][:200]}"
        ) from None
    if not isinstance(obj, Mapping):
        raise ConversionError(f"`{param_name}`: {str(path)!r} holds a {type(obj).__name__}, not a state dict.")
    return dict(obj)


def count_blocks(state_dict: Mapping, prefix: str, param_name: str, depth: int | None = None,
                 num_heads: int | None = None, width: int | None = None) -> int:
    """The number of ``{prefix}.N.`` blocks, every index from 0 present (a ConversionError lists the missing ones).

    A block removed at the end leaves no gap; the original's strict load catches it because its command line gives
    the depth. So does ``depth`` here; without it, a checkpoint with the release layout (``width = 64 * num_heads``,
    ``num_heads = depth``: every VAR and STAR release) must have ``num_heads`` blocks."""
    found = {int(m.group(1)) for k in state_dict if (m := re.match(rf"{re.escape(prefix)}\.(\d+)\.", k))}
    expected = depth
    if expected is None and num_heads is not None and width == 64 * num_heads:
        expected = num_heads  # release layout
    count = expected if expected is not None else (max(found) + 1 if found else 0)
    missing, extra = sorted(set(range(count)) - found), sorted(i for i in found if i >= count)
    if missing or extra:
        detail = f"no keys for {prefix} {missing}" if missing else f"more {prefix} than {count}: {extra}"
        source = "`--depth`" if depth is not None else ("the release layout (width 64 x heads)" if expected is not None
                                                          else "the block indices")
        raise ConversionError(f"`{param_name}`: {detail} (depth {count} from {source}): a truncated or edited "
                              f"checkpoint{'' if depth is not None else '; pass --depth to convert another layout'}.")
    return count


def find_state_dict(obj: Mapping, candidates: Iterable[tuple[str, ...]], looks_right: Callable[[Mapping], bool], param_name: str) -> dict:
    """Return the model state dict inside a checkpoint: the object itself, or a nested entry such as
    ``ckpt['trainer']['var_wo_ddp']`` (training snapshots); strips a DDP ``module.`` prefix."""
    for path in ((),) + tuple(candidates):
        node = obj
        for key in path:
            node = node.get(key) if isinstance(node, Mapping) else None
        if isinstance(node, Mapping):
            tensors = {k: v for k, v in node.items() if isinstance(v, torch.Tensor)}
            if tensors and all(k.startswith("module.") for k in tensors):
                tensors = {k[len("module.") :]: v for k, v in tensors.items()}
            if tensors and looks_right(tensors):
                return tensors
    raise ConversionError(f"`{param_name}`: no state dict of the expected model family was found in the checkpoint.")


def rename_keys(keys: Iterable[str], rules: list[tuple[str, str]], param_name: str) -> dict[str, str]:
    """Map every original key through the first matching ``(regex, replacement)`` rule.
    A replacement starting with ``@`` marks a derived key (checked, not stored)."""
    compiled = [(re.compile(pattern + r"\Z"), repl) for pattern, repl in rules]
    mapping, unknown = {}, []
    for key in keys:
        for pattern, repl in compiled:
            if pattern.match(key):
                mapping[key] = pattern.sub(repl, key)
                break
        else:
            unknown.append(key)
    if unknown:
        raise ConversionError(f"`{param_name}`: unexpected keys for this model family: {unknown[:8]}{' ...' if len(unknown) > 8 else ''}.")
    return mapping


def load_into(model: torch.nn.Module, state_dict: dict[str, torch.Tensor], param_name: str) -> None:
    """Strictly load converted weights (every parameter and persistent buffer, matching shapes)."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state_dict))
    extra = sorted(set(state_dict) - set(expected))
    wrong = [k for k in state_dict if k in expected and tuple(expected[k].shape) != tuple(state_dict[k].shape)]
    if missing or extra or wrong:
        raise ConversionError(
            f"`{param_name}`: checkpoint does not fit the inferred configuration (missing {missing[:5]}, "
            f"unexpected {extra[:5]}, wrong shapes {wrong[:5]})."
        )
    model.load_state_dict({k: v.to(expected[k].dtype) for k, v in state_dict.items()}, strict=True, assign=False)


def atomic_save_pipeline(pipeline, output_dir: str | os.PathLike, overwrite: bool = False) -> Path:
    """``save_pretrained`` into a temporary folder next to ``output_dir``, then rename it into place.

    A failure at any point leaves an existing ``output_dir`` untouched; with ``overwrite`` the old folder
    is only removed after the new one is complete.
    """
    output_dir = Path(output_dir).resolve()
    if output_dir.exists() and not overwrite:
        raise ConversionError(f"`output`: {str(output_dir)!r} already exists (pass overwrite / --overwrite to replace it).")
    output_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{output_dir.name}.tmp-", dir=output_dir.parent))
    os.chmod(tmp, 0o755)  # mkdtemp makes it private
    try:
        pipeline.save_pretrained(tmp, safe_serialization=True)
        pickles = [p.name for p in tmp.rglob("*") if p.suffix in {".bin", ".pth", ".pt", ".pkl", ".ckpt"}]
        if pickles:
            raise ConversionError(f"refusing to write pickle files: {pickles}")
        backup = None
        if output_dir.exists():
            backup = output_dir.with_name(f".{output_dir.name}.old-{os.getpid()}")
            os.replace(output_dir, backup)
        try:
            os.replace(tmp, output_dir)
        except BaseException:
            if backup is not None:
                os.replace(backup, output_dir)
            raise
        if backup is not None:
            shutil.rmtree(backup, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return output_dir
