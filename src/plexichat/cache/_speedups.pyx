# cython: language_level=3
"""Compiled LRU cache (same behaviour as plexichat.cache._reference).

Layout: a dict maps each key to its slot number; per slot, Python lists hold
the key and value and C ``int32`` arrays hold the links of the recency list
(``_head`` = least recent, ``_tail`` = most recent).  Slots freed by ``pop``
or ``clear`` are chained through ``_next`` and reused first; the per-slot
lists never shrink, so every slot number in ``_index`` stays a valid index.  A full cache reuses the
evicted slot, so a warm cache allocates nothing but the dict entry.
"""

cimport cython
from cpython.dict cimport PyDict_DelItem, PyDict_GetItemWithError, PyDict_SetItem
from cpython.list cimport PyList_GET_ITEM, PyList_SET_ITEM
from cpython.long cimport PyLong_AsSsize_t
from cpython.mem cimport PyMem_Free, PyMem_Realloc
from cpython.object cimport PyObject
from cpython.ref cimport Py_DECREF, Py_INCREF
from libc.stdint cimport int32_t, int64_t

from types import GenericAlias

from plexichat.cache._reference import check_capacity

cdef enum:
    _MIN_ALLOC = 16


@cython.final
cdef class LRUCache:
    """Least-recently-used cache of at most ``capacity`` entries."""

    cdef dict _index          # key -> slot (a Python int from _slot_ids)
    cdef list _keys           # slot -> key (None when free)
    cdef list _values         # slot -> value (None when free)
    cdef list _slot_ids       # slot -> the int object stored in _index
    cdef int32_t* _prev
    cdef int32_t* _next
    cdef Py_ssize_t _capacity
    cdef Py_ssize_t _alloc    # length of _prev/_next
    cdef Py_ssize_t _used     # slots ever handed out (== len(_keys))
    cdef int32_t _head
    cdef int32_t _tail
    cdef int32_t _free
    cdef int64_t _hits
    cdef int64_t _misses
    cdef int64_t _evictions

    __class_getitem__ = classmethod(GenericAlias)

    def __cinit__(self, capacity):
        # Everything happens here (no __init__), so no instance can exist in
        # a half-built state, not even one made with LRUCache.__new__.
        self._prev = NULL
        self._next = NULL
        self._capacity = check_capacity(capacity)
        self._index = {}
        self._keys = []
        self._values = []
        self._slot_ids = []
        self._used = 0
        self._head = -1
        self._tail = -1
        self._free = -1
        self._hits = 0
        self._misses = 0
        self._evictions = 0
        self._grow(min(self._capacity, _MIN_ALLOC))

    def __dealloc__(self):
        PyMem_Free(self._prev)
        PyMem_Free(self._next)

    cdef int _grow(self, Py_ssize_t size) except -1:
        cdef int32_t* prev
        cdef int32_t* nxt
        if size <= self._alloc:
            return 0
        prev = <int32_t*>PyMem_Realloc(self._prev, size * sizeof(int32_t))
        if prev == NULL:
            raise MemoryError()
        self._prev = prev
        nxt = <int32_t*>PyMem_Realloc(self._next, size * sizeof(int32_t))
        if nxt == NULL:
            raise MemoryError()
        self._next = nxt
        self._alloc = size
        return 0

    # -- recency list -------------------------------------------------------

    cdef inline void _unlink(self, int32_t slot) noexcept:
        cdef int32_t p = self._prev[slot]
        cdef int32_t n = self._next[slot]
        if p >= 0:
            self._next[p] = n
        else:
            self._head = n
        if n >= 0:
            self._prev[n] = p
        else:
            self._tail = p

    cdef inline void _append(self, int32_t slot) noexcept:
        self._prev[slot] = self._tail
        self._next[slot] = -1
        if self._tail >= 0:
            self._next[self._tail] = slot
        else:
            self._head = slot
        self._tail = slot

    cdef inline void _touch(self, int32_t slot) noexcept:
        if slot != self._tail:
            self._unlink(slot)
            self._append(slot)

    cdef inline void _set(self, list items, int32_t slot, object value):
        cdef PyObject* old = <PyObject*>PyList_GET_ITEM(items, slot)
        Py_INCREF(value)
        PyList_SET_ITEM(items, slot, value)
        Py_DECREF(<object>old)

    # -- API ----------------------------------------------------------------

    @property
    def capacity(self):
        """Maximum number of entries."""
        return self._capacity

    @property
    def hits(self):
        """Number of ``get`` calls that found their key."""
        return self._hits

    @property
    def misses(self):
        """Number of ``get`` calls that did not find their key."""
        return self._misses

    @property
    def evictions(self):
        """Number of keys evicted to make room."""
        return self._evictions

    def get(self, key, default=None):
        """Value of *key* (a hit, now most recent) or *default* (a miss)."""
        cdef PyObject* found = PyDict_GetItemWithError(self._index, key)
        cdef int32_t slot
        if found == NULL:
            self._misses += 1
            return default
        slot = <int32_t>PyLong_AsSsize_t(<object>found)
        self._hits += 1
        self._touch(slot)
        return <object>PyList_GET_ITEM(self._values, slot)

    def put(self, key, value):
        """Insert or update *key*; evict the least recent key when full."""
        cdef PyObject* found = PyDict_GetItemWithError(self._index, key)
        cdef int32_t slot
        if found != NULL:
            slot = <int32_t>PyLong_AsSsize_t(<object>found)
            self._set(self._values, slot, value)
            self._touch(slot)
            return
        if self._free >= 0:
            slot = self._free
            self._free = self._next[slot]
        elif self._used < self._capacity:
            slot = <int32_t>self._used
            if slot >= self._alloc:
                self._grow(min(self._capacity, 2 * self._alloc))
            self._keys.append(None)
            self._values.append(None)
            self._slot_ids.append(slot)
            self._used += 1
        else:
            slot = self._head
            self._unlink(slot)
            self._evictions += 1
            PyDict_DelItem(self._index, <object>PyList_GET_ITEM(self._keys, slot))
        self._set(self._keys, slot, key)
        self._set(self._values, slot, value)
        PyDict_SetItem(self._index, key, <object>PyList_GET_ITEM(self._slot_ids, slot))
        self._append(slot)

    def pop(self, key, default=None):
        """Remove *key* and return its value, or *default* when absent."""
        cdef PyObject* found = PyDict_GetItemWithError(self._index, key)
        cdef int32_t slot
        if found == NULL:
            return default
        slot = <int32_t>PyLong_AsSsize_t(<object>found)
        value = <object>PyList_GET_ITEM(self._values, slot)
        PyDict_DelItem(self._index, key)
        self._unlink(slot)
        self._set(self._keys, slot, None)
        self._set(self._values, slot, None)
        self._next[slot] = self._free
        self._free = slot
        return value

    def peek(self, key, default=None):
        """Value of *key* or *default*, without counting or reordering."""
        cdef PyObject* found = PyDict_GetItemWithError(self._index, key)
        if found == NULL:
            return default
        return <object>PyList_GET_ITEM(
            self._values, PyLong_AsSsize_t(<object>found)
        )

    def __contains__(self, key):
        return key in self._index

    def __len__(self):
        return len(self._index)

    def clear(self):
        """Drop every entry (the counters are kept)."""
        cdef Py_ssize_t slot
        old = (self._index, self._keys, self._values)
        # Make the state consistent first: releasing the old entries can run
        # arbitrary __del__ code.  Every slot goes back on the free list, and
        # the per-slot lists keep their length (slot numbers stay valid).
        self._index = {}
        self._keys = [None] * self._used
        self._values = [None] * self._used
        self._head = -1
        self._tail = -1
        self._free = -1
        for slot in range(self._used - 1, -1, -1):
            self._next[slot] = self._free
            self._free = <int32_t>slot
        del old

    def keys(self):
        """Keys, least recent first."""
        cdef list out = []
        cdef int32_t slot = self._head
        while slot >= 0:
            out.append(<object>PyList_GET_ITEM(self._keys, slot))
            slot = self._next[slot]
        return out

    def stats(self):
        """Counters and occupancy."""
        return {
            "capacity": self._capacity,
            "size": len(self._index),
            "hits": self._hits,
            "misses": self._misses,
            "evictions": self._evictions,
        }

    def __repr__(self):
        return (
            f"LRUCache(capacity={self._capacity}, size={len(self._index)}, "
            f"hits={self._hits}, misses={self._misses}, "
            f"evictions={self._evictions})"
        )
