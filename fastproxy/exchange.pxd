# Cython declarations for exchange.py (pure-Python mode): the same source, compiled with these
# types by scripts/build_compiled.py. Every attribute stays public (readable and writable from
# Python) so the compiled and the pure form behave alike. Keep in step with the .py: an attribute
# added there must be declared here, or the compiled form raises AttributeError.
cimport cython

cpdef object find_header(list headers, bytes name)
cpdef list _split_tokens(bytes value)
cpdef bytes _strip_port(bytes host)

cdef class RequestHead:
    cdef public bytes method
    cdef public bytes target
    cdef public str path
    cdef public str host
    cdef public bytes authority
    cdef public bytes version
    cdef public list headers
    cdef public object content_length
    cdef public bint chunked
    cdef public bint keep_alive
    cdef public bint expect_continue
    cdef public list forwarded
    cdef public object request_id
    cdef public bint upgrade
    cpdef object header(self, bytes name)

cdef class RequestParser:
    cdef public object state
    cdef object _parser
    cdef list _events
    cdef object _limits
    cdef Py_ssize_t _max_url_bytes
    cdef Py_ssize_t _max_header_bytes
    cdef Py_ssize_t _max_headers
    cdef Py_ssize_t _max_body_bytes
    cdef Py_ssize_t _max_chunk_overhead_bytes
    cdef RequestHead _head
    cdef bytes _url
    cdef list _raw_headers
    cdef Py_ssize_t _head_bytes
    cdef Py_ssize_t _head_raw
    cdef list _hosts
    cdef list _te
    cdef list _connection_tokens
    cdef Py_ssize_t _body_bytes
    cdef Py_ssize_t _framing_budget
    cdef Py_ssize_t _feed_consumed
    cdef Py_ssize_t _feed_body
    cdef bint _feed_chunked
    cdef Py_ssize_t _feed_messages
    cdef Py_ssize_t _begin_offset
    cdef object _whole_feed
    cdef bytes _host_raw
    cdef bytes _host_authority
    cdef str _host_name
    cdef list _url_pieces
    cdef object _version_hint
    cdef public object _upgrade
    cpdef _reset(self)
    cpdef _move(self, object event)
    cpdef feed(self, bytes data)
    cpdef _analyse_headers(self, RequestHead head)
    cpdef _analyse_target(self, RequestHead head, bytes target)

cdef class ResponseHead:
    cdef public int status
    cdef public bytes reason
    cdef public bytes version
    cdef public list headers
    cdef public object content_length
    cdef public bint chunked
    cdef public bint keep_alive
    cdef public bytes upgrade
    cpdef object header(self, bytes name)

cdef class _Upgraded:
    cdef public list _events

cdef class ResponseParser:
    cdef public bint upgraded
    cdef public bytes upgraded_tail
    cdef public object state
    cdef object _parser
    cdef list _events
    cdef object _limits
    cdef Py_ssize_t _max_header_bytes
    cdef Py_ssize_t _max_headers
    cdef ResponseHead _head
    cdef list _raw_headers
    cdef list _te
    cdef list _connection_tokens
    cdef Py_ssize_t _head_bytes
    cdef bint _no_body
    cdef object _whole_feed
    cdef object _version_hint
    cpdef _reset(self)
    cpdef expect_no_body(self)
    cpdef feed(self, bytes data)
    cpdef bint feed_eof(self)

cpdef bytes _status_line(object status, bytes reason)
cpdef _append_fields(list parts, list fields)
cpdef list chunk(bytes data)
