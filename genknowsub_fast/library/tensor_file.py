"""safetensors files read and written one tensor at a time: reading the header, copying one tensor into memory,
mapping one tensor (with protection against the file being rewritten while it is mapped), and writing a file whose
tensors are laid out in advance, page-aligned, as they are produced.

A mapped tensor is a view of the file's pages (``MAP_PRIVATE``: writing to the tensor never changes the file). A file
that is truncated or rewritten while a process maps it would make that process die of SIGBUS on its next read, so a
mapped file is held with a read lease (``fcntl(F_SETLEASE)``): when another process opens it for writing or
truncates it, the kernel holds that process back and signals this one, which first copies every region it maps into
anonymous memory at the same addresses (``mremap``), then lets the writer go on. The tensors keep the content they
had; they no longer follow the file. The signal goes to one thread of this module's (``F_SETOWN_EX``), which waits
for it with ``sigwaitinfo``, so the copy does not wait for the main thread. A forked child leases the file again for
its own mappings. Where no lease can be taken (the file belongs to another user, a file system without leases, the
signal already has a handler), :meth:`MappedFile.take_lease` says so and the caller chooses between a copy and an
unprotected mapping.

Linux only for the mapping (mmap, mremap and leases through ctypes); reading and writing work everywhere.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import gc
import json
import mmap
import os
import signal
import struct
import sys
import threading
import weakref
from collections.abc import Iterable

import torch

PAGE = mmap.ALLOCATIONGRANULARITY
MAX_HEADER = 100 * 2**20  # safetensors' own limit on the JSON header

DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}


class TensorInfo:
    """Where one tensor lies in a safetensors file: dtype, shape and byte range (from the start of the data)."""

    __slots__ = ("dtype", "shape", "begin", "end")

    def __init__(self, dtype: torch.dtype | None, shape: tuple[int, ...], begin: int, end: int):
        self.dtype, self.shape, self.begin, self.end = dtype, shape, begin, end

    @property
    def nbytes(self) -> int:
        return self.end - self.begin


class Header:
    """A safetensors file's header: its tensors (in file order), metadata, where the data starts and the file size."""

    def __init__(self, tensors: dict[str, TensorInfo], metadata: dict[str, str], data_start: int, file_size: int):
        self.tensors, self.metadata, self.data_start, self.file_size = tensors, metadata, data_start, file_size

    def same_layout(self, other: Header) -> bool:
        """Whether ``other`` describes the same tensors at the same places, with the same metadata (the file's size
        may differ past the data)."""

        def key(h: Header):
            return h.metadata, h.data_start, {k: (t.dtype, t.shape, t.begin, t.end) for k, t in h.tensors.items()}

        return key(self) == key(other)


class FormatError(ValueError):
    """The bytes are not a safetensors file (or one this reader can use)."""


def read_header(fd: int, path: str) -> Header:
    """The header of the safetensors file open as ``fd``; FormatError when it is not one, or is truncated (its
    tensors reach past the end of the file) or not contiguous."""
    size = os.fstat(fd).st_size
    head = os.pread(fd, 8, 0)
    if len(head) < 8:
        raise FormatError(f"{path!r} is too short to be a safetensors file ({size} bytes)")
    (n,) = struct.unpack("<Q", head)
    if n > MAX_HEADER or 8 + n > size:
        raise FormatError(f"{path!r} is not a safetensors file (header length {n} in a file of {size} bytes)")
    raw = os.pread(fd, n, 8)
    try:
        doc = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise FormatError(f"{path!r} is not a safetensors file (its header is not JSON: {exc})") from None
    if not isinstance(doc, dict):
        raise FormatError(f"{path!r} is not a safetensors file (its header is not a JSON object)")
    metadata = doc.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise FormatError(f"{path!r}: safetensors metadata must map strings to strings")
    data_start = 8 + n
    tensors: dict[str, TensorInfo] = {}
    for key, entry in doc.items():
        try:
            dtype_name, shape, (begin, end) = entry["dtype"], tuple(entry["shape"]), entry["data_offsets"]
            if not all(isinstance(v, int) and v >= 0 for v in (*shape, begin, end)) or end < begin:
                raise TypeError
        except (TypeError, KeyError, ValueError):
            raise FormatError(f"{path!r}: tensor {key!r} has a malformed header entry {entry!r}") from None
        dtype = DTYPES.get(dtype_name)
        count = 1
        for s in shape:
            count *= s
        item = dtype.itemsize if dtype is not None else None
        if item is not None and count * item != end - begin:
            raise FormatError(f"{path!r}: tensor {key!r} has {end - begin} bytes for shape {list(shape)} {dtype_name}")
        tensors[key] = TensorInfo(dtype, shape, begin, end)
    ordered = sorted(tensors.values(), key=lambda t: t.begin)
    at = 0
    for t in ordered:
        if t.begin != at:
            raise FormatError(f"{path!r}: its tensors do not cover the data contiguously (a gap or overlap at {at})")
        at = t.end
    if data_start + at > size:
        raise FormatError(
            f"{path!r} is truncated: its header describes {data_start + at} bytes but the file has {size}"
        )
    return Header(tensors, metadata, data_start, size)


