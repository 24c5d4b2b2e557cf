# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
"""Cython wire codec: the API, bytes and errors of ``plexichat.wire._reference``.

Checksums come from the vendored ``xxhash.h`` (XXH3-64, inlined; on x86 the
long-input kernel is xxHash's own AVX2/AVX-512 code, picked at import the way
xxHash's ``xxh_x86dispatch.c`` does).  Frames are parsed straight from the
caller's buffer, ``encode_frames`` validates a batch, grows the output
``bytearray`` once and writes through a pointer, and ``FrameDecoder`` only
copies the one partial frame a stream chunk can end with.
"""

from cpython.buffer cimport PyBUF_SIMPLE, PyBuffer_Release, PyObject_GetBuffer
from cpython.bytearray cimport (
    PyByteArray_AS_STRING,
    PyByteArray_GET_SIZE,
    PyByteArray_Resize,
)
from cpython.bytes cimport (
    PyBytes_AS_STRING,
    PyBytes_CheckExact,
    PyBytes_FromStringAndSize,
    PyBytes_GET_SIZE,
)
from cpython.exc cimport PyErr_Clear
from cpython.long cimport PyLong_CheckExact
from cpython.number cimport PyNumber_Index
from cpython.object cimport PyObject
from libc.stdint cimport uint32_t, uint64_t
from libc.stdlib cimport free, malloc, realloc
from libc.string cimport memcpy

from plexichat.wire._types import (
    HARD_MAX_PAYLOAD,
    MAGIC,
    MAX_PAYLOAD,
    MAX_TYPE,
    MIN_TYPE,
    Frame,
    WireError,
)

