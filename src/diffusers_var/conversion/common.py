"""What every converter shares: safe checkpoint loading, rule-based key renaming, coverage checks,
and atomic writing of a diffusers folder."""

from __future__ import annotations

import argparse
import collections
import contextlib
import itertools
import json
import logging
import math
import os
import re
import shutil
import socket
import sys
import tempfile
import time
import warnings
import zipfile
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

# Known scale schedules of the original repositories, by total token count L.
KNOWN_PATCH_NUMS = {
    680: (1, 2, 3, 4, 5, 6, 8, 10, 13, 16),  # 256 px
    2240: (1, 2, 3, 4, 6, 9, 13, 18, 24, 32),  # 512 px
    9451: (1, 2, 3, 4, 5, 7, 9, 12, 16, 21, 27, 36, 48, 64),  # 1024 px
}


class ConversionError(ValueError):
    """A checkpoint cannot be converted (wrong family, truncated, ambiguous configuration)."""


class ConversionWarning(UserWarning):
    """A conversion that works but is probably not what was meant (the converters print it as one line)."""


@contextlib.contextmanager
def warnings_as_lines():
    """On the command line a :class:`ConversionWarning` is one line, ``warning: ...``, on stderr (not the
    ``file:line: category`` form of :mod:`warnings`); other warnings are shown as usual."""
    shown = warnings.showwarning

    def show(message, category, filename, lineno, file=None, line=None):
        if issubclass(category, ConversionWarning):
            print(f"warning: {message}", file=sys.stderr)
        else:
            shown(message, category, filename, lineno, file, line)

    with warnings.catch_warnings():
        warnings.simplefilter("always", ConversionWarning)
        warnings.showwarning = show
        yield


# ----------------------------------------------------------------------------------------------
# Values of the converters' flags: checked when the command line is parsed (before any checkpoint is read; the
# argparse types below) and again by the library functions, in this one place for every converter.
# ----------------------------------------------------------------------------------------------
# Phi_k(x) = (1 - r) x + r conv_k(x) in the VQ-VAE (models/multiscale_vq.py): r is a mixing ratio, 0.5 in every
# release. At r <= 1e-6 the model has no Phi convs at all, so a checkpoint's convs could not be loaded into it.
QUANT_RESI_RANGE = (1e-6, 1.0)
# STAR's RoPE base and the side of the square every scale spans (10000 and 64 in every release): positive.
POSITIVE = (0.0, None)


def _float_problem(value, bounds: tuple[float | None, float | None]) -> str | None:
    """Why ``value`` is not a finite number in ``(low, high]`` (either bound may be None), or None."""
    low, high = bounds
    try:
        number = float(value)
    except (TypeError, ValueError):
        number = math.nan
    if math.isfinite(number) and (low is None or number > low) and (high is None or number <= high):
        return None
    span = f" in ({low:g}, {high:g}]" if low is not None and high is not None else ""
    span = span or (f" > {low:g}" if low is not None else f" <= {high:g}" if high is not None else "")
    return f"must be a finite number{span}, got {value!r}"


def check_float(value, name: str, bounds: tuple[float | None, float | None]) -> float:
    """``value`` as a float, or a ConversionError naming ``name`` and the allowed range."""
    problem = _float_problem(value, bounds)
    if problem:
        raise ConversionError(f"`{name}` {problem}.")
    return float(value)


def float_arg(bounds: tuple[float | None, float | None]):
    """An argparse ``type`` for a finite float in ``bounds`` (argparse puts the flag before the error)."""

    def parse(text: str) -> float:
        problem = _float_problem(text, bounds)
        if problem:
            raise argparse.ArgumentTypeError(problem)
        return float(text)

    return parse


def check_patch_nums(patch_nums, name: str = "patch_nums") -> tuple[int, ...]:
    """The models' own schedule check (at least two strictly increasing positive integers) as a ConversionError."""
    from ..models.blocks import validate_patch_nums

    try:
        return validate_patch_nums(patch_nums, name)
    except (TypeError, ValueError) as err:
        raise ConversionError(str(err)) from None


def patch_nums_arg(named: Mapping[str, Sequence[int]] | None = None):
    """An argparse ``type`` for ``--patch-nums``: comma-separated, strictly increasing positive integers (or one of
    the names in ``named``, e.g. STAR's resolutions), checked by :func:`check_patch_nums`."""
    names = f"{', '.join(named)} or " if named else ""

    def parse(text: str) -> tuple[int, ...]:
        if named and text in named:
            return tuple(named[text])
        try:
            return check_patch_nums([int(p) for p in text.split(",")])
        except ValueError:  # ConversionError is one
            raise argparse.ArgumentTypeError(
                f"must be {names}at least two comma-separated, strictly increasing positive integers "
                f"(e.g. 1,2,3,4,5,6,8,10,13,16), got {text!r}"
            ) from None

    return parse