def _check_readable(info: TensorInfo, key: str, path: str) -> torch.dtype:
    if info.dtype is None:
        raise FormatError(f"{path!r}: tensor {key!r} has a dtype this reader does not know")
    if sys.byteorder != "little" and info.dtype.itemsize > 1:
        raise FormatError("safetensors files are little-endian; this machine is not")
    return info.dtype


def _buffer(address: int, nbytes: int):
    return (ctypes.c_char * nbytes).from_address(address)


def read_into(fd: int, offset: int, out: torch.Tensor, path: str = "") -> torch.Tensor:
    """Fill the contiguous CPU tensor ``out`` with the bytes of ``fd`` at ``offset``; returns it."""
    nbytes = out.numel() * out.element_size()
    view = memoryview(_buffer(out.data_ptr(), nbytes)).cast("B") if nbytes else memoryview(b"")
    done = 0
    while done < nbytes:
        got = os.preadv(fd, [view[done:]], offset + done)
        if got == 0:
            raise FormatError(f"{path!r} ended while a tensor was read (at byte {offset + done})")
        done += got
    return out


def read_tensor(fd: int, header: Header, key: str, path: str = "") -> torch.Tensor:
    """The tensor ``key`` of the file as a new tensor in memory (no mapping)."""
    info = header.tensors[key]
    dtype = _check_readable(info, key, path)
    out = torch.empty(info.shape, dtype=dtype)
    return read_into(fd, header.data_start + info.begin, out, path)


# ------------------------------------------------------------------------------------------------------ writing
def plan_layout(specs: Iterable[tuple[str, torch.dtype, tuple[int, ...], bool]], metadata: dict[str, str]):
    """(header bytes, {key: absolute offset}, file size) of a file holding ``specs`` (key, dtype, shape, aligned)
    in that order; aligned tensors start on a page (filler ``U8`` tensors named ``.align.<n>`` close the gaps, since a
    safetensors file has no holes), and the data starts on a page."""
    entries: dict[str, dict] = {}
    offsets: dict[str, int] = {}
    at = 0
    pads = 0
    specs = list(specs)

    def pad_to_page(at: int) -> int:
        nonlocal pads
        gap = -at % PAGE
        if gap:
            entries[f".align.{pads}"] = {"dtype": "U8", "shape": [gap], "data_offsets": [at, at + gap]}
            pads += 1
        return at + gap

    for key, dtype, shape, aligned in specs:
        if aligned:
            at = pad_to_page(at)
        count = 1
        for s in shape:
            count *= int(s)
        n = count * dtype.itemsize
        entries[key] = {"dtype": DTYPE_NAMES[dtype], "shape": [int(s) for s in shape], "data_offsets": [at, at + n]}
        offsets[key] = at
        at += n
    doc = {"__metadata__": metadata, **entries}
    text = json.dumps(doc, separators=(",", ":")).encode("utf-8")
    length = len(text) + (-(8 + len(text)) % PAGE)  # spaces pad the header so that the data starts on a page
    header = struct.pack("<Q", length) + text + b" " * (length - len(text))
    start = len(header)
    return header, {k: start + v for k, v in offsets.items()}, start + at