cdef extern from *:
    """
    #define XXH_INLINE_ALL
    /* x86 without -mavx2: also build xxHash's own AVX2 and AVX-512 kernels
       and pick one at run time, as xxHash's xxh_x86dispatch.c does. */
    #if (defined(__x86_64__) || defined(__i386__)) && defined(__GNUC__) \\
        && !defined(__AVX2__)
    #  include <immintrin.h>
    #  define PX_DISPATCH 1
    #  define XXH_X86DISPATCH 1  /* 64-byte aligned accumulators */
    #  define XXH_DISPATCH_AVX2 1
    #  define XXH_TARGET_AVX2 __attribute__((__target__("avx2")))
    #  define XXH_DISPATCH_AVX512 1
    #  define XXH_TARGET_AVX512 __attribute__((__target__("avx512f")))
    #endif
    #include "xxhash.h"

    #ifdef PX_DISPATCH
    XXH_NO_INLINE XXH_TARGET_AVX2 XXH64_hash_t
    px_long_avx2(const void *input, size_t len) {
        return XXH3_hashLong_64b_internal(input, len, XXH3_kSecret,
            sizeof(XXH3_kSecret), XXH3_accumulate_avx2, XXH3_scrambleAcc_avx2);
    }
    XXH_NO_INLINE XXH_TARGET_AVX512 XXH64_hash_t
    px_long_avx512(const void *input, size_t len) {
        return XXH3_hashLong_64b_internal(input, len, XXH3_kSecret,
            sizeof(XXH3_kSecret), XXH3_accumulate_avx512, XXH3_scrambleAcc_avx512);
    }
    static XXH64_hash_t (*px_long)(const void *, size_t) = NULL;
    static const char *px_kernel = "sse2";

    static void px_select(int allow_avx512) {
        __builtin_cpu_init();
        if (allow_avx512 && __builtin_cpu_supports("avx512f")) {
            px_long = px_long_avx512; px_kernel = "avx512";
        } else if (__builtin_cpu_supports("avx2")) {
            px_long = px_long_avx2; px_kernel = "avx2";
        } else {
            px_long = NULL; px_kernel = "sse2";
        }
    }
    static inline uint32_t px_checksum(const void *p, size_t n) {
        if (n > XXH3_MIDSIZE_MAX && px_long != NULL) return (uint32_t)px_long(p, n);
        return (uint32_t)XXH3_64bits(p, n);
    }
    #else
    static const char *px_kernel = "default";
    static void px_select(int allow_avx512) { (void)allow_avx512; }
    static inline uint32_t px_checksum(const void *p, size_t n) {
        return (uint32_t)XXH3_64bits(p, n);
    }
    #endif

    static inline uint32_t px_load32(const unsigned char *p) {
        return ((uint32_t)p[0] << 24) | ((uint32_t)p[1] << 16)
             | ((uint32_t)p[2] << 8) | (uint32_t)p[3];
    }
    static inline void px_store32(unsigned char *p, uint32_t v) {
        p[0] = (unsigned char)(v >> 24); p[1] = (unsigned char)(v >> 16);
        p[2] = (unsigned char)(v >> 8); p[3] = (unsigned char)v;
    }
    /* The exact int *o* if it is within 0..high, else -1 (never an error). */
    static inline long long px_int_in_range(PyObject *o, long long high) {
        int overflow = 0;
        long long value;
    #if PY_VERSION_HEX >= 0x030C0000 && !defined(PYPY_VERSION)
        if (PyUnstable_Long_IsCompact((PyLongObject *)o)) {
            value = (long long)PyUnstable_Long_CompactValue((PyLongObject *)o);
            return (value < 0 || value > high) ? -1 : value;
        }
    #elif !defined(PYPY_VERSION)
        Py_ssize_t digits = Py_SIZE(o);
        const digit *d = ((PyLongObject *)o)->ob_digit;
        if (digits < 0) return -1;
        if (digits <= 2) {
            value = digits == 0 ? 0 : (long long)d[0];
            if (digits == 2) value |= (long long)d[1] << PyLong_SHIFT;
            return value > high ? -1 : value;
        }
    #endif
        value = PyLong_AsLongLongAndOverflow(o, &overflow);
        if (overflow || value < 0 || value > high) {
            PyErr_Clear();
            return -1;
        }
        return value;
    }
    /* A Frame built the way tuple.__new__(Frame, (type, id, payload)) does.
       It holds two ints and a bytes object, so it can never be part of a
       reference cycle: it is untracked, as CPython untracks such tuples. */
    static PyObject *px_frame(PyObject *cls, long type, uint32_t request_id,
                              const unsigned char *payload, Py_ssize_t size) {
        PyObject *t = NULL, *r = NULL, *b = NULL, *f = NULL;
        t = PyLong_FromLong(type);
        if (t == NULL) goto fail;
        r = PyLong_FromUnsignedLong(request_id);
        if (r == NULL) goto fail;
        b = PyBytes_FromStringAndSize((const char *)payload, size);
        if (b == NULL) goto fail;
        f = ((PyTypeObject *)cls)->tp_alloc((PyTypeObject *)cls, 3);
        if (f == NULL) goto fail;
        PyTuple_SET_ITEM(f, 0, t);
        PyTuple_SET_ITEM(f, 1, r);
        PyTuple_SET_ITEM(f, 2, b);
        if (PyObject_GC_IsTracked(f)) PyObject_GC_UnTrack(f);
        return f;
    fail:
        Py_XDECREF(t); Py_XDECREF(r); Py_XDECREF(b);
        return NULL;
    }
    """
    const char *px_kernel
    void px_select(int allow_avx512)
    uint32_t px_checksum(const void *p, size_t n) nogil
    uint32_t px_load32(const unsigned char *p) nogil
    void px_store32(unsigned char *p, uint32_t v) nogil
    long long px_int_in_range(object o, long long high)
    object px_frame(object cls, long type, uint32_t request_id,
                    const unsigned char *payload, Py_ssize_t size)

cdef extern from "Python.h":
    # Returns -1 with an exception set; callers clear it and take a slow path.
    int _try_buffer "PyObject_GetBuffer"(object obj, Py_buffer *view, int flags)
    void _incref "Py_INCREF"(PyObject *obj)
    void _decref "Py_DECREF"(PyObject *obj)

cdef enum:
    HEADER = 12
    TRAILER = 4
    OVERHEAD = 16
    C_MIN_TYPE = 1
    C_MAX_TYPE = 18
    C_HARD_MAX = 1 << 24
    HEADER_WORD = 0x50580100  # "PX", version 1; the type byte masked out
    NOGIL_BYTES = 1 << 16  # work on this many bytes runs without the GIL
    KEEP_BUFFER = 1 << 16  # a FrameDecoder frees a larger idle buffer
    BLOCK_BYTES = 1024  # encode: frames copied before they are hashed