OUTPUT_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def check_switch(value, name: str) -> bool:
    """A converter's on / off argument: True or False (numpy's too), else a ConversionError naming ``name``;
    ``bool()`` read ``"no"`` or ``"false"`` as True."""
    from ..scalars import is_bool

    if not is_bool(value):
        raise ConversionError(f"`{name}` must be True or False, got {value!r}.")
    return bool(value)


def check_dtype(dtype) -> torch.dtype:
    """The converters' ``dtype``: one of :data:`OUTPUT_DTYPES` (the values of ``--dtype``), as a ``torch.dtype`` or by
    its name there (``"float16"``, as the command line takes it). Anything else (float64, a float8 type, an integer
    type, None) is a ConversionError naming ``dtype`` and the allowed values, before any checkpoint is read: it was
    a TypeError from deep inside the cast after the conversion, or a float64 / float8 output no pipeline runs."""
    if isinstance(dtype, str) and dtype in OUTPUT_DTYPES:
        return OUTPUT_DTYPES[dtype]
    if isinstance(dtype, torch.dtype) and dtype in OUTPUT_DTYPES.values():
        return dtype
    allowed = ", ".join(f"torch.{name}" for name in OUTPUT_DTYPES)
    raise ConversionError(
        f"`dtype` must be one of {allowed} (or its name, {', '.join(map(repr, OUTPUT_DTYPES))}), got {dtype!r}."
    )


def check_whole_number(value, name: str, low: int = 1):
    """``value`` as an int when it is a whole number >= ``low`` (a Python or numpy integer, not a bool, a float or a
    string: ``int()`` read 2.5 as 2, True as 1 and '2' as 2), else a ConversionError naming ``name``."""
    from ..scalars import is_integer  # (here: this module also runs alone, see clean_stale_staging)

    if not is_integer(value) or value < low:
        raise ConversionError(f"`{name}` must be a whole number >= {low}, got {value!r}.")
    return int(value)


def add_output_dtype_argument(parser: argparse.ArgumentParser) -> None:
    """``--dtype``: the weights' dtype in the output folder (a key of :data:`OUTPUT_DTYPES`)."""
    parser.add_argument("--dtype", choices=sorted(OUTPUT_DTYPES), default="float32")


def add_vq_tokenizer_arguments(parser: argparse.ArgumentParser) -> None:
    """The VQ-VAE flags of the VAR-family converters: ``--patch-nums`` (when the tensors cannot tell),
    ``--quant-resi`` and ``--using-znorm`` (which the weights do not record)."""
    parser.add_argument(
        "--patch-nums",
        type=patch_nums_arg(),
        default=None,
        help="comma-separated, strictly increasing scale schedule, when it cannot be inferred",
    )
    parser.add_argument(
        "--quant-resi",
        type=float_arg(QUANT_RESI_RANGE),
        default=0.5,
        help="Phi mixing ratio r of the VQ-VAE, 0 < r <= 1 (0.5 in every release)",
    )
    parser.add_argument(
        "--using-znorm",
        action="store_true",
        help="the VQ-VAE was trained with using_znorm=True (codes by cosine similarity; off in the release)",
    )


def vq_tokenizer_kwargs(args: argparse.Namespace) -> dict:
    """The values of :func:`add_vq_tokenizer_arguments`' flags, as the converters' keyword arguments."""
    return dict(patch_nums=args.patch_nums, quant_resi=args.quant_resi, using_znorm=args.using_znorm)


def check_depth(depth: int | None) -> int | None:
    """``--depth``: None (inferred) or a whole number of blocks >= 1."""
    if depth is not None and (isinstance(depth, bool) or not isinstance(depth, int) or depth < 1):
        raise ConversionError(f"`depth` must be a whole number of blocks >= 1, got {depth!r}.")
    return depth


def _first_line(err: BaseException) -> str:
    return (str(err).splitlines() or [""])[0][:200]


@contextlib.contextmanager
def reading_checkpoint(param_name: str, path):
    """What a checkpoint of another layout raises while its configuration is read and its tensors converted (a key
    missing, a tensor of another rank, sizes that make no model, a model's own refusal) becomes one ConversionError
    naming ``param_name`` and the file, instead of a traceback from deep inside."""
    try:
        yield
    except ConversionError:
        raise
    except (KeyError, ValueError, IndexError, ZeroDivisionError, RuntimeError, TypeError, AttributeError) as err:
        raise ConversionError(
            f"`{param_name}`: {str(path)!r} does not hold a checkpoint of the expected layout "
            f"({type(err).__name__}: {_first_line(err)}); is it another model's, or edited?"
        ) from None


TOKENIZER_PROBE = "a red circle on a blue background"  # plain words any text tokenizer of these models knows


