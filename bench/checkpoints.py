"""Loading checkpoints safely: weights-only, checked before and after reading.

Checkpoints are untrusted files from the internet, so they are only ever loaded weights-only
(``torch.load(..., weights_only=True)`` or safetensors): a file that needs arbitrary unpickling is refused
with :class:`UnsafeCheckpointError`, never executed. Before any of that, the path must be a regular file (a
symlink is followed to one; a FIFO, a device or a kernel file is refused without being opened) whose first bytes
are one of the formats read (:func:`checkpoint_format`); the weights read must be finite (:func:`check_finite`).
Sparsity and compute of the loaded model are measured in :mod:`bench.sparsity`.
"""

from __future__ import annotations

import hashlib
import os
import pickle
import re
import stat
import tarfile
import zipfile
from collections.abc import Collection, Mapping
from pathlib import Path

import torch
from torch import Tensor, nn

from bench.models import WRN_UNUSED_PREFIXES, NormalizedModel

__all__ = [
    "SUPPORTED_EXTENSIONS",
    "CheckpointMismatchError",
    "NonFiniteWeightsError",
    "NotACheckpointError",
    "UnsafeCheckpointError",
    "check_finite",
    "check_input_file",
    "check_torch_archive",
    "checkpoint_format",
    "drop_unused_keys",
    "load_state_dict",
    "load_weights",
    "sha256_file",
]

_TORCH_EXTENSIONS = (".pth.tar", ".pt", ".pth", ".tar", ".t7", ".bin")
SUPPORTED_EXTENSIONS = (*_TORCH_EXTENSIONS, ".safetensors")

# Keys under which training scripts commonly nest the model's weights, in order of preference.
_CONTAINER_KEYS = ("state_dict", "model_state_dict", "net", "model")
_DATA_PARALLEL_PREFIX = "module."
_NET_PREFIX = "net."
_SHOWN_KEYS = 10


class UnsafeCheckpointError(ValueError):
    """The checkpoint holds pickled Python objects that a weights-only load refuses."""


class NotACheckpointError(ValueError):
    """The path is not a file a checkpoint can be read from: a special file, an empty one, or another format."""


class NonFiniteWeightsError(ValueError):
    """The weights hold NaN or infinite entries: a model computed from them is meaningless."""


class CheckpointMismatchError(ValueError):
    """A state dict does not fit the model.

    Attributes:
        missing: keys the model expects that the checkpoint lacks.
        unexpected: keys in the checkpoint the model does not have.
        mismatched: ``(key, checkpoint_shape, model_shape)`` for keys present in both with different shapes.
    """

    def __init__(
        self,
        message: str,
        missing: list[str],
        unexpected: list[str],
        mismatched: list[tuple[str, tuple[int, ...], tuple[int, ...]]],
    ) -> None:
        super().__init__(message)
        self.missing = missing
        self.unexpected = unexpected
        self.mismatched = mismatched