cdef object _Frame = Frame
cdef object _WireError = WireError

if (MIN_TYPE, MAX_TYPE, HARD_MAX_PAYLOAD, MAGIC) != (
    C_MIN_TYPE, C_MAX_TYPE, C_HARD_MAX, b"PX"
):
    raise ImportError("plexichat.wire._speedups is out of date with wire._types")
if not issubclass(Frame, tuple) or Frame.__dictoffset__ != 0:
    raise ImportError("px_frame needs Frame to be a tuple subclass without __dict__")


def _use_kernel(avx512=True):
    """Pick the XXH3 long-input kernel (best the CPU has); return its name."""
    px_select(1 if avx512 else 0)
    return px_kernel.decode()


_use_kernel()


# -- shared helpers -------------------------------------------------------------


cdef Py_ssize_t _check_limit(object max_payload) except -1:
    max_payload = PyNumber_Index(max_payload)
    if not 0 <= max_payload <= C_HARD_MAX:
        raise ValueError(f"max_payload must be within 0..{HARD_MAX_PAYLOAD}")
    return max_payload


cdef int _input_buffer(object data, Py_buffer *view) except -1:
    """Flat read view of a decoder input (errors as ``memoryview(data).cast``)."""
    if _try_buffer(data, view, PyBUF_SIMPLE) == 0:
        return 0
    PyErr_Clear()
    PyObject_GetBuffer(memoryview(data).cast("B"), view, PyBUF_SIMPLE)
    return 0


cdef int _raise_header(const unsigned char *h, Py_ssize_t max_payload,
                       long long offset) except -1:
    """Raise the reference's error for the invalid header at *h*."""
    cdef uint32_t length
    if h[0] != 0x50 or h[1] != 0x58:
        magic = PyBytes_FromStringAndSize(<const char *>h, 2)
        raise _WireError("bad-magic", offset, f"expected {MAGIC!r}, got {magic!r}")
    if h[2] != 1:
        raise _WireError("bad-version", offset, f"version {h[2]}")
    if h[3] < C_MIN_TYPE or h[3] > C_MAX_TYPE:
        raise _WireError("unknown-type", offset, f"type {h[3]}")
    length = px_load32(h + 8)
    raise _WireError("oversized", offset, f"{length} > {max_payload} bytes")


cdef inline bint _header_ok(const unsigned char *h, Py_ssize_t max_payload) noexcept:
    return ((px_load32(h) & 0xFFFFFF00u) == <uint32_t>HEADER_WORD
            and C_MIN_TYPE <= h[3] <= C_MAX_TYPE
            and px_load32(h + 8) <= <uint64_t>max_payload)


cdef int _frame_at(const unsigned char *p, Py_ssize_t size, long long offset,
                   list frames) except -1:
    """Check the trailer of the whole frame at *p* and append it to *frames*."""
    cdef Py_ssize_t body = size - TRAILER
    cdef uint32_t expected = px_load32(p + body)
    if px_checksum(p, <size_t>body) != expected:
        raise _WireError("bad-checksum", offset, f"expected {expected:#010x}")
    frames.append(px_frame(_Frame, p[3], px_load32(p + 4), p + HEADER, body - HEADER))
    return 0


cdef Py_ssize_t _split(const unsigned char *p, Py_ssize_t n, Py_ssize_t max_payload,
                       long long base, list frames) except -1:
    """Decode whole frames from ``p[:n]`` into *frames*; return bytes consumed."""
    cdef Py_ssize_t pos = 0
    cdef Py_ssize_t size
    while n - pos >= HEADER:
        if not _header_ok(p + pos, max_payload):
            _raise_header(p + pos, max_payload, base + pos)
        size = OVERHEAD + <Py_ssize_t>px_load32(p + pos + 8)
        if n - pos < size:
            break
        _frame_at(p + pos, size, base + pos, frames)
        pos += size
    return pos


# -- encoding -------------------------------------------------------------------


cdef struct Entry:
    # One validated frame.  Its payload stays alive (and unresizable) through
    # a strong reference to an exact bytes object or through a held buffer.
    const unsigned char *data
    Py_ssize_t size
    PyObject *owner  # the exact bytes payload (a strong reference), or NULL
    Py_buffer *view  # else: a held buffer of the payload (malloc'd)
    uint32_t request_id
    unsigned char type