def check_tokenizer_fits(tokenizer, text_encoder, flag: str, max_length: int | None = None) -> None:
    """A ConversionError naming ``flag`` when ``tokenizer`` cannot be the text encoder's: it turns plain words into
    unknown tokens (a folder without the tokenizer's files), gives ids beyond the encoder's embedding table (another
    model's vocabulary), or pads to more positions than the encoder has (``max_length``: what the pipeline pads to).
    Such a folder converted without a word, then ignored the prompts or failed deep inside transformers."""
    vocabulary = getattr(text_encoder.config, "vocab_size", None)
    if vocabulary is not None and len(tokenizer) > vocabulary:
        raise ConversionError(
            f"`{flag}`: the tokenizer has {len(tokenizer)} tokens, more than the text encoder's {vocabulary}: it is "
            "another model's tokenizer."
        )
    ids = tokenizer(TOKENIZER_PROBE, add_special_tokens=False).input_ids
    if not ids or (tokenizer.unk_token_id is not None and tokenizer.unk_token_id in ids):
        raise ConversionError(
            f"`{flag}`: the tokenizer reads plain words ({TOKENIZER_PROBE!r}) as unknown tokens; the folder does not "
            "hold the text encoder's tokenizer files."
        )
    positions = getattr(text_encoder.config, "max_position_embeddings", None)
    if max_length is not None and positions is not None and max_length > positions:
        raise ConversionError(
            f"`{flag}`: the tokenizer pads texts to {max_length} tokens, the text encoder has {positions} positions: "
            "it is another model's tokenizer."
        )


def cast_for_output(dtype: torch.dtype, **models: torch.nn.Module) -> None:
    """The converted models to the output ``dtype`` in place, their ``_keep_in_fp32_modules`` (output heads) kept in
    float32 as every loader keeps them. A weight beyond the dtype's range (float16's 65504) is a ConversionError
    naming ``dtype``: it would turn infinite, and the finite-weights check blamed the checkpoint."""
    from ..pipelines.fast_inference import cast_module_

    dtype = check_dtype(dtype)
    if dtype == torch.float32:
        return
    largest = torch.finfo(dtype).max
    for model_name, model in models.items():
        keep = set(getattr(model, "_keep_in_fp32_modules", None) or ())
        for name, tensor in model.state_dict().items():
            if keep & set(name.split(".")) or not tensor.is_floating_point() or not tensor.numel():
                continue
            peak = float(tensor.detach().abs().max())
            if peak > largest:  # (NaN compares false: the finite-weights check names it)
                raise ConversionError(
                    f"`dtype` {str(dtype).replace('torch.', '')}: `{model_name}.{name}` holds values up to "
                    f"{peak:.4g}, beyond its largest {largest:.4g}; convert to bfloat16 or float32."
                )
        cast_module_(model, dtype)


def check_checkpoint_file(path: str | os.PathLike, param_name: str) -> Path:
    """``path`` is a file (the checkpoint given to ``param_name``), else a ConversionError naming it."""
    path = Path(path)
    if path.is_dir():
        raise ConversionError(f"`{param_name}`: {str(path)!r} is a folder; give the checkpoint file (.pth) in it.")
    if not path.is_file():
        raise ConversionError(f"`{param_name}`: no such file {str(path)!r}.")
    return path


def check_folder(path: str | os.PathLike, param_name: str) -> Path:
    """``path`` is a folder (a text encoder's or a tokenizer's), else a ConversionError naming ``param_name``."""
    path = Path(path)
    if path.is_dir():
        return path
    if path.exists():
        raise ConversionError(f"`{param_name}`: {str(path)!r} is a file, not a folder.")
    raise ConversionError(f"`{param_name}`: no such folder {str(path)!r}.")


def check_inputs(files: Mapping | None = None, folders: Mapping | None = None) -> None:
    """Every input path given to a converter, by its argument: the checkpoint ``files`` and the ``folders``, checked
    before any of them is read (next to :func:`check_output_dir`): a missing text encoder was reported only after
    the transformer and the VQ-VAE had been read and converted, minutes with a release checkpoint."""
    for name, path in (files or {}).items():
        check_checkpoint_file(path, name)
    for name, path in (folders or {}).items():
        check_folder(path, name)


