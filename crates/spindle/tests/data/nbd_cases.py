# libnbd cases for `spindle nbd` (run by nbd_conformance.rs with the URI).
# The image: 16 MiB qcow2, 0xaa in the first MiB, -A, --discard=unmap.
import errno
import sys
import nbd

uri = sys.argv[1]
cases = 0


def case(name):
    global cases
    cases += 1
    print(f"case {cases}: {name}: ok")


h = nbd.NBD()
h.add_meta_context(nbd.CONTEXT_BASE_ALLOCATION)
h.add_meta_context("qemu:allocation-depth")
h.set_strict_mode(0)  # let us send what the server must refuse
h.connect_uri(uri)
assert h.get_structured_replies_negotiated()
case("structured replies negotiated through GO")
assert h.can_meta_context(nbd.CONTEXT_BASE_ALLOCATION)
assert h.can_meta_context("qemu:allocation-depth")
case("both metadata contexts selected")
for f in (h.can_flush, h.can_fua, h.can_trim, h.can_zero, h.can_fast_zero, h.can_cache, h.can_df, h.can_multi_conn):
    assert f(), f
assert not h.is_read_only()
case("transmission flags")
assert h.get_block_size(nbd.SIZE_MINIMUM) == 1
assert h.get_block_size(nbd.SIZE_PREFERRED) == 4096
assert h.get_block_size(nbd.SIZE_MAXIMUM) == 32 << 20
case("INFO_BLOCK_SIZE")

assert h.pread(4096, 0) == b"\xaa" * 4096
case("READ")

# A sparse structured read: data then a hole chunk.
chunks = []
def chunk(subbuf, offset, status, err):
    chunks.append((offset, len(subbuf), status))
    return 0
buf = h.pread_structured(2 << 20, 0, chunk)
assert buf[: 1 << 20] == b"\xaa" * (1 << 20) and buf[1 << 20 :] == bytes(1 << 20)
assert any(s == nbd.READ_HOLE for _, _, s in chunks), chunks
assert any(s == nbd.READ_DATA for _, _, s in chunks), chunks
case("structured READ: data and hole chunks")
chunks.clear()
h.pread_structured(2 << 20, 0, chunk, flags=nbd.CMD_FLAG_DF)
assert len(chunks) == 1 and chunks[0][2] == nbd.READ_DATA, chunks
case("READ with DF: one data chunk")

h.pwrite(b"\x5b" * 8192, 4 << 20, flags=nbd.CMD_FLAG_FUA)
assert h.pread(8192, 4 << 20) == b"\x5b" * 8192
case("WRITE with FUA")
h.zero(8192, 4 << 20, flags=nbd.CMD_FLAG_NO_HOLE)
assert h.pread(8192, 4 << 20) == bytes(8192)
case("WRITE_ZEROES NO_HOLE")
h.zero(1 << 20, 8 << 20, flags=nbd.CMD_FLAG_FAST_ZERO)
case("WRITE_ZEROES FAST_ZERO on qcow2")
h.trim(65536, 0)
assert h.pread(65536, 0) == bytes(65536)
case("TRIM (discard=unmap)")
h.cache(1 << 20, 0)
case("CACHE")
h.flush()
case("FLUSH")

entries = {}
def extents(metacontext, offset, e, err):
    entries.setdefault(metacontext, []).append(list(e))
    return 0
h.block_status(16 << 20, 0, extents)
base = [x for l in entries["base:allocation"] for x in l]
assert sum(base[0::2]) <= 16 << 20 and len(base) >= 4, base
assert base[1] & nbd.STATE_HOLE and base[1] & nbd.STATE_ZERO, base  # the trimmed head
case("BLOCK_STATUS base:allocation")
assert "qemu:allocation-depth" in entries
case("BLOCK_STATUS qemu:allocation-depth")
entries.clear()
h.block_status(16 << 20, 0, extents, flags=nbd.CMD_FLAG_REQ_ONE)
assert all(len(l) == 1 and len(l[0]) == 2 for l in entries.values()), entries
case("BLOCK_STATUS REQ_ONE: one extent per context")

def refused(fn, want):
    try:
        fn()
    except nbd.Error as e:
        assert e.errno in (want, errno.errorcode[want]), (e.errno, want, e)
        return
    raise AssertionError("not refused")

refused(lambda: h.pread(4096, 16 << 20), errno.EINVAL)
case("READ past the end: EINVAL")
refused(lambda: h.pwrite(b"x" * 512, (16 << 20) - 256), errno.ENOSPC)
case("WRITE past the end: ENOSPC")
refused(lambda: h.block_status(4096, 16 << 20, extents), errno.EINVAL)
case("BLOCK_STATUS past the end: EINVAL")

# Out of order: many reads in flight on one connection.
cookies = [h.aio_pread(nbd.Buffer(65536), i * 65536) for i in range(64)]
while h.aio_in_flight() > 0:
    h.poll(-1)
assert all(h.aio_command_completed(c) for c in cookies)
case("64 concurrent reads complete")

# Multi-conn: a write replied on one connection, flushed on another, read on a third.
h2 = nbd.NBD()
h2.connect_uri(uri)
h3 = nbd.NBD()
h3.connect_uri(uri)
h.pwrite(b"\x7c" * 4096, 12 << 20)
h2.flush()
assert h3.pread(4096, 12 << 20) == b"\x7c" * 4096
case("multi-conn: a write on one connection, flush on another, read on a third")
h2.shutdown()
h3.shutdown()

# LIST_META_CONTEXT through opt mode.
o = nbd.NBD()
o.set_opt_mode(True)
o.connect_uri(uri)
seen = []
o.opt_list_meta_context(lambda ctx: seen.append(ctx) or 0)
assert sorted(seen) == ["base:allocation", "qemu:allocation-depth"], seen
case("LIST_META_CONTEXT with no query lists both")
o.opt_abort()
case("ABORT")

h.shutdown()
case("DISC")
print(f"libnbd conformance cases: {cases}")