def write_at(fd: int, offset: int, tensor: torch.Tensor) -> None:
    """Write the bytes of the contiguous CPU tensor ``tensor`` to ``fd`` at ``offset``."""
    if tensor.device.type != "cpu" or not tensor.is_contiguous():
        raise ValueError("write_at needs a contiguous CPU tensor")
    nbytes = tensor.numel() * tensor.element_size()
    if not nbytes:
        return
    view = memoryview(_buffer(tensor.data_ptr(), nbytes)).cast("B")
    done = 0
    while done < nbytes:
        done += os.pwrite(fd, view[done : done + (1 << 30)], offset + done)


# ------------------------------------------------------------------------------------------------------ mapping
_libc = None
PROT_READ, PROT_WRITE, MAP_PRIVATE, MAP_ANONYMOUS = 1, 2, 0x02, 0x20
MREMAP_MAYMOVE, MREMAP_FIXED = 1, 2
F_SETSIG = getattr(fcntl, "F_SETSIG", 10)
F_SETLEASE = getattr(fcntl, "F_SETLEASE", 1024)
F_GETLEASE = getattr(fcntl, "F_GETLEASE", 1025)
# The signal a lease break sends (F_SETSIG): a real-time one that libraries rarely use, so that SIGIO stays free.
LEASE_SIGNAL = signal.SIGRTMAX - 7 if hasattr(signal, "SIGRTMAX") else None


def _c():
    global _libc
    if _libc is None:
        lib = ctypes.CDLL(None, use_errno=True)
        lib.mmap.restype = ctypes.c_void_p
        lib.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
        lib.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
        lib.mremap.restype = ctypes.c_void_p
        lib.mremap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_size_t, ctypes.c_int, ctypes.c_void_p]
        _libc = lib
    return _libc


_MAP_FAILED = ctypes.c_void_p(-1).value
_region_types: dict[int, type] = {}


def _region_type(nbytes: int) -> type:
    # A Python subclass of a ctypes array: it can carry a finalizer (weakref) that unmaps the pages when the last
    # tensor viewing them is gone.
    t = _region_types.get(nbytes)
    if t is None:
        t = _region_types[nbytes] = type("MappedRegion", (ctypes.c_char * nbytes,), {})
    return t


F_SETOWN_EX = getattr(fcntl, "F_SETOWN_EX", 15)
F_OWNER_TID = getattr(fcntl, "F_OWNER_TID", 0)
SIG_IGN_ADDRESS = 1  # the C value of SIG_IGN

_state_lock = threading.Lock()
_watcher_tid: int | None = None  # the thread that receives lease breaks (its kernel thread id)
_leased: dict[int, weakref.ref] = {}  # id → MappedFile, for the watcher


def _detach_broken(*_) -> None:
    for ref in list(_leased.values()):
        mf = ref()
        if mf is not None and mf.lease_broken():
            mf.detach()


def _watch(ready: threading.Event, tid: list[int]) -> None:
    # Lease breaks are directed at this thread (F_SETOWN_EX), which keeps the signal blocked and takes it with
    # sigwaitinfo: the copy runs at once, whatever the other threads are doing (a Python signal handler would wait
    # for the main thread to reach its next bytecode), and a library may be loaded from any thread.
    signal.pthread_sigmask(signal.SIG_BLOCK, {LEASE_SIGNAL})
    tid.append(threading.get_native_id())
    ready.set()
    while True:
        signal.sigwaitinfo({LEASE_SIGNAL})
        _detach_broken()


