"""Optimizer state between the engine's records and checkpoint files, record by record.

A save walks the engine's records once (``Engine.read_records``: each sub-group fetched once,
in swap-file order, fetches running ahead) and writes every slice of every record straight to
its place in the state file; a load walks the records once in write mode
(``Engine.write_records`` with overwrite: no record is fetched, each is stored once) and reads
each slice straight from its place in the file(s). The bytes moved are the state's size, not
the state's size times the tensors per sub-group.

The file layout is the format's (see ``checkpoint``): for each saved parameter (or rank's slice
of one), in order, its slots one after another, fp32, each an *extent* with its own checksum.
New extents carry ``xxh3`` (XXH3-128 in C++, tens of GB/s: the save keeps the drive's pace);
extents written before this carry ``blake2b``, which is still verified. Each extent is hashed
as its bytes pass, in order; one that arrives out of order (a parameter split across records
whose records sit out of order on the tier) is hashed from the file afterwards.
"""

import hashlib
import os

import torch

from .. import _C
from .._torch_compat import tensor_from_buffer

_CHUNK = 8 << 20


class StateFileError(_C.StrataError):
    """A checkpoint's optimizer-state file is short or does not match its checksums."""


def _floats(mv):
    return tensor_from_buffer(mv, torch.float32)


def _bytes_of(t):
    return memoryview(t.numpy()).cast("B")


def _pwrite_one(fd, mv, offset, path):
    while len(mv):
        n = os.pwrite(fd, mv, offset)
        if n <= 0:
            raise OSError(f"{path}: short write at offset {offset}")
        mv, offset = mv[n:], offset + n


def _pread_one(fd, mv, offset):
    got = 0
    while got < len(mv):
        n = os.preadv(fd, [mv[got:]], offset + got)
        if n <= 0:
            return got
        got += n
    return got


# Large reads and writes go out as _IO_CHUNK pieces on a few threads (the calls release the
# GIL): a drive reaches its rate only with several requests in flight, and one buffered
# read or write at a time (readahead, page-cache copies) leaves it mostly idle.
_IO_CHUNK = 8 << 20
_IO_THREADS = 4
_pool = None


def _io_pool():
    global _pool
    if _pool is None:
        from concurrent.futures import ThreadPoolExecutor

        _pool = ThreadPoolExecutor(_IO_THREADS, thread_name_prefix="strata-ckpt-io")
    return _pool


def _chunks(mv, offset):
    return [(mv[a:a + _IO_CHUNK], offset + a) for a in range(0, len(mv), _IO_CHUNK)]


def submit_pwrite(fd, mv, offset, path):
    """Start writing ``mv`` at ``offset`` in _IO_CHUNK pieces on the I/O threads; returns
    the futures (``mv`` must stay valid until they are done)."""
    return [_io_pool().submit(_pwrite_one, fd, m, o, path) for m, o in _chunks(mv, offset)]


def submit_pread(fd, mv, offset):
    """Start reading into ``mv`` from ``offset``; returns [(piece, future)] (each future's
    result: bytes read into that piece)."""
    return [(m, _io_pool().submit(_pread_one, fd, m, o)) for m, o in _chunks(mv, offset)]


def wait_all(futures):
    """Waits for every future (also when one failed), then raises the first error."""
    first = None
    for f in futures:
        try:
            f.result()
        except BaseException as e:  # noqa: B902 - re-raised below, after the others finished
            if first is None:
                first = e
    if first is not None:
        raise first


def _pread_all(fd, mv, offset):
    """Bytes read into ``mv`` from ``offset`` (fewer only at the end of the file)."""
    if len(mv) <= _IO_CHUNK:
        return _pread_one(fd, mv, offset)
    return _count_read(submit_pread(fd, mv, offset))


def _count_read(parts):
    wait_all([f for _, f in parts])
    got = 0
    for m, f in parts:
        got += f.result()
        if f.result() < len(m):
            break
    return got


def hasher_for(slot):
    if "blake2b" in slot and "xxh3" not in slot:
        return hashlib.blake2b(digest_size=16), "blake2b"
    return _C.Xxh3(), "xxh3"


class _ExtentCheck:
    """The running checksum of one saved extent while a load reads it (in any pieces)."""

    def __init__(self, path, name, slot):
        self.path, self.name, self.slot = path, name, slot
        self.h, self.algo = hasher_for(slot)
        self.at = 0  # bytes of the extent hashed so far, from its start

    def _hash_file(self, fd, upto):
        buf = bytearray(min(_CHUNK, max(upto - self.at, 1)))
        mv = memoryview(buf)
        while self.at < upto:
            k = _pread_all(fd, mv[:min(len(mv), upto - self.at)], self.slot["offset"] + self.at)
            if k == 0:
                raise StateFileError(f"{self.path}: short read of parameter {self.name!r} slot "
                                     f"{self.slot['name']} (file truncated)")
            self.h.update(mv[:k])
            self.at += k

    def feed(self, fd, pos, mv):
        """``mv`` holds the extent's bytes [pos, pos + len(mv)), just read."""
        if pos > self.at:
            self._hash_file(fd, pos)
        end = pos + len(mv)
        if end > self.at:
            self.h.update(mv[self.at - pos:])
            self.at = end

    def finish(self, fd):
        self._hash_file(fd, self.slot["bytes"])
        if self.h.hexdigest() != self.slot[self.algo]:
            raise StateFileError(
                f"{self.path}: checksum mismatch in parameter {self.name!r} slot "
                f"{self.slot['name']} (bytes {self.slot['offset']}.."
                f"{self.slot['offset'] + self.slot['bytes']}): the file is corrupted")


