# Cython declarations for exchange.py (pure-Python mode): the same source, compiled with these
# types by scripts/build_compiled.py. Every attribute stays public (readable and writable from
# Python) so the compiled and the pure form behave alike. Keep in step with the .py: an attribute
# added there must be declared here, or the compiled form raises AttributeError.
cimport cython

# Module constants read per message or per field: C globals (invisible to Python, like the
# underscore names they are; the PARSE_* states stay importable).
cdef int _FIELD_HOST, _FIELD_TRANSFER_ENCODING, _FIELD_CONNECTION, _FIELD_CONTENT_LENGTH
cdef int _FIELD_EXPECT, _FIELD_FORWARDING, _FIELD_REQUEST_ID, _FIELD_HOP_BY_HOP, _FIELD_UPGRADE
cdef dict _FIELD_NAMES
cdef Py_ssize_t _FIELD_NAMES_MAX
cdef dict _REQUEST_SPECIAL, _RESPONSE_SPECIAL
cdef object _BEGIN_FROM, _BEGIN_TO, _HEAD_DONE_FROM, _HEAD_DONE_TO, _MESSAGE_DONE_FROM, _MESSAGE_DONE_TO

@cython.locals(name=bytes)
cpdef tuple _field_name(bytes raw_name)
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
    cdef public object _upgrade
    cpdef _reset(self)
    cpdef feed(self, bytes data)
    # The httptools callbacks: cpdef so that their locals are typed (httptools calls them as Python
    # methods either way).
    cpdef on_message_begin(self)
    cpdef on_url(self, bytes url)
    @cython.locals(raw_headers=list)
    cpdef on_header(self, bytes name, bytes value)
    @cython.locals(head=RequestHead, method=bytes)
    cpdef on_headers_complete(self)
    @cython.locals(data=bytes, offset=Py_ssize_t)
    cpdef bint _is_http11(self, bytes method)
    cpdef on_body(self, bytes body)
    cpdef on_message_complete(self)
    @cython.locals(raw_headers=list, count=Py_ssize_t, kept=list, names=dict, size=Py_ssize_t,
                   entry=tuple, name=bytes, kind=int, raw_name=bytes, value=bytes, i=Py_ssize_t)
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
    cdef bint _http11
    cpdef _reset(self)
    cpdef expect_no_body(self)
    cpdef feed(self, bytes data)
    cpdef bint feed_eof(self)
    @cython.locals(data=bytes)
    cpdef on_message_begin(self)
    cpdef on_status(self, bytes reason)
    @cython.locals(raw_headers=list)
    cpdef on_header(self, bytes name, bytes value)
    @cython.locals(head=ResponseHead, raw_headers=list, count=Py_ssize_t, kept=list, names=dict,
                   size=Py_ssize_t, entry=tuple, name=bytes, kind=int, raw_name=bytes, value=bytes,
                   i=Py_ssize_t)
    cpdef on_headers_complete(self)
    cpdef on_body(self, bytes body)
    cpdef on_message_complete(self)

@cython.locals(cached=tuple, line=bytes)
cpdef bytes _status_line(int status, bytes reason)
@cython.locals(small=Py_ssize_t)
cpdef bytes _decimal(object number)
@cython.locals(name=bytes, value=bytes)
cpdef _append_fields(list parts, list fields)
@cython.locals(parts=list)
cpdef bytes build_request_head(RequestHead head, list extra, bint expect_continue=*)
@cython.locals(parts=list)
cpdef bytes build_response_head(ResponseHead head, bint chunked, bint close, bint http10_keep_alive=*)
cpdef list chunk(bytes data)