def _start_watcher() -> str | None:
    """None once the thread that receives lease breaks runs, else why it cannot."""
    global _watcher_tid
    with _state_lock:
        if _watcher_tid is not None:
            return None
        if LEASE_SIGNAL is None or not sys.platform.startswith("linux"):
            return "file leases are a Linux feature"
        current = signal.getsignal(LEASE_SIGNAL)
        if current not in (signal.SIG_DFL, signal.SIG_IGN) and current is not _detach_broken:
            return f"signal {LEASE_SIGNAL} already has a handler"
        # Between taking a lease and directing it at the watcher the kernel signals the whole process: that signal
        # must not kill it (the default action), and take_lease looks for a break it may have announced.
        if current is signal.SIG_DFL:
            if threading.current_thread() is threading.main_thread():
                signal.signal(LEASE_SIGNAL, _detach_broken)  # reset to the default in programs this one executes
            else:
                c = _c()
                c.signal.restype, c.signal.argtypes = ctypes.c_void_p, [ctypes.c_int, ctypes.c_void_p]
                c.signal(LEASE_SIGNAL, SIG_IGN_ADDRESS)  # signal.signal works in the main thread only
        ready, tid = threading.Event(), []
        threading.Thread(target=_watch, args=(ready, tid), name="genknowsub_fast lease watcher", daemon=True).start()
        ready.wait()
        _watcher_tid = tid[0]
        return None


def _after_fork_in_child() -> None:
    # The child has no watcher thread, and its mappings share the parent's lease (one open file): each file is opened
    # again, and leased again, for the child.
    global _state_lock, _watcher_tid
    _state_lock, _watcher_tid = threading.Lock(), None
    for ref in list(_leased.values()):
        mf = ref()
        if mf is not None:
            mf._lease_again()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