cdef inline void _release(Entry *entry) noexcept:
    if entry.owner != NULL:
        _decref(entry.owner)
    else:
        PyBuffer_Release(entry.view)
        free(entry.view)


cdef inline int _check_fields(object frame_type, object request_id, Py_ssize_t size,
                       Entry *entry) except -1:
    """The reference's ``_check_encode``: validate, store type and request id."""
    cdef long long value
    if not PyLong_CheckExact(frame_type):
        frame_type = PyNumber_Index(frame_type)
    if not PyLong_CheckExact(request_id):
        request_id = PyNumber_Index(request_id)
    value = px_int_in_range(frame_type, C_MAX_TYPE)
    if value < C_MIN_TYPE:
        raise ValueError(f"frame type {frame_type} outside {MIN_TYPE}..{MAX_TYPE}")
    entry.type = <unsigned char>value
    value = px_int_in_range(request_id, 0xFFFFFFFF)
    if value < 0:
        raise ValueError(f"request id {request_id} does not fit in 32 bits")
    entry.request_id = <uint32_t>value
    if size > C_HARD_MAX:
        raise ValueError(f"payload of {size} bytes exceeds {HARD_MAX_PAYLOAD}")
    return 0


cdef inline int _check_frame(object frame_type, object request_id, object payload,
                      Entry *entry) except -1:
    """Validate one frame into *entry*, which then owns its payload."""
    cdef Py_buffer *view
    if PyBytes_CheckExact(payload):
        _check_fields(frame_type, request_id, PyBytes_GET_SIZE(payload), entry)
        entry.data = <const unsigned char *>PyBytes_AS_STRING(payload)
        entry.size = PyBytes_GET_SIZE(payload)
        entry.owner = <PyObject *>payload
        _incref(entry.owner)
        return 0
    # Any other bytes-like object, flattened as the reference's _flat() does.
    view = <Py_buffer *>malloc(sizeof(Py_buffer))
    if view == NULL:
        raise MemoryError()
    try:
        if _try_buffer(payload, view, PyBUF_SIMPLE) != 0:
            PyErr_Clear()
            flat = memoryview(payload)
            flat = flat.cast("B") if flat.c_contiguous else flat.tobytes()
            PyObject_GetBuffer(flat, view, PyBUF_SIMPLE)
    except BaseException:
        free(view)
        raise
    try:
        _check_fields(frame_type, request_id, view.len, entry)
    except BaseException:
        PyBuffer_Release(view)
        free(view)
        raise
    entry.data = <const unsigned char *>view.buf
    entry.size = view.len
    entry.owner = NULL
    entry.view = view
    return 0


cdef inline void _write_header(unsigned char *d, const Entry *e) noexcept nogil:
    px_store32(d, <uint32_t>HEADER_WORD | e.type)
    px_store32(d + 4, e.request_id)
    px_store32(d + 8, <uint32_t>e.size)


cdef void _write_frames(unsigned char *d, const Entry *entries,
                        Py_ssize_t count) noexcept nogil:
    """Encode *entries* at *d*, about BLOCK_BYTES at a time.

    Each block is copied first and hashed after: small frames hashed right
    after their copy were measured a third slower (loads waiting on the
    copy's stores), and a block this small is still in L1 cache.
    """
    cdef Py_ssize_t first = 0
    cdef Py_ssize_t last
    cdef Py_ssize_t i
    cdef Py_ssize_t size
    cdef Py_ssize_t block
    cdef unsigned char *start
    while first < count:
        start = d
        block = 0
        last = first
        while last < count and block < BLOCK_BYTES:
            _write_header(d, &entries[last])
            memcpy(d + HEADER, entries[last].data, <size_t>entries[last].size)
            d += OVERHEAD + entries[last].size
            block += OVERHEAD + entries[last].size
            last += 1
        d = start
        for i in range(first, last):
            size = HEADER + entries[i].size
            px_store32(d + size, px_checksum(d, <size_t>size))
            d += size + TRAILER
        first = last


