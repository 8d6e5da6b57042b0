"""What makes an untrusted checkpoint file safe to read, checked before and after reading it.

Before anything opens it, the path must be a regular file with content (:func:`check_input_file`: a symlink is
followed to one; a FIFO, a device or a kernel file is refused without being opened) whose first bytes are one of
the formats read (:func:`checkpoint_format`). A ``torch.save`` file must not declare more tensor bytes than it
holds (:func:`check_torch_archive`: ``torch.load`` allocates what the file declares, weights-only or not; a legacy
pickle is walked without importing or calling anything). The weights read must be finite (:func:`check_finite`).
:mod:`bench.checkpoints.loading` runs these checks on every file it reads.
"""

from __future__ import annotations

import os
import pickle
import stat
import tarfile
import zipfile
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import Tensor

__all__ = [
    "NonFiniteWeightsError",
    "NotACheckpointError",
    "UnsafeCheckpointError",
    "check_finite",
    "check_input_file",
    "check_torch_archive",
    "checkpoint_format",
]


class UnsafeCheckpointError(ValueError):
    """The checkpoint holds pickled Python objects that a weights-only load refuses."""


class NotACheckpointError(ValueError):
    """The path is not a file a checkpoint can be read from: a special file, an empty one, or another format."""


class NonFiniteWeightsError(ValueError):
    """The weights hold NaN or infinite entries: a model computed from them is meaningless."""


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