class MappedFile:
    """A file open for mapping its tensors: a descriptor (closed once no mapping needs it), the read lease that
    protects the mappings, and the live mapped regions (so that a lease break can copy them)."""

    def __init__(self, path: str, fd: int):
        self.path, self.fd = path, fd
        self.protected = False
        self.why_unprotected: str | None = None
        self.detached = False
        self._regions: dict[int, tuple[int, int]] = {}  # id → (address, length) of each live mapping
        # Re-entrant: a finalizer that unmaps a region may run (garbage collection) where this thread holds it.
        self._lock = threading.RLock()
        self._done = False  # no more mappings will be made (the fd closes with the last one)

    def take_lease(self) -> bool:
        """Hold a read lease on the file so that a writer waits until the mappings are copied; False (with
        :attr:`why_unprotected`) when it cannot be taken."""
        why = _start_watcher()
        if why is None:
            try:
                fcntl.fcntl(self.fd, F_SETSIG, LEASE_SIGNAL)
                fcntl.fcntl(self.fd, F_SETLEASE, fcntl.F_RDLCK)
                fcntl.fcntl(self.fd, F_SETOWN_EX, struct.pack("ii", F_OWNER_TID, _watcher_tid))
            except OSError as exc:
                with contextlib.suppress(OSError):
                    fcntl.fcntl(self.fd, F_SETLEASE, fcntl.F_UNLCK)
                reason = {
                    errno.EAGAIN: "the file is open for writing",
                    errno.EACCES: "this user does not own it",
                    errno.EINVAL: "its file system has no leases",
                }
                why = f"no read lease on it ({reason.get(exc.errno, exc.strerror or exc)})"
        if why is not None:
            self.why_unprotected = why
            return False
        self.protected = True
        _leased[id(self)] = weakref.ref(self)
        if self.lease_broken():  # a writer came before the break was directed at the watcher
            self.detach()
        return True

    def _lease_again(self) -> None:
        """In a forked child: a lease of the child's own on the file its mappings show (the watcher copies them)."""
        self._lock = threading.RLock()
        _leased.pop(id(self), None)
        if not self.protected or self.detached or self.fd < 0:
            return
        self.protected = False
        try:
            fd = os.open(f"/proc/self/fd/{self.fd}", os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
        except OSError as exc:
            fd, why = -1, f"cannot open it again ({exc.strerror or exc})"
        if fd >= 0:
            os.close(self.fd)  # the parent's open file (and lease) stays open in the parent
            self.fd = fd
            if self.take_lease():
                return
            why = self.why_unprotected
        print(f"genknowsub_fast: in this forked process the mapping of {self.path!r} is not protected against the "
              f"file being rewritten ({why})", file=sys.stderr)  # fmt: skip

    def lease_broken(self) -> bool:
        if not self.protected or self.detached:
            return False
        try:
            return fcntl.fcntl(self.fd, F_GETLEASE) != fcntl.F_RDLCK
        except OSError:
            return False

    def map_tensor(self, offset: int, dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
        """A tensor viewing the file's bytes at ``offset`` (private mapping: writes to it stay in this process)."""
        nbytes = dtype.itemsize
        for s in shape:
            nbytes *= s
        start = offset - offset % PAGE
        length = offset + nbytes - start
        c = _c()
        with self._lock:  # the lease is not given up between the mapping and its registration
            if self.detached:  # the file is being rewritten: what it held is no longer there to map
                raise OSError(errno.ESTALE, f"{self.path!r} was rewritten while it was being mapped")
            addr = c.mmap(None, length, PROT_READ | PROT_WRITE, MAP_PRIVATE, self.fd, start)
            if addr in (None, _MAP_FAILED):
                err = ctypes.get_errno()
                raise OSError(err, f"cannot map {self.path!r}: {os.strerror(err)}")
            region = _region_type(nbytes).from_address(addr + offset - start)
            self._regions[id(region)] = (addr, length)
        weakref.finalize(region, self._unmap, id(region))
        flat = torch.frombuffer(region, dtype=torch.uint8)
        return flat.view(dtype).view(shape)

    def _unmap(self, key: int) -> None:
        with self._lock:
            addr, length = self._regions.pop(key)
            last = not self._regions and self._done
        _c().munmap(addr, length)
        if last:
            self._close()

    def finish(self) -> None:
        """No more mappings: the descriptor (and the lease) go with the last mapping, now when there is none."""
        with self._lock:
            self._done = True
            last = not self._regions
        if last:
            self._close()

    def _close(self) -> None:
        _leased.pop(id(self), None)
        if self.fd >= 0:
            with contextlib.suppress(OSError):
                os.close(self.fd)
            self.fd = -1

    def detach(self) -> None:
        """Copy every live mapping into anonymous memory at the same address, then give the lease up: the tensors
        keep their bytes and no longer depend on the file."""
        c = _c()
        collecting = gc.isenabled()
        gc.disable()  # no finalizer may unmap a region of this file between the check below and its copy
        try:
            with self._lock:
                for key in list(self._regions):
                    if key in self._regions:  # not unmapped meanwhile
                        self._copy_region(c, *self._regions[key])
                self.detached = True
        finally:
            if collecting:
                gc.enable()
        with contextlib.suppress(OSError):
            fcntl.fcntl(self.fd, F_SETLEASE, fcntl.F_UNLCK)
        _leased.pop(id(self), None)

    def _copy_region(self, c, addr: int, length: int) -> None:
        new = c.mmap(None, length, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0)
        if new in (None, _MAP_FAILED):
            print(f"genknowsub_fast: cannot copy the mapping of {self.path!r} before it is rewritten (out of memory); "
                  "reading it later may fail", file=sys.stderr)  # fmt: skip
            return
        ctypes.memmove(new, addr, length)
        if c.mremap(new, length, length, MREMAP_MAYMOVE | MREMAP_FIXED, addr) in (None, _MAP_FAILED):
            c.munmap(new, length)


def open_for_mapping(path: str) -> tuple[MappedFile, Header]:
    """The file open for mapping (not yet leased: call :meth:`MappedFile.take_lease`) and its header."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
    try:
        header = read_header(fd, path)
    except BaseException:
        os.close(fd)
        raise
    return MappedFile(path, fd), header


__all__ = [
    "DTYPES",
    "DTYPE_NAMES",
    "FormatError",
    "Header",
    "MappedFile",
    "PAGE",
    "TensorInfo",
    "open_for_mapping",
    "plan_layout",
    "read_header",
    "read_into",
    "read_tensor",
    "write_at",
]