def encode_frame(type, request_id, payload):
    """Encode one frame."""
    cdef Entry entry
    _check_frame(type, request_id, payload, &entry)
    try:
        out = PyBytes_FromStringAndSize(NULL, OVERHEAD + entry.size)
        _write_frames(<unsigned char *>PyBytes_AS_STRING(out), &entry, 1)
    finally:
        _release(&entry)
    return out


cdef Py_ssize_t _append_frames(object out, const Entry *entries, Py_ssize_t count,
                               Py_ssize_t total) except -1:
    """Grow *out* by *total* bytes once and encode *entries* into the new tail."""
    cdef Py_ssize_t start = PyByteArray_GET_SIZE(out)
    cdef unsigned char *d
    cdef Py_buffer pin
    if count == 0:
        return 0
    PyByteArray_Resize(out, start + total)
    d = <unsigned char *>PyByteArray_AS_STRING(out) + start
    if total < NOGIL_BYTES:
        _write_frames(d, entries, count)
        return total
    # Pin *out* so that no other thread can resize it while the GIL is released
    # (the entries keep every payload alive and unresizable).
    PyObject_GetBuffer(out, &pin, PyBUF_SIMPLE)
    with nogil:
        _write_frames(d, entries, count)
    PyBuffer_Release(&pin)
    return total


def encode_frames(frames, out):
    """Append the encoding of every ``(type, request_id, payload)`` to *out*.

    Returns the number of bytes appended.  The batch is validated first and
    *out* is resized once; on a bad frame the frames before it are appended
    (as the reference does) and the error is raised.
    """
    cdef Entry *entries
    cdef Entry *grown
    cdef Py_ssize_t count = 0
    cdef Py_ssize_t capacity = 16
    cdef Py_ssize_t total = 0
    cdef Py_ssize_t i
    if not isinstance(out, bytearray):
        raise TypeError(f"out must be a bytearray, not {out.__class__.__name__}")
    if type(frames) is list or type(frames) is tuple:
        capacity = len(frames)
        if capacity == 0:
            return 0
    entries = <Entry *>malloc(<size_t>capacity * sizeof(Entry))
    if entries == NULL:
        raise MemoryError()
    try:
        try:
            for item in frames:
                if count == capacity:
                    grown = <Entry *>realloc(
                        entries, <size_t>(2 * capacity) * sizeof(Entry)
                    )
                    if grown == NULL:
                        raise MemoryError()
                    entries = grown
                    capacity *= 2
                frame_type, request_id, payload = item
                _check_frame(frame_type, request_id, payload, &entries[count])
                total += OVERHEAD + entries[count].size
                count += 1
        except BaseException:
            _append_frames(out, entries, count, total)
            raise
        return _append_frames(out, entries, count, total)
    finally:
        for i in range(count):
            _release(&entries[i])
        free(entries)


def checksum(data):
    """Low 32 bits of XXH3-64 (seed 0) of *data*."""
    cdef Py_buffer view
    cdef uint32_t value
    if isinstance(data, str):
        raise TypeError("Strings must be encoded before hashing")
    PyObject_GetBuffer(data, &view, PyBUF_SIMPLE)
    if view.len < NOGIL_BYTES:
        value = px_checksum(view.buf, <size_t>view.len)
    else:
        with nogil:
            value = px_checksum(view.buf, <size_t>view.len)
    PyBuffer_Release(&view)
    return value


# -- decoding -------------------------------------------------------------------


def decode_frames(data, max_payload=MAX_PAYLOAD):
    """Decode a buffer that holds whole frames only."""
    cdef Py_ssize_t limit = _check_limit(max_payload)
    cdef Py_buffer view
    cdef Py_ssize_t used
    cdef list frames = []
    _input_buffer(data, &view)
    try:
        used = _split(<const unsigned char *>view.buf, view.len, limit, 0, frames)
        if used != view.len:
            raise _WireError(
                "truncated", used, f"{view.len - used} bytes after last frame"
            )
    finally:
        PyBuffer_Release(&view)
    return frames