def load_checkpoint(path: str | os.PathLike, param_name: str) -> dict[str, torch.Tensor]:
    """Load an original ``.pth`` with ``torch.load(weights_only=True)`` (never executes pickled code).

    Errors name the command-line parameter (``param_name``) the file was given to.
    """
    path = check_checkpoint_file(path, param_name)
    damaged = short = None
    try:
        with open(path, "rb") as file:
            # mmap works only for the zip format (torch >= 1.6); files saved with
            # _use_new_zipfile_serialization=False are read whole, still with weights_only
            mmap = file.read(4) == b"PK\x03\x04"
        # torch.load does not check the zip's CRCs: a flipped bit in a tensor converted silently. testzip reads each
        # member in 1 MiB chunks (the file is read once more, never held whole); the legacy format has no checksums
        if mmap:
            with zipfile.ZipFile(path) as archive:
                damaged = archive.testzip()
                # a record compressed (a file zipped again) would be mapped as its compressed bytes: such files
                # load whole, where torch checks each record itself
                mmap = all(info.compress_type == zipfile.ZIP_STORED for info in _tensor_records(archive))
        if damaged is None:
            obj = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
            if mmap:
                with zipfile.ZipFile(path) as archive:
                    short = _record_size_problem(archive, obj)
    except Exception as err:  # noqa: BLE001 - truncated zip, pickle with code, not a torch file at all
        raise ConversionError(
            f"`{param_name}`: {str(path)!r} is not a readable PyTorch checkpoint (truncated, corrupted, or it "
            "needs arbitrary code to unpickle, which is refused): "
            f"{type(err).__name__}: {_first_line(err)}"
        ) from None
    if damaged is not None:
        raise ConversionError(
            f"`{param_name}`: {str(path)!r} is corrupted: its member {damaged!r} fails its CRC-32 check (the file "
            "changed after it was written, e.g. a damaged download or disk); re-download it."
        )
    if short is not None:
        raise ConversionError(f"`{param_name}`: {str(path)!r} is corrupted: {short}; re-download it.")
    if not isinstance(obj, Mapping):
        raise ConversionError(f"`{param_name}`: {str(path)!r} holds a {type(obj).__name__}, not a state dict.")
    return dict(obj)


def _tensor_records(archive: zipfile.ZipFile) -> list[zipfile.ZipInfo]:
    """The tensor data members (``ARCHIVE/data/N``) of a zip-format checkpoint."""
    return [info for info in archive.infolist() if re.search(r"/data/\d+\Z", info.filename)]


def _record_size_problem(archive: zipfile.ZipFile, obj) -> str | None:
    """Why the tensor data members of ``archive`` do not hold the bytes of the storages a memory-mapped
    ``torch.load`` made of them, else None. Such a load maps each storage from its record's offset with the size the
    pickle gives, without checking the record's own size: a record shorter than its tensor (a valid CRC-32) read the
    tensor's tail from the next zip header. Each storage is one record, so the two lists of sizes must agree."""
    storages, stack = {}, [obj]
    while stack:
        item = stack.pop()
        if isinstance(item, torch.Tensor):
            storage = item.untyped_storage()
            if storage.nbytes():
                storages[storage.data_ptr()] = storage.nbytes()
        elif isinstance(item, Mapping):
            stack.extend(item.values())
        elif isinstance(item, (list, tuple)):
            stack.extend(item)
    unmatched = collections.Counter(storages.values())
    for info in _tensor_records(archive):
        if not info.file_size:
            continue
        if not unmatched[info.file_size]:
            return f"its member {info.filename!r} holds {info.file_size} bytes, the size of none of its tensors"
        unmatched[info.file_size] -= 1
    missing = sum(unmatched.values())
    return f"{missing} of its tensors have no data member of their size" if missing else None


def load_safetensors(path: str | os.PathLike, param_name: str) -> dict[str, torch.Tensor]:
    """A ``.safetensors`` file's tensors; an unreadable one is a ConversionError naming ``param_name`` and the file."""
    from safetensors.torch import load_file

    try:
        return load_file(path)
    except Exception as err:  # noqa: BLE001 - SafetensorError (truncated, bad header), OSError
        raise ConversionError(
            f"`{param_name}`: {str(path)!r} is not a readable safetensors file (truncated or corrupted?): "
            f"{type(err).__name__}: {_first_line(err)}"
        ) from None


def count_blocks(
    state_dict: Mapping,
    prefix: str,
    param_name: str,
    depth: int | None = None,
    num_heads: int | None = None,
    width: int | None = None,
) -> int:
    """The number of ``{prefix}.N.`` blocks, every index from 0 present (a ConversionError lists the missing ones).

    A block removed at the end leaves no gap; the original's strict load catches it because its command line gives
    the depth. So does ``depth`` here; without it, a checkpoint with the release layout (``width = 64 * num_heads``,
    ``num_heads = depth``: every VAR and STAR release) must have ``num_heads`` blocks."""
    depth = check_depth(depth)
    found = {int(m.group(1)) for k in state_dict if (m := re.match(rf"{re.escape(prefix)}\.(\d+)\.", k))}
    expected = depth
    if expected is None and num_heads is not None and width == 64 * num_heads:
        expected = num_heads  # release layout
    count = expected if expected is not None else (max(found) + 1 if found else 0)
    # the first few only: one stray index of 10**9 made a list (and a message) of a billion missing blocks
    extra = sorted(i for i in found if i >= count)
    missing_text = first_missing(range(count), found, count - len(found) + len(extra))
    if missing_text or extra:
        extra_text = f"{extra}" if len(extra) <= 10 else f"{extra[:9] + ['...']} ({len(extra)})"
        detail = f"more {prefix} than {count}: {extra_text}"
        if missing_text:
            detail = f"no keys for {prefix} {missing_text}"
        source = (
            "`--depth`"
            if depth is not None
            else ("the release layout (width 64 x heads)" if expected is not None else "the block indices")
        )
        raise ConversionError(
            f"`{param_name}`: {detail} (depth {count} from {source}): a truncated or edited "
            f"checkpoint{'' if depth is not None else '; pass --depth to convert another layout'}."
        )
    return count