def _hash_extent(fd, offset, nbytes):
    h = _C.Xxh3()
    buf = memoryview(bytearray(min(_CHUNK, max(nbytes, 1))))
    done = 0
    while done < nbytes:
        k = _pread_all(fd, buf[:min(len(buf), nbytes - done)], offset + done)
        if k == 0:
            raise StateFileError(f"short read at offset {offset + done} while hashing")
        h.update(buf[:k])
        done += k
    return h


def save_state(engine, path, items, advance=None, kill_point=None):
    """Write the state of ``items`` = [(j, slot_names)] (engine parameters, in file order)
    into ``path``; returns (file entry, [slot entries per item]). ``advance(nbytes)`` reports
    progress per record; ``kill_point()`` is called after each record (crash tests)."""
    layout, metas, off = {}, [], 0
    for j, slot_names in items:
        n = engine.param_numel(j)
        slots = []
        for name in slot_names:
            slots.append({"name": name, "offset": off, "bytes": 4 * n})
            off += 4 * n
        layout[j] = (slots, [_C.Xxh3() for _ in slots], [0] * len(slots))
        metas.append(slots)
    late = set()  # (j, k): an extent whose pieces came out of order, hashed from the file
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        # Allocated up front: a file grown by out-of-order writes from several threads is
        # allocated piecemeal at writeback (3x slower to write here, 0.65 vs 1.9 GB/s).
        try:
            os.posix_fallocate(fd, 0, off)
        except OSError:
            pass  # a file system without fallocate: the writes still work

        def visit(slices, mv):
            # Every write of the record is queued first; the extents are hashed while the
            # I/O threads write; the visit returns (and the record's buffer is reused) only
            # when all of them are done.
            record = _floats(mv)
            moved, pending, hash_now = 0, [], []
            for j, po, roff, n, stride in slices:
                slots, hashers, done = layout[j]
                for k, slot in enumerate(slots):
                    b = _bytes_of(record[k * stride + roff:k * stride + roff + n])
                    pending += submit_pwrite(fd, b, slot["offset"] + 4 * po, path)
                    if done[k] == 4 * po:
                        hash_now.append((hashers[k], b))
                        done[k] += len(b)
                    else:
                        late.add((j, k))
                    moved += len(b)
            try:
                for h, b in hash_now:
                    h.update(b)
            finally:
                wait_all(pending)
            if advance:
                advance(moved)
            if kill_point:
                kill_point()

        engine.read_records(visit, [j for j, _ in items])
        if late:
            os.fsync(fd)
            with open(path, "rb", buffering=0) as f:
                for j, k in sorted(late):
                    slots, hashers, _ = layout[j]
                    hashers[k] = _hash_extent(f.fileno(), slots[k]["offset"], slots[k]["bytes"])
        for j, _ in items:
            slots, hashers, _ = layout[j]
            for slot, h in zip(slots, hashers):
                slot["xxh3"] = h.hexdigest()
        os.fsync(fd)
    finally:
        os.close(fd)
    return {"bytes": off, "checksums": "per extent (xxh3)"}, metas


def load_state(engine, items, advance=None):
    """Fill the engine's records from checkpoint files. ``items`` = {j: (name, lo, pieces)}:
    engine parameter j holds elements [lo, lo + numel) of the saved parameter ``name``,
    whose state is in ``pieces`` = [(start, numel, path, slots)] (the saved extents of
    elements [start, start + numel), slot order as the engine's). Every slot of every item
    must be covered (the caller validated the checkpoint). Each extent read is verified
    against its checksum; a mismatch raises StateFileError naming the file, parameter and
    bytes (the records already written keep what was read)."""
    fds, checks = {}, {}

    def fd_of(path):
        fd = fds.get(path)
        if fd is None:
            fd = fds[path] = os.open(path, os.O_RDONLY)
        return fd

    try:
        def visit(slices, mv):
            # Every read of the record is queued first, then checked (lengths, checksums
            # in each extent's order) as the pieces arrive.
            record = _floats(mv)
            moved, reads = 0, []
            for j, po, roff, n, stride in slices:
                name, lo, pieces = items[j]
                a0, e0 = lo + po, lo + po + n
                for start, numel, path, slots in pieces:
                    a, e = max(a0, start), min(e0, start + numel)
                    if a >= e:
                        continue
                    fd = fd_of(path)
                    for k, slot in enumerate(slots):
                        at = k * stride + roff + (a - a0)
                        b = _bytes_of(record[at:at + (e - a)])
                        pos = 4 * (a - start)
                        reads.append((path, fd, name, slot, pos, b,
                                      submit_pread(fd, b, slot["offset"] + pos)))
                        moved += len(b)
            try:
                for path, fd, name, slot, pos, b, parts in reads:
                    if _count_read(parts) != len(b):
                        raise StateFileError(
                            f"{path}: short read of parameter {name!r} slot {slot['name']} "
                            f"at offset {slot['offset'] + pos} (file truncated)")
                    key = (path, slot["offset"])
                    chk = checks.get(key)
                    if chk is None:
                        chk = checks[key] = _ExtentCheck(path, name, slot)
                    chk.feed(fd, pos, b)
            finally:
                wait_all([f for *_, parts in reads for _, f in parts])
            if advance:
                advance(moved)

        engine.write_records(visit, list(items), True)
        for (path, _), chk in checks.items():
            chk.finish(fd_of(path))
    finally:
        for fd in fds.values():
            os.close(fd)
