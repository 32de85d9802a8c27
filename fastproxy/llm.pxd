# Cython declarations for llm.py (pure-Python mode): the same source, compiled with these types by
# scripts/build_compiled.py. Attributes are public (the exchange and tests read and write them as in
# the pure form). Keep in step with the .py: an attribute added there must be declared here.
cimport cython
from fastproxy cimport affinity
from fastproxy.exchange cimport RequestHead

cdef class LLMRequest

cdef unsigned long long _M64, _MUL, _FMIX, _SEED
cdef bint _LITTLE_ENDIAN

cpdef object prompt_of(object peeked)
@cython.locals(p="const unsigned char*", q=cython.p_ulonglong, h=cython.ulonglong, w=cython.ulonglong,
               i=Py_ssize_t, words=Py_ssize_t, end=Py_ssize_t)
cpdef unsigned long long word_hash(bytes data, Py_ssize_t n)
@cython.locals(n=Py_ssize_t)
cpdef object prefix_key(object data, Py_ssize_t prefix_bytes)

cdef class LLMRoute:
    cdef public str adapter_key
    cdef public double affinity_wait
    cdef public object config
    cdef public object decoder
    cdef public double epsilon
    cdef public Py_ssize_t max_body_bytes
    cdef public str model_key
    cdef public dict models
    cdef public bint prefix
    cdef public Py_ssize_t prefix_bytes
    cdef public bint require_model
    cdef public str service
    cdef public object session_header
    cpdef LLMRequest begin(self)
    cpdef read(self, LLMRequest request, object body, bint complete, RequestHead head)

cdef class LLMRequest:
    cdef public object adapter
    cdef public double deadline
    cdef public object key
    cdef public object model
    cdef public bint peeking
    cdef public LLMRoute route
    cdef public object service
    cdef public double wait_began
    cdef public list wait_for
    cdef public bint waited
    @cython.locals(found=object)
    cpdef object pick(self, object table, str revision, bint wait=*)