def first_missing(candidates: Iterable, present, number_missing: int, limit: int = 10) -> str:
    """The first of ``candidates`` not in ``present`` for a message, ``"[3, 4, 5]"``, or with more than ``limit``
    missing ``"[3, 4, ..., '...'] (N)"`` (``number_missing``: how many there are in all); ``""`` when none is missing.
    ``candidates`` is walked lazily and only until ``limit`` are found: the indices of a checkpoint's blocks bound
    the walk (``len(present) + limit`` steps at most), not the range, which one stray index of 10**9 made huge (a
    set of every expected index took minutes and ended in a MemoryError)."""
    missing = list(itertools.islice((item for item in candidates if item not in present), limit))
    if not missing:
        return ""
    if number_missing <= len(missing):
        return f"{missing}"
    return f"{missing[:-1] + ['...']} ({number_missing})"


def check_zero_buffer(tensor: torch.Tensor, key: str, param_name: str, shape: tuple[int, ...] | None = None) -> None:
    """A buffer the original keeps at zero (attention's ``zero_k_bias``: the key projection has no bias) is not
    converted, so it must be zero: a non-zero or NaN one was edited or is another model's, and dropping it silently
    changed what the checkpoint computes. ``shape``: the shape it must have, when known."""
    if shape is not None and tuple(tensor.shape) != tuple(shape):
        raise ConversionError(
            f"`{param_name}`: buffer {key!r} has shape {tuple(tensor.shape)}, expected {tuple(shape)}."
        )
    if torch.count_nonzero(tensor).item():  # (NaN is non-zero)
        raise ConversionError(f"`{param_name}`: buffer {key!r} should be all zeros.")


def check_finite(param_name: str, **models: torch.nn.Module) -> None:
    """The converted ``models`` (by their component names) hold finite weights only: a checkpoint holding NaN / inf
    converted to a pipeline that draws NaN images. The error names ``param_name``, the argument whose checkpoint held
    them, and the converted weight. Run on every converted model, whether the pipeline is written or only returned,
    and before :func:`cast_for_output` (an infinite weight is no fault of ``dtype``)."""
    for model_name, model in models.items():
        name = _first_non_finite(model)
        if name is not None:
            raise ConversionError(
                f"`{param_name}`: the checkpoint holds NaN or infinite values: converted to `{model_name}.{name}`."
            )


def _first_non_finite(model: torch.nn.Module) -> str | None:
    """The name of ``model``'s first floating-point weight or buffer holding NaN / inf, or None."""
    for name, tensor in model.state_dict().items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            return name
    return None


def find_state_dict(
    obj: Mapping, candidates: Iterable[tuple[str, ...]], looks_right: Callable[[Mapping], bool], param_name: str
) -> dict:
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
        raise ConversionError(
            f"`{param_name}`: unexpected keys for this model family: "
            f"{unknown[:8]}{' ...' if len(unknown) > 8 else ''}."
        )
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
    # a float weight stored as integers or complex numbers (an edited or foreign file) is not cast silently
    kinds = [
        k for k, v in state_dict.items() if v.is_complex() or v.is_floating_point() != expected[k].is_floating_point()
    ]
    if kinds:
        shown = ", ".join(f"{k} ({state_dict[k].dtype}, {expected[k].dtype} expected)" for k in kinds[:3])
        raise ConversionError(f"`{param_name}`: tensors of the wrong kind of number: {shown}.")
    model.load_state_dict({k: v.to(expected[k].dtype) for k, v in state_dict.items()}, strict=True, assign=False)


# Every folder atomic_save_pipeline writes lists its files here: an overwrite replaces only folders of ours and
# refuses when a file not listed (a user's) would be lost.
MANIFEST_NAME = ".diffusers-var-manifest.json"  # file_utils.CONVERSION_MANIFEST (this module also runs alone)
# A staging folder ``.NAME.tmp-XXXX`` next to the output holds this marker (who made it, for which output), the
# save in progress (``new/``) and, during the swap, the previous output (``old/``). Only folders with the marker
# are ever cleaned up, and only once the process that made them is gone.
STAGING_MARKER = ".diffusers-var-staging.json"
WRITER = "diffusers-var"


def _files(folder: Path) -> set[str]:
    return {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file() or p.is_symlink()}