def sha256_file(path: str | os.PathLike[str], chunk_size: int = 1 << 20) -> str:
    """Hex SHA-256 of a file, read in chunks so multi-gigabyte checkpoints need no memory."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(chunk_size):
            digest.update(chunk)
    return digest.hexdigest()


def _extension(path: Path) -> str | None:
    name = path.name.lower()
    # Longest first, so "x.pth.tar" is ".pth.tar" rather than ".tar".
    for ext in sorted(SUPPORTED_EXTENSIONS, key=len, reverse=True):
        if name.endswith(ext):
            return ext
    return None


# Linux's kernel filesystems: their "regular files" report sizes they do not hold and may block on read.
_KERNEL_FILESYSTEMS = ("/proc", "/sys")
_SNIFF_BYTES = 512  # a tar header's "ustar" magic sits at offset 257
# A legacy torch.save file starts with torch's magic number pickled at the protocol it was saved with.
_LEGACY_MAGICS = tuple(pickle.dumps(0x1950A86A20F9469CFC6C, protocol=p) for p in range(pickle.HIGHEST_PROTOCOL + 1))
_ZIP_MAGICS = (b"PK\x03\x04", b"PK\x05\x06")


def check_input_file(path: str | os.PathLike[str], what: str = "checkpoint") -> Path:
    """Refuse, before anything opens it, a user-supplied path that is not a regular file with content.

    A symlink is followed: checkpoints often are symlinks (the Hugging Face cache's ``snapshots/`` are links
    into ``blobs/``, ``last.pt -> epoch_99.pt``), and a link grants nothing its target's path would not, since
    the file is read with the user's own rights. What is refused is what lies at the end of it: a FIFO or a
    socket (opening one blocks until a writer comes, so its type is checked with ``stat``, never by reading),
    a device, a directory, a dangling link or a loop, an empty file, and a file of the kernel's ``/proc`` or
    ``/sys`` (they report sizes they do not hold). Every message names the link's target when ``path`` is one.
    A regular file that is not a checkpoint (a link to ``/etc/passwd``) is :func:`checkpoint_format`'s to refuse.

    Args:
        path: the file as the user gave it.
        what: what the file is meant to be, for the messages ("checkpoint", "dense checkpoint").

    Returns:
        ``path`` as a :class:`~pathlib.Path` (not resolved: the user's spelling stays in later messages).

    Raises:
        FileNotFoundError: nothing at ``path``, or a symlink to nothing.
        NotACheckpointError: a special file, a directory, a symlink loop, an empty or a kernel file.
    """
    path = Path(path)
    try:
        os.lstat(path)
    except FileNotFoundError:
        raise FileNotFoundError(f"{what} not found: {path}") from None
    except OSError as e:
        raise NotACheckpointError(f"cannot look at {what} {path}: {e.strerror}; pass a readable file") from None
    link, fix = _link_note(path), f"pass the {what} file itself"
    try:
        info = os.stat(path)
    except FileNotFoundError:
        raise FileNotFoundError(f"{what} {path}{link} points to nothing: the target does not exist; {fix}") from None
    except OSError as e:  # ELOOP: a symlink loop; EACCES: a folder on the way is closed
        raise NotACheckpointError(f"cannot reach {what} {path}{link}: {e.strerror}; {fix}") from None
    if not stat.S_ISREG(info.st_mode):
        raise NotACheckpointError(f"{what} {path}{link} is {_file_kind(info.st_mode)}, not a regular file; {fix}")
    real = os.path.realpath(path)
    kernel = next((fs for fs in _KERNEL_FILESYSTEMS if real == fs or real.startswith(fs + os.sep)), None)
    if kernel is not None:
        raise NotACheckpointError(f"{what} {path}{link} is a kernel file under {kernel}, not a file on disk; {fix}")
    if info.st_size == 0:
        raise NotACheckpointError(f"{what} {path}{link} is empty (0 bytes); {fix}, fully written")
    return path


def _link_note(path: Path) -> str:
    # Where a symlink points, as it is written (relative targets included): what the user can check and pass.
    return f" (a symlink to {os.readlink(path)})" if path.is_symlink() else ""


def _file_kind(mode: int) -> str:
    kinds = (
        (stat.S_ISDIR, "a directory"),
        (stat.S_ISFIFO, "a FIFO (named pipe)"),
        (stat.S_ISSOCK, "a socket"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
    )
    return next((name for test, name in kinds if test(mode)), "a special file")


def checkpoint_format(path: str | os.PathLike[str], what: str = "checkpoint") -> str:
    """What a checkpoint file holds, from its first bytes: ``"zip"`` (torch.save since 1.6), ``"legacy"`` (the
    pre-1.6 pickle), ``"tar"`` (pre-0.4 torch, refused later as unsafe) or ``"safetensors"``.

    :func:`check_input_file` runs first, so a FIFO or a device is never opened.

    Raises:
        FileNotFoundError, NotACheckpointError: as :func:`check_input_file`, or when the content is none of those
            formats (the message names the ones accepted; it quotes none of the file's bytes).
    """
    path = check_input_file(path, what)
    link = _link_note(path)
    try:
        # O_NONBLOCK, and fstat on what was opened: a FIFO swapped in after the check cannot hang the read.
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    except OSError as e:
        raise NotACheckpointError(f"cannot open {what} {path}{link}: {e.strerror}; pass a readable file") from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise NotACheckpointError(f"{what} {path}{link} is {_file_kind(info.st_mode)}, not a regular file")
        head = os.read(fd, _SNIFF_BYTES)
    finally:
        os.close(fd)
    if head.startswith(_ZIP_MAGICS):
        return "zip"
    if head.startswith(_LEGACY_MAGICS):
        return "legacy"
    if len(head) > 262 and head[257:262] == b"ustar":
        return "tar"
    # safetensors: an 8-byte little-endian header length, then that many bytes of JSON.
    if len(head) > 8 and head[8:9] == b"{" and 8 + int.from_bytes(head[:8], "little") <= info.st_size:
        return "safetensors"
    raise NotACheckpointError(
        f"{path}{link} is not a checkpoint: it is neither a torch.save file (zip archive or legacy pre-1.6 pickle) "
        f"nor a safetensors file; pass the {what} file itself"
    )


def load_state_dict(path: str | os.PathLike[str]) -> dict[str, Tensor]:
    """Read a checkpoint weights-only and return a flat ``name -> tensor`` state dict.

    Containers written by training scripts are unwrapped: the weights are taken from the first of
    ``state_dict``, ``model_state_dict``, ``net``, ``model`` that holds tensors (repeatedly, for nested
    containers), non-tensor entries (epoch, accuracy, ...) are dropped, and a ``module.`` prefix left by
    ``DataParallel`` is stripped.

    Args:
        path: a ``.pt``, ``.pth``, ``.pth.tar``, ``.tar``, ``.t7``, ``.bin`` (``torch.save``) or
            ``.safetensors`` file.

    Returns:
        The state dict, tensors on the CPU.

    Raises:
        FileNotFoundError: ``path`` does not exist (or is a symlink to nothing).
        NotACheckpointError: ``path`` is not a regular file with content, or holds none of the accepted formats
            (:func:`check_input_file`, :func:`checkpoint_format`); nothing was read beyond its first bytes.
        NonFiniteWeightsError: a floating-point tensor holds NaN or Inf (:func:`check_finite`).
        ValueError: unsupported extension, an unreadable (corrupt) file, or no tensors in the file.
        UnsafeCheckpointError: the file needs arbitrary unpickling (it is not executed).
    """
    path = Path(path)
    if not os.path.lexists(path):
        raise FileNotFoundError(f"checkpoint not found: {path}")
    ext = _extension(path)
    if ext is None:
        raise ValueError(
            f"unsupported checkpoint file {path.name!r}; supported extensions: {', '.join(SUPPORTED_EXTENSIONS)}"
        )
    # The content decides how the file is read, not its name: a safetensors file saved as .pt loads too.
    if checkpoint_format(path) == "safetensors":
        from safetensors.torch import load_file

        try:
            obj: object = load_file(str(path), device="cpu")
        except Exception as e:  # safetensors raises its own SafetensorError for a corrupt header
            raise ValueError(f"could not read {path} as a safetensors file: {e}") from None
    else:
        check_torch_archive(path)
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as e:
            refused = re.search(r"unsupported GLOBAL:? (?:GLOBAL )?([\w.]+)", str(e), flags=re.IGNORECASE)
            if refused:
                raise UnsafeCheckpointError(_unsafe_message(path, refused.group(1))) from None
            raise ValueError(f"could not read {path} as a checkpoint: {_unpickler_detail(e)}") from None
        except (RuntimeError, KeyError, EOFError) as e:
            raise ValueError(
                f"could not read {path} as a checkpoint (corrupt, truncated, or not written by torch.save): {e!r}"
            ) from None
    state_dict = _extract_state_dict(obj, path)
    # Every tensor the file gives, not only those a model will take: NaN scores in a HYDRA file are as corrupt.
    check_finite(state_dict, source=path)
    return state_dict


def check_finite(state_dict: Mapping[str, Tensor], *, source: str | os.PathLike[str] | None = None) -> None:
    """Refuse weights with NaN or infinite entries in any floating-point (or complex) tensor.

    Such a model's logits are NaN or constant: evaluated, it reads as 0 % clean accuracy with NaN margins, a
    result about the file, not about the network. BatchNorm running statistics count like weights; integer
    tensors (``num_batches_tracked``) cannot be non-finite.

    Args:
        state_dict: the tensors.
        source: the file they came from, named in the message.

    Raises:
        NonFiniteWeightsError: one line naming the file, the first offending tensors with their NaN and Inf
            counts, the total, and the fix.
    """
    bad: list[tuple[str, int, int]] = []
    for key, value in state_dict.items():
        if not isinstance(value, Tensor) or not (value.is_floating_point() or value.is_complex()):
            continue
        finite = int(torch.isfinite(value).sum())
        if finite != value.numel():
            nan = int(torch.isnan(value).sum())
            bad.append((key, nan, value.numel() - finite - nan))
    if not bad:
        return
    total = sum(nan + inf for _, nan, inf in bad)

    def counts(nan: int, inf: int) -> str:
        return " and ".join(f"{n:,} {label}" for n, label in ((nan, "NaN"), (inf, "Inf")) if n)

    shown = ", ".join(f"{key} ({counts(nan, inf)})" for key, nan, inf in bad[:3])
    more = f" and {len(bad) - 3} more" if len(bad) > 3 else ""
    where = f"checkpoint {source} holds" if source is not None else "the weights hold"
    raise NonFiniteWeightsError(
        f"{where} {total:,} non-finite entr{'y' if total == 1 else 'ies'} in {len(bad)} "
        f"tensor{'s' if len(bad) > 1 else ''}: {shown}{more}; the checkpoint is corrupt or diverged; re-export it "
        "from a finite training state"
    )


_STORAGE_ELEMENT_BYTES = {
    "DoubleStorage": 8, "FloatStorage": 4, "HalfStorage": 2, "BFloat16Storage": 2, "LongStorage": 8,
    "IntStorage": 4, "ShortStorage": 2, "CharStorage": 1, "ByteStorage": 1, "BoolStorage": 1,
    "ComplexFloatStorage": 8, "ComplexDoubleStorage": 16, "UntypedStorage": 1,
}  # fmt: skip


def check_torch_archive(path: str | os.PathLike[str]) -> None:
    """Refuse a ``torch.save`` file whose tensors would unpack to more than the file holds (a memory bomb).

    ``torch.load`` allocates what the file declares before reading it, so a small file could ask for many
    gigabytes even weights-only. torch's zip format never compresses its entries: a compressed entry, or
    entries declaring more bytes than the archive has, are refused. The legacy (pre-1.6) format is scanned
    without executing anything: its storages' declared sizes must fit in the file. The pre-0.4 tar format is
    refused. Call it before :func:`torch.load` on untrusted files (:func:`load_state_dict` does).

    Raises:
        FileNotFoundError, NotACheckpointError: see :func:`checkpoint_format`, which runs first.
        UnsafeCheckpointError: the file declares more data than it holds, or uses compression or the tar format.
    """
    path = Path(path)
    if checkpoint_format(path) == "safetensors":
        raise NotACheckpointError(f"{path} is a safetensors file where a torch.save file was expected")
    size = path.stat().st_size
    fix = "Fix: re-save the weights with torch.save(model.state_dict(), path) (torch >= 1.6) or as safetensors."
    if zipfile.is_zipfile(path):
        try:
            with zipfile.ZipFile(path) as archive:
                infos = archive.infolist()
        except (zipfile.BadZipFile, OSError) as e:
            raise ValueError(f"could not read {path} as a checkpoint (corrupt zip): {e}") from None
        compressed = [i.filename for i in infos if i.compress_type != zipfile.ZIP_STORED]
        if compressed:
            raise UnsafeCheckpointError(
                f"checkpoint {path} has compressed entries ({compressed[0]}, ...); torch.save never compresses, and a "
                f"compressed entry can unpack to far more memory than the file's size. {fix}"
            )
        declared = sum(i.file_size for i in infos)
        if declared > size:
            raise UnsafeCheckpointError(
                f"checkpoint {path} declares {declared:,} bytes of entries in a {size:,}-byte file. {fix}"
            )
        return
    if tarfile.is_tarfile(path):
        raise UnsafeCheckpointError(f"checkpoint {path} uses torch's pre-0.4 tar format, which is not read. {fix}")
    declared = _legacy_declared_bytes(path)
    if declared > size:
        raise UnsafeCheckpointError(
            f"checkpoint {path} declares {declared:,} bytes of tensors in a {size:,}-byte file. {fix}"
        )


class _Inert:
    """Stands for any global in the scanned pickle: accepts any arguments and state, does nothing."""

    def __init__(self, *args, **kwargs) -> None:
        pass

    def __setstate__(self, state) -> None:
        pass

    def __setitem__(self, key, value) -> None:  # SETITEM(S) on a stand-in OrderedDict
        pass

    def append(self, value) -> None:  # APPEND(S) on a stand-in list
        pass

    def extend(self, values) -> None:
        pass


class _LegacyScanner(pickle.Unpickler):
    """Walks a legacy ``torch.save`` pickle without importing or calling anything, summing storage sizes."""

    def __init__(self, file) -> None:
        super().__init__(file)
        self.nbytes = 0

    def find_class(self, module: str, name: str):
        if module.startswith("torch") and name in _STORAGE_ELEMENT_BYTES:
            return type(name, (_Inert,), {})
        return _Inert

    def persistent_load(self, pid):
        if isinstance(pid, tuple) and len(pid) >= 5 and pid[0] == "storage":
            element = _STORAGE_ELEMENT_BYTES.get(getattr(pid[1], "__name__", ""), 8)
            numel = pid[4] if isinstance(pid[4], int) else 0
            self.nbytes += max(numel, 0) * element
        return _Inert()


def _legacy_declared_bytes(path: Path) -> int:
    # Layout: magic number, protocol version, sys info, then the object pickle whose persistent ids name
    # each storage with its element count; the raw storages follow.
    try:
        with open(path, "rb") as f:
            for _ in range(3):
                _LegacyScanner(f).load()
            scanner = _LegacyScanner(f)
            scanner.load()
    except Exception:  # not a legacy torch file at all: torch.load reports what it is
        return 0
    return scanner.nbytes


def _unpickler_detail(error: Exception) -> str:
    # torch wraps the one informative line in paragraphs of advice that do not apply to untrusted files.
    found = re.search(r"WeightsUnpickler error:\s*(.+?)\s*(?:\n\n|$)", str(error), flags=re.DOTALL)
    return found.group(1) if found else str(error).splitlines()[0]


def _unsafe_message(path: Path, refused: str) -> str:
    what = f" (first refused: {refused})"
    return (
        f"checkpoint {path} contains pickled Python objects beyond tensors{what}. Checkpoints are untrusted "
        "and are loaded weights-only, so it was not unpickled. Fix: re-save just the weights, "
        "torch.save(model.state_dict(), path), or save them as safetensors "
        "(safetensors.torch.save_file(model.state_dict(), path))."
    )


def _tensor_items(obj: Mapping) -> dict[str, Tensor]:
    return {str(k): v for k, v in obj.items() if isinstance(v, Tensor)}


def _extract_state_dict(obj: object, path: Path) -> dict[str, Tensor]:
    if not isinstance(obj, Mapping):
        raise ValueError(f"checkpoint {path} holds a {type(obj).__name__}, not a state dict")
    for _ in range(4):  # a bound on nesting, e.g. {"model": {"state_dict": ...}}
        inner = next(
            (obj[k] for k in _CONTAINER_KEYS if isinstance(obj.get(k), Mapping) and _has_tensors(obj[k])),
            None,
        )
        if inner is None:
            break
        obj = inner
    tensors = _tensor_items(obj)
    if not tensors:
        keys = ", ".join(map(str, list(obj)[:_SHOWN_KEYS]))
        raise ValueError(f"checkpoint {path} holds no tensors (top-level keys: {keys or 'none'})")
    return {k.removeprefix(_DATA_PARALLEL_PREFIX): v for k, v in tensors.items()}


def _has_tensors(obj: Mapping) -> bool:
    return any(isinstance(v, Tensor) for v in obj.values()) or any(
        isinstance(v, Mapping) and _has_tensors(v) for v in obj.values()
    )


def _preview(keys: list[str]) -> str:
    shown = ", ".join(keys[:_SHOWN_KEYS])
    more = f", ... ({len(keys) - _SHOWN_KEYS} more)" if len(keys) > _SHOWN_KEYS else ""
    return shown + more


def drop_unused_keys(state_dict: Mapping[str, Tensor], expected: Collection[str] = ()) -> dict[str, Tensor]:
    """``state_dict`` without the weights of modules that their authors' forward never calls.

    TRADES's WideResNet (RobustBench's, HYDRA's WRN-28-4, PwoA's WRN-34-10) defines a ``sub_block1`` that its
    forward never calls, and saves it; our :class:`bench.models.WideResNet` leaves it out. Every loading path (a
    plain checkpoint, a converted author file, a stored model) goes through here, so one file loads the same way
    whichever path reads it. Keys in ``expected`` are kept: a model that does have such a module gets its weights.
    """
    keep = set(expected)
    return {
        k: v
        for k, v in state_dict.items()
        if k in keep or not k.removeprefix(_NET_PREFIX).startswith(WRN_UNUSED_PREFIXES)
    }


def load_weights(
    model: nn.Module,
    state_dict: Mapping[str, Tensor],
    *,
    strict: bool = True,
    source: str | os.PathLike[str] | None = None,
) -> torch.nn.modules.module._IncompatibleKeys:
    """Load ``state_dict`` into ``model``, explaining any mismatch.

    An architecture's own keys (``conv1.weight``) are accepted for a :class:`NormalizedModel`, whose keys
    are ``net.conv1.weight``. A missing BatchNorm ``num_batches_tracked`` counter is not an error
    (checkpoints from before PyTorch 0.4 lack it; PyTorch fills it in), and the weights of modules the authors'
    forward never calls are dropped (:func:`drop_unused_keys`).

    Args:
        model: the model to load into.
        state_dict: the weights, e.g. from :func:`load_state_dict`.
        strict: whether missing or unexpected keys are an error. Shape mismatches always are.
        source: the file the weights came from, named if they are refused as non-finite.

    Returns:
        The missing and unexpected keys, as ``nn.Module.load_state_dict`` returns them.

    Raises:
        CheckpointMismatchError: keys or shapes do not match, naming them.
        NonFiniteWeightsError: a tensor to be loaded holds NaN or Inf (:func:`check_finite`); the model is untouched.
    """
    sd = dict(state_dict)
    if isinstance(model, NormalizedModel) and not any(k.startswith(_NET_PREFIX) for k in sd):
        sd = {_NET_PREFIX + k: v for k, v in sd.items()}
    expected = model.state_dict()
    sd = drop_unused_keys(sd, expected)
    missing = [k for k in expected if k not in sd and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in sd if k not in expected]
    mismatched = [
        (k, tuple(v.shape), tuple(expected[k].shape))
        for k, v in sd.items()
        if k in expected and tuple(v.shape) != tuple(expected[k].shape)
    ]
    if mismatched or (strict and (missing or unexpected)):
        raise CheckpointMismatchError(
            _mismatch_message(missing, unexpected, mismatched), missing, unexpected, mismatched
        )
    # Again here, on exactly what the model takes: every path ends here, including converters whose arithmetic
    # (MAD's softplus masks) or loaders (MAD's own, RobustBench's) bypass load_state_dict.
    check_finite({k: v for k, v in sd.items() if k in expected}, source=source)
    return model.load_state_dict(sd, strict=strict)


def _mismatch_message(
    missing: list[str], unexpected: list[str], mismatched: list[tuple[str, tuple[int, ...], tuple[int, ...]]]
) -> str:
    lines = [
        f"checkpoint does not match the model: {len(missing)} missing, {len(unexpected)} unexpected, "
        f"{len(mismatched)} shape-mismatched keys"
    ]
    if missing:
        lines.append(f"  missing ({len(missing)}): {_preview(missing)}")
    if unexpected:
        lines.append(f"  unexpected ({len(unexpected)}): {_preview(unexpected)}")
    if mismatched:
        shapes = [f"{k} checkpoint {list(c)} vs model {list(m)}" for k, c, m in mismatched]
        lines.append(f"  shape mismatch ({len(mismatched)}): {_preview(shapes)}")
    lines.append(
        "hint: is --arch (or the number of classes) right? (bench models lists architectures) "
        "A checkpoint in a method's native format (extra keys such as popup_scores or masks, "
        "or other names) needs --format."
    )
    return "\n".join(lines)