cdef class FrameDecoder:
    """Stream reassembly: feed bytes as they arrive, get whole frames back.

    Whole frames are decoded in place from the fed buffer; only the partial
    frame at its end (never more than one frame) is copied and kept, so each
    fed byte is copied at most once.
    """

    cdef readonly Py_ssize_t max_payload
    cdef unsigned char *_buf
    cdef Py_ssize_t _len
    cdef Py_ssize_t _cap
    cdef long long _consumed
    cdef object _error
    cdef bint _busy

    def __cinit__(self):
        self._buf = NULL
        self._len = 0
        self._cap = 0
        self._consumed = 0
        self._error = None
        self._busy = False

    def __init__(self, max_payload=MAX_PAYLOAD):
        self.max_payload = _check_limit(max_payload)

    def __dealloc__(self):
        free(self._buf)

    @property
    def pending(self):
        """Bytes received that do not yet form a whole frame."""
        return self._len

    @property
    def consumed(self):
        """Bytes of the stream decoded into frames so far."""
        return self._consumed

    cdef int _keep(self, const unsigned char *p, Py_ssize_t n) except -1:
        """Append ``p[:n]`` to the partial-frame buffer."""
        cdef Py_ssize_t need = self._len + n
        cdef Py_ssize_t cap
        cdef unsigned char *grown
        if need > self._cap:
            cap = max(need, 2 * self._cap, 256)
            grown = <unsigned char *>realloc(self._buf, <size_t>cap)
            if grown == NULL:
                raise MemoryError()
            self._buf = grown
            self._cap = cap
        memcpy(self._buf + self._len, p, <size_t>n)
        self._len = need
        return 0

    cdef void _drop(self) noexcept:
        """Forget the buffered partial frame (it was decoded)."""
        self._len = 0
        if self._cap > KEEP_BUFFER:
            free(self._buf)
            self._buf = NULL
            self._cap = 0

    cdef Py_ssize_t _complete(self, const unsigned char *p, Py_ssize_t n,
                              list frames) except -1:
        """Finish the buffered partial frame from ``p[:n]``; return bytes taken."""
        cdef Py_ssize_t taken = 0
        cdef Py_ssize_t take
        cdef Py_ssize_t size
        if self._len < HEADER:
            taken = min(HEADER - self._len, n)
            self._keep(p, taken)
            if self._len < HEADER:
                return taken
        if not _header_ok(self._buf, self.max_payload):
            _raise_header(self._buf, self.max_payload, self._consumed)
        size = OVERHEAD + <Py_ssize_t>px_load32(self._buf + 8)
        take = min(size - self._len, n - taken)
        self._keep(p + taken, take)
        taken += take
        if self._len == size:
            _frame_at(self._buf, size, self._consumed, frames)
            self._consumed += size
            self._drop()
        return taken

    def feed(self, data):
        """Add *data*; return every frame it completes (possibly none)."""
        cdef Py_buffer view
        cdef const unsigned char *p
        cdef Py_ssize_t n
        cdef Py_ssize_t pos = 0
        cdef Py_ssize_t used
        cdef Py_ssize_t start_pending = self._len
        cdef long long start_consumed = self._consumed
        cdef list frames = []
        if self._error is not None:
            raise self._error
        if self._busy:
            raise RuntimeError("FrameDecoder.feed re-entered")
        if _try_buffer(data, &view, PyBUF_SIMPLE) != 0:
            PyErr_Clear()
            scratch = bytearray()
            scratch += data  # raises exactly what the reference's += raises
            PyObject_GetBuffer(scratch, &view, PyBUF_SIMPLE)
        self._busy = True
        p = <const unsigned char *>view.buf
        n = view.len
        try:
            if self._len:
                pos = self._complete(p, n, frames)
            if self._len == 0:
                used = _split(
                    p + pos, n - pos, self.max_payload, self._consumed, frames
                )
                self._consumed += used
                pos += used
                self._keep(p + pos, n - pos)
        except _WireError as exc:
            # Poisoned, in the reference's state: nothing of this feed consumed.
            self._error = exc
            self._consumed = start_consumed
            self._len = start_pending + n
            free(self._buf)
            self._buf = NULL
            self._cap = 0
            raise
        finally:
            self._busy = False
            PyBuffer_Release(&view)
        return frames

    def close(self):
        """End of stream: raise ``truncated`` if a partial frame is pending."""
        if self._error is not None:
            raise self._error
        if self._len:
            self._error = _WireError(
                "truncated", self._consumed, f"{self._len} bytes pending"
            )
            raise self._error
