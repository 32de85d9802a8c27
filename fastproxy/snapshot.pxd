# Cython declarations for snapshot.py (pure-Python mode): the same source, compiled with these
# types by scripts/build_compiled.py. Attributes are public (Python reads them as in the pure form).
# Keep in step with the .py: an attribute added there must be declared here, or the compiled form
# raises AttributeError. The request path's part is RouteTable.match / _first_prefix /
# ServiceRoute.choose_revision: C calls from the compiled Exchange, with typed locals.
cimport cython

cdef class ReadChunk(list):
    cdef public Py_hash_t digest

cdef class ServiceRoute:
    cdef public tuple cumulative
    cdef public object llm
    cdef public str prefix
    cdef public tuple revisions
    cdef public object route
    cdef public str service
    cdef public object total
    cpdef str choose_revision(self, double draw)
    cpdef str pick_revision(self)

cdef class RouteTable:
    cdef public tuple any_host
    cdef public dict by_service
    cdef public dict exact
    cdef public dict wildcard
    @cython.locals(candidates=tuple, dot=Py_ssize_t, found=ServiceRoute)
    cpdef ServiceRoute match(self, str host, str path)

@cython.locals(candidate=ServiceRoute, prefix=str, length=Py_ssize_t)
cpdef ServiceRoute _first_prefix(tuple candidates, str path)

cdef class PodTable:
    cdef public Py_ssize_t _count
    cdef public list _outer

cdef class SnapshotBuilder:
    cdef public Py_ssize_t _count
    cdef public bint _group
    cdef public list _outer
    cdef public object by_revision

cdef class RoutingSnapshot:
    cdef public object _revisions
    cdef public object epoch
    cdef public PodTable pods
    cdef public RouteTable route_table
    cdef public object routes
    cdef public object version
