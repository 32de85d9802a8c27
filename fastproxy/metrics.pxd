# Cython declarations for metrics.py (pure-Python mode): the same source, compiled with these
# types by scripts/build_compiled.py. Attributes are public (the collector, the admin API and the
# tests read them as in the pure form). Keep in step with the .py: an attribute added there must
# be declared here, or the compiled form raises AttributeError.
cimport cython

cdef class Histogram:
    cdef public tuple bounds
    cdef public list buckets
    cdef public Py_ssize_t count
    cdef public double sum
    cpdef observe(self, double value)

cdef class LatencyHistogram:
    cdef public Py_ssize_t _last
    cdef public tuple bounds
    cdef public list buckets
    cdef public Py_ssize_t count
    cdef public double sum
    @cython.locals(index=Py_ssize_t)
    cpdef observe(self, double value)

cdef class RouterStats:
    cdef public LatencyHistogram added_latency
    cdef public Histogram affinity_wait_abandoned
    cdef public Histogram affinity_wait_affine
    cdef public Histogram affinity_wait_other_pod
    cdef public Histogram affinity_wait_queue
    cdef public Py_ssize_t busy_refusals
    cdef public Py_ssize_t client_aborts
    cdef public dict errors
    cdef public Py_ssize_t local_exclusions
    cdef public Py_ssize_t queue_rejections
    cdef public Histogram queue_wait
    cdef public dict rechecks
    cdef public Py_ssize_t requests
    cdef public dict responses
    cdef public dict retries
    cdef public double started
    cpdef count_error(self, str kind)
    cpdef list affinity_waits(self)
