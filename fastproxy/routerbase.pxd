# Cython declarations for routerbase.py (pure-Python mode): the same source, compiled with these
# types by scripts/build_compiled.py. Attributes are public (Router, its subclasses and the tests
# read and write them as in the pure form). Keep in step with the .py's __slots__.
cimport cython
from fastproxy.exchange cimport RequestHead
from fastproxy.metrics cimport RouterStats
from fastproxy.snapshot cimport RoutingSnapshot

cdef class RouterBase:
    cdef public Py_ssize_t _request_count
    cdef public bytes _request_prefix
    cdef public object config
    cdef public bint draining
    cdef public object loop
    cdef public object outliers
    cdef public object pool
    cdef public bytes service_header
    cdef public object slots
    cdef public RoutingSnapshot snapshot
    cdef public RouterStats stats
    cdef public object write_context
    cdef public object write_flusher
    cdef public list write_queue
    cpdef list forwarding_headers(self, bytes peer_bytes, bint trusted, RequestHead head)
