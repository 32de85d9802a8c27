# Cython declarations for slots.py (pure-Python mode): the same source, compiled with these types
# by scripts/build_compiled.py. Attributes are public (Python -- fastproxy.affinity, tests -- reads
# and writes them as in the pure form). Keep in step with the .py: an attribute added there must be
# declared here, or the compiled form raises AttributeError. PodSlots and Level have no cpdef method
# (a vtable pointer in each of 50k objects; the level operations are functions); its fields are ordered objects, then 4-byte ints, so that the
# struct has no padding: 80 bytes with the cyclic GC's header (96 in the pure form).
cimport cython

cdef class RevisionSlots
cdef class Level

@cython.final
cdef class PodSlots:
    cdef public PodSlots next
    cdef public PodSlots prev
    cdef public object record
    cdef public RevisionSlots revision
    cdef public int concurrency
    cdef public int index
    cdef public int inflight
    cdef public bint routable

@cython.final
cdef class Level:
    cdef public PodSlots first
    cdef public PodSlots last

@cython.locals(last=PodSlots)
cpdef _push(Level level, PodSlots pod)
@cython.locals(prev=PodSlots, after=PodSlots)
cpdef _unlink(Level level, PodSlots pod)

@cython.final
cdef class PodIndex:
    cdef public Py_ssize_t _filled
    cdef public Py_ssize_t _live
    cdef public Py_ssize_t _mask
    cdef public list _slots

@cython.final
cdef class UnreadRecords:
    cdef public list chunks
    cdef public str name
    cdef public object table

@cython.final
cdef class RevisionSlots:
    cdef public dict affine
    cdef public dict affine_of
    cdef public Py_ssize_t affine_queued
    cdef public Py_ssize_t capacity
    cdef public Py_ssize_t inflight_total
    cdef public list levels
    cdef public list member_list
    cdef public str name
    cdef public object pending
    cdef public Py_ssize_t queued
    cdef public Py_ssize_t queued_bytes
    cdef public object ring
    cdef public object waiters
    cpdef bint hand_over(self, PodSlots pod)
    cpdef bint hand_over_affine(self, PodSlots pod)

@cython.locals(revision=RevisionSlots, levels=list, inflight=int)
cpdef take(PodSlots pod)
@cython.locals(levels=list, level=Level, pod=PodSlots, after=PodSlots, inflight=int)
cpdef object least_inflight(RevisionSlots revision)

cdef class SlotTable:
    cdef public dict _excluded
    cdef public object _random
    cdef public Py_ssize_t max_queue_bytes
    cdef public Py_ssize_t max_queued
    cdef public PodIndex pods
    cdef public object policy
    cdef public dict revisions
