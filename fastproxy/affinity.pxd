# Cython declarations for affinity.py (pure-Python mode): the same source, compiled with these types
# by scripts/build_compiled.py. Attributes are public (Python reads and writes them as in the pure
# form). Keep in step with the .py: an attribute added there must be declared here.
cimport cython
from fastproxy.slots cimport Level, PodSlots, RevisionSlots, SlotTable, least_inflight, take

@cython.locals(count=Py_ssize_t, i=Py_ssize_t, at=Py_ssize_t, skip=Py_ssize_t, filled=Py_ssize_t,
               entries=list)
cpdef list fill(list pods, list offsets, list skips, Py_ssize_t size)

cdef class Maglev:
    cdef public Py_ssize_t adapter_pods
    cdef public dict adapters
    cdef public bint built
    cdef public Py_ssize_t changes
    cdef public bint due
    cdef public list entries
    cdef public Py_ssize_t pods
    cdef public Py_ssize_t size
    cdef public bint stale
    cpdef add(self, object pod)
    cpdef remove(self, object pod)
    cpdef change(self, object pod, object record)
    @cython.locals(changes=Py_ssize_t)
    cpdef _changed(self)

cpdef Maglev maglev_of(object revision)

@cython.locals(done=Py_ssize_t, table=Maglev, fresh=Maglev)
cpdef Py_ssize_t rebuild_due(object slots, Py_ssize_t budget=*)

@cython.locals(size=Py_ssize_t, entries=list, at=Py_ssize_t, end=Py_ssize_t, inflight=Py_ssize_t,
               concurrency=Py_ssize_t, pod=PodSlots)
cpdef object _walk(Maglev table, unsigned long long key, double bound)

@cython.locals(capacity=Py_ssize_t, table=Maglev, bound=double, sub=Maglev)
cpdef object prefix_affinity(RevisionSlots revision, object key, object adapter=*, double epsilon=*)

@cython.locals(slots=RevisionSlots, maglev=Maglev, index=Maglev, sub=Maglev, capacity=Py_ssize_t, bound=double)
cpdef object pick(SlotTable table, str revision, object key, object adapter, double epsilon)

@cython.locals(level=Level)
cpdef bint _any_free(RevisionSlots revision)

@cython.locals(slots=RevisionSlots, maglev=Maglev, candidates=Maglev, sub=Maglev, capacity=Py_ssize_t,
               bound=double, size=Py_ssize_t, entries=list, at=Py_ssize_t, i=Py_ssize_t, pod=PodSlots,
               inflight=Py_ssize_t, concurrency=Py_ssize_t, full=list)
cpdef object pick_or_wait(SlotTable table, str revision, object key, object adapter, double epsilon)