def _read_json(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _is_ours(folder: Path) -> bool:
    """A diffusers folder of one of our classes: a pipeline (model_index.json) or a single model (config.json)."""
    import diffusers_var

    for name in ("model_index.json", "config.json"):
        config = _read_json(folder / name)
        if isinstance(config, dict) and isinstance(config.get("_class_name"), str):
            return isinstance(getattr(diffusers_var, config["_class_name"], None), type)
    return False


def _manifest_files(folder: Path) -> set[str] | None:
    manifest = _read_json(folder / MANIFEST_NAME)
    if isinstance(manifest, dict) and manifest.get("written_by") == WRITER and isinstance(manifest.get("files"), list):
        return {str(f) for f in manifest["files"]}
    return None


def _refuse_foreign(output_dir: Path, foreign: set[str], name: str = "output", replacer: str = "--overwrite") -> None:
    if foreign:
        shown = ", ".join(sorted(foreign)[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
        raise ConversionError(
            f"`{name}`: {str(output_dir)!r} holds files that diffusers-var did not write ({shown}); "
            f"{replacer} replaces only folders written by diffusers-var, so nothing of yours is deleted: "
            "move those files or choose another folder."
        )


def folder_problem(folder: Path) -> str | None:
    """``None`` when files can be written into ``folder`` (it exists, or its nearest existing parent is a folder we
    may write into, so it can be made), else the reason, for the caller to put after its flag. Creates nothing: it
    runs before the model is loaded, and a run that then fails on another argument leaves no empty folder behind."""
    existing = Path(folder)
    while not existing.exists() and existing.parent != existing:
        existing = existing.parent
    if not existing.is_dir():
        return f"{str(existing)!r} is a file, not a folder"
    try:
        with tempfile.TemporaryFile(dir=existing):  # the only reliable test of write access (ACLs, read-only mounts)
            pass
    except OSError as err:
        return f"cannot write into {str(existing)!r} ({err.strerror or err})"
    return None


def check_output_dir(
    output_dir: str | os.PathLike, overwrite: bool = False, name: str = "output", replacer: str = "--overwrite"
) -> Path:
    """Refuse an output folder that a save would not be allowed to replace (call it before long work).

    Without ``overwrite`` any existing path is refused. With it, the existing folder must be empty or a folder
    that diffusers-var wrote: its manifest lists every file in it, or (folders from before manifests) it is a
    diffusers folder of one of our classes. A folder holding the current working directory is refused as well, and
    so is a location that cannot be written (the staging folder and the final rename happen in its parent).
    Errors name the parameter ``name`` and say what replaces folders (``replacer``: the caller's flag or step).
    """
    _refuse_nul(output_dir, name)
    try:
        output_dir = Path(output_dir).resolve()
        if not output_dir.exists() and not output_dir.is_symlink():
            _check_writable(output_dir, name)
            return output_dir
        _check_replaceable(output_dir, overwrite, name, replacer)
        _check_writable(output_dir, name)
    except (OSError, RuntimeError) as err:  # an unreadable parent, a symlink loop (RuntimeError before Python 3.13)
        raise ConversionError(f"`{name}`: cannot use {str(output_dir)!r}: {err}") from None
    return output_dir


def _refuse_nul(output_dir, name: str) -> None:
    if "\x00" in str(output_dir):  # (resolve's ValueError, "embedded null byte", named nothing)
        raise ConversionError(f"`{name}`: {str(output_dir)!r} holds a NUL character, which no path can.")


def _check_writable(output_dir: Path, name: str = "output") -> None:
    """What the save's staging folder beside ``output_dir`` and its renames need: a parent we may write into, a
    staging name the file system takes, and an existing output that may be moved (a folder's rename into another
    one needs write access to it) - each found only after the whole conversion otherwise."""
    problem = folder_problem(output_dir.parent) or _staging_name_problem(output_dir)
    if problem is None and output_dir.is_dir() and not os.access(output_dir, os.W_OK | os.X_OK):
        problem = "the folder is not writable, and replacing it moves it aside"
    if problem:
        raise ConversionError(f"`{name}`: cannot write {str(output_dir)!r}: {problem}.")


def _staging_name_problem(output_dir: Path) -> str | None:
    """Why the staging folder ``.NAME.tmp-XXXXXXXX`` (``mkdtemp``'s 8 random characters) cannot be made next to
    ``output_dir``: its name is past the file system's limit (file_utils.staging_name_problem: this module also
    runs alone, tests/test_conversion_output.py)."""
    try:
        limit = os.pathconf(output_dir.parent, "PC_NAME_MAX")
    except (OSError, ValueError, AttributeError):  # AttributeError: no os.pathconf (Windows)
        limit = 255
    extra = len(os.fsencode(f".{output_dir.name}.tmp-xxxxxxxx")) - len(os.fsencode(output_dir.name))
    if len(os.fsencode(output_dir.name)) + extra > limit:
        return f"the folder name {output_dir.name[:40]!r}... is too long: at most {limit - extra} bytes here"
    return None


def _check_replaceable(output_dir: Path, overwrite: bool, name: str = "output", replacer: str = "--overwrite") -> None:
    if not overwrite:
        raise ConversionError(
            f"`{name}`: {str(output_dir)!r} already exists (pass overwrite / --overwrite to replace it)."
        )
    if not output_dir.is_dir():
        raise ConversionError(
            f"`{name}`: {str(output_dir)!r} is a file, not a folder; {replacer} replaces folders only."
        )
    try:
        cwd = Path.cwd().resolve()
    except OSError:  # the working directory was deleted
        cwd = None
    if cwd is not None and cwd.is_relative_to(output_dir):
        raise ConversionError(
            f"`{name}`: {str(output_dir)!r} is the current folder or holds it; write next to it instead."
        )
    from ..file_utils import SAVING_MARKER  # (here: this module also runs alone, see clean_stale_staging)
    from ..file_utils import STAGING_MARKER as SAVE_STAGING_MARKER

    present = _files(output_dir) - {MANIFEST_NAME, SAVING_MARKER}  # (the marker: a save_pretrained of ours)
    killed_saves = [  # the staging folders that a killed save_pretrained into the folder left (marked)
        p.relative_to(output_dir).as_posix() + "/"
        for p in output_dir.rglob(".saving-*")
        if p.is_dir() and not p.is_symlink() and (p / SAVE_STAGING_MARKER).is_file()
    ]
    present = {name for name in present if not name.startswith(tuple(killed_saves))}
    listed = _manifest_files(output_dir)
    empty = {  # a folder the user made inside (no save of ours leaves one empty, but a killed one's staging)
        p.relative_to(output_dir).as_posix() + "/"
        for p in output_dir.rglob("*")
        if p.is_dir() and not p.is_symlink() and not any(p.iterdir()) and not p.name.startswith(".saving-")
    }
    if listed is not None or empty:
        _refuse_foreign(output_dir, (present - (present if listed is None else listed)) | empty, name, replacer)
    if listed is None and present and not _is_ours(output_dir):
        raise ConversionError(
            f"`{name}`: {str(output_dir)!r} is not a pipeline or model folder written by diffusers-var; {replacer} "
            "replaces only those (and empty folders), so nothing of yours is deleted: choose another folder."
        )


def clean_stale_staging(output_dir: Path) -> None:
    """Finish or remove staging folders that an interrupted save of ``output_dir`` left next to it.

    Only folders carrying our marker, made on this host by a process that no longer runs, are touched. One that
    already moved the previous output aside (``old/``) while ``output_dir`` is missing was stopped mid-swap: the
    previous output is put back instead of being removed.
    """
    prefix = f".{output_dir.name}.tmp-"  # (not a glob pattern: a name may hold [ ] * ?; file_utils's
    # entries_starting_with is not imported here: this module also runs alone, tests/test_conversion_output.py)
    for staging in [path for path in output_dir.parent.iterdir() if path.name.startswith(prefix)]:
        marker = _read_json(staging / STAGING_MARKER) if staging.is_dir() and not staging.is_symlink() else None
        if not (
            isinstance(marker, dict) and marker.get("written_by") == WRITER and marker.get("output") == str(output_dir)
        ):
            continue  # not recognisably ours: never touched
        from ..file_utils import process_alive  # here: this module also runs alone (tests/test_conversion_output.py)

        if marker.get("host") != socket.gethostname() or process_alive(int(marker.get("pid", -1))):
            continue  # another machine's or a running save
        old = staging / "old"
        if old.is_dir() and not output_dir.exists():
            os.replace(old, output_dir)
            logger.warning("restored %s from an interrupted save (%s)", output_dir, staging.name)
        remove_staging(staging)


def atomic_save_pipeline(pipeline, output_dir: str | os.PathLike, overwrite: bool = False) -> Path:
    """``save_pretrained`` into a staging folder next to ``output_dir``, then rename it into place.

    A failure at any point leaves an existing ``output_dir`` untouched; with ``overwrite`` the old folder is only
    removed after the new one is complete, and only when it is a folder diffusers-var wrote (see
    :func:`check_output_dir`): no file that we did not write is ever deleted. Stale staging folders of
    interrupted earlier saves of the same output are cleaned first. The saved folder gets a manifest of its files.
    A write that fails (disk full, no permission) is a ConversionError naming ``output``.
    """
    from safetensors import SafetensorError

    _refuse_nul(output_dir, "output")
    output_dir = Path(output_dir).resolve()
    try:
        return _atomic_save(pipeline, output_dir, overwrite)
    except (OSError, SafetensorError) as err:  # safetensors reports a full disk as a SafetensorError
        reason = err.strerror if isinstance(err, OSError) and err.strerror else _first_line(err)
        where = f": {str(err.filename)!r}" if isinstance(err, OSError) and err.filename else ""
        raise ConversionError(
            f"`output`: writing {str(output_dir)!r} failed: {reason}{where}; any previous output is kept."
        ) from err


def _atomic_save(pipeline, output_dir: Path, overwrite: bool) -> Path:
    _check_finite_weights(pipeline)  # (the converters check each model; this, any pipeline) before a folder is made
    made = _make_parents(output_dir)
    try:
        return _save_into_place(pipeline, output_dir, overwrite)
    except BaseException:
        for folder in made:  # the folders this call made for the output, when they stayed empty (never another's)
            with contextlib.suppress(OSError):
                folder.rmdir()
        raise


def _make_parents(output_dir: Path) -> list[Path]:
    """Make ``output_dir``'s missing parent folders; those made, deepest first (a failed save removes them again:
    ``folder_problem`` promises that a refused run leaves no empty folder behind)."""
    missing, folder = [], output_dir.parent
    while not folder.exists() and folder.parent != folder:
        missing.append(folder)
        folder = folder.parent
    made = []
    for folder in reversed(missing):
        try:
            folder.mkdir()
        except FileExistsError:  # made meanwhile by someone else: not ours to remove
            continue
        except OSError:
            for ours in reversed(made):
                with contextlib.suppress(OSError):
                    ours.rmdir()
            raise
        made.append(folder)
    return made[::-1]


def _save_into_place(pipeline, output_dir: Path, overwrite: bool) -> Path:
    clean_stale_staging(output_dir)
    check_output_dir(output_dir, overwrite)
    staging = Path(tempfile.mkdtemp(prefix=f".{output_dir.name}.tmp-", dir=output_dir.parent))
    marker = {
        "written_by": WRITER,
        "output": str(output_dir),
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "created": time.time(),
    }
    (staging / STAGING_MARKER).write_text(json.dumps(marker))
    new, old = staging / "new", staging / "old"
    try:
        pipeline.save_pretrained(new, safe_serialization=True)
        written = _files(new)
        pickles = [name for name in written if Path(name).suffix in {".bin", ".pth", ".pt", ".pkl", ".ckpt"}]
        if pickles:
            raise ConversionError(f"refusing to write pickle files: {pickles}")
        manifest = {"written_by": WRITER, "version": _version(), "files": sorted(written - {MANIFEST_NAME})}
        (new / MANIFEST_NAME).write_text(json.dumps(manifest, indent=1) + "\n")
        from ..file_utils import _default_folder_mode  # (here: this module also runs alone)

        os.chmod(new, _default_folder_mode())  # mkdtemp makes 0700; a new folder's mode under the umask
        if output_dir.exists():
            check_output_dir(output_dir, overwrite)  # again: files may have appeared during the save
            if _manifest_files(output_dir) is None:  # a folder from before manifests: everything must be rewritten
                _refuse_foreign(output_dir, _files(output_dir) - written)
            os.replace(output_dir, old)
        try:
            os.replace(new, output_dir)
        except BaseException:
            if old.exists():
                os.replace(old, output_dir)
            raise
    finally:
        if output_dir.exists() or not old.exists():  # never remove the only copy of the previous output
            remove_staging(staging)
    return output_dir


def remove_staging(staging: Path) -> None:
    """Remove a staging folder of :func:`atomic_save_pipeline`, its marker last. When part of it cannot be removed (a
    read-only folder in the previous output, ``old/``), the marker stays, so that :func:`clean_stale_staging` still
    knows the folder for ours and tries again (``rmtree`` removed the marker first and left a hidden folder that no
    later run touched), and a warning names what is left."""
    try:
        for entry in staging.iterdir():
            if entry.name == STAGING_MARKER:
                continue
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                entry.unlink(missing_ok=True)
        if not any(entry.name != STAGING_MARKER for entry in staging.iterdir()):
            (staging / STAGING_MARKER).unlink(missing_ok=True)
            staging.rmdir()
            return
    except FileNotFoundError:  # removed meanwhile
        return
    except OSError:
        pass
    logger.warning(
        "could not remove all of %s (the staging folder of a conversion, holding in old/ the output it replaced; no "
        "permission?): remove it yourself, or the next conversion to the same output tries again",
        staging,
    )


def _check_finite_weights(pipeline) -> None:
    """A pipeline's weights are finite before it is written (the converters name the argument whose checkpoint held
    NaN / inf, :func:`check_finite`; this covers any pipeline given to :func:`atomic_save_pipeline`)."""
    for component_name, component in getattr(pipeline, "components", {}).items():
        name = _first_non_finite(component) if isinstance(component, torch.nn.Module) else None
        if name is not None:
            raise ConversionError(f"the pipeline holds NaN or infinite values: `{component_name}.{name}`.")


def _version() -> str:
    from .. import __version__

    return __version__
