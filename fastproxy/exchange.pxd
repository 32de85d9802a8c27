# Cython declarations for exchange.py (pure-Python mode): the same source, compiled with these
# types by scripts/build_compiled.py. Every attribute stays public (readable and writable from
# Python) so the compiled and the pure form behave alike. Keep in step with the .py: an attribute
# added there must be declared here, or the compiled form raises AttributeError.
cimport cython
from libc.stdint cimport uint8_t, uint16_t, uint64_t
from libc.string cimport memcmp, memcpy
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize

# llhttp (fastproxy/vendor/llhttp), called directly by the compiled form (LLParser below): only the
# fields and functions used here are declared; C has the whole struct.
cdef extern from "llhttp.h":
    ctypedef struct llhttp_t:
        void* data
        uint64_t content_length
        uint8_t method
        uint8_t http_major
        uint8_t http_minor
        uint8_t upgrade
        uint16_t flags
        uint16_t status_code
    ctypedef int (*llhttp_data_cb)(llhttp_t*, const char*, size_t) noexcept
    ctypedef int (*llhttp_cb)(llhttp_t*) noexcept
    ctypedef struct llhttp_settings_t:
        llhttp_cb on_message_begin
        llhttp_data_cb on_url
        llhttp_data_cb on_status
        llhttp_data_cb on_header_field
        llhttp_data_cb on_header_value
        llhttp_cb on_header_value_complete
        llhttp_cb on_headers_complete
        llhttp_data_cb on_body
        llhttp_cb on_message_complete
    ctypedef enum llhttp_type_t:
        HTTP_REQUEST
        HTTP_RESPONSE
    ctypedef enum llhttp_errno_t:
        HPE_OK
        HPE_INVALID_METHOD
        HPE_INVALID_URL
        HPE_INVALID_STATUS
        HPE_CB_MESSAGE_BEGIN
        HPE_CB_HEADERS_COMPLETE
        HPE_CB_MESSAGE_COMPLETE
        HPE_CB_CHUNK_HEADER
        HPE_CB_CHUNK_COMPLETE
        HPE_PAUSED
        HPE_PAUSED_UPGRADE
        HPE_USER
    enum:
        F_CONTENT_LENGTH
    void llhttp_settings_init(llhttp_settings_t* settings)
    void llhttp_init(llhttp_t* parser, llhttp_type_t type, const llhttp_settings_t* settings)
    llhttp_errno_t llhttp_execute(llhttp_t* parser, const char* data, size_t length)
    void llhttp_reset(llhttp_t* parser)
    void llhttp_resume_after_upgrade(llhttp_t* parser)
    int llhttp_should_keep_alive(const llhttp_t* parser)
    const char* llhttp_get_error_pos(const llhttp_t* parser)
    const char* llhttp_get_error_reason(const llhttp_t* parser)
    const char* llhttp_method_name(uint8_t method)
    void llhttp_set_error_reason(llhttp_t* parser, const char* reason)
    void llhttp_set_lenient_version(llhttp_t* parser, int enabled)

# Module constants read per message or per field: C globals (invisible to Python, like the
# underscore names they are; the PARSE_* states stay importable).
cdef int _FIELD_HOST, _FIELD_TRANSFER_ENCODING, _FIELD_CONNECTION, _FIELD_CONTENT_LENGTH
cdef int _FIELD_EXPECT, _FIELD_FORWARDING, _FIELD_REQUEST_ID, _FIELD_HOP_BY_HOP, _FIELD_UPGRADE
cdef dict _FIELD_NAMES
cdef Py_ssize_t _FIELD_NAMES_MAX
cdef dict _REQUEST_SPECIAL, _RESPONSE_SPECIAL
cdef bint _COMPILED
cdef list _METHOD_NAMES, _LL_NAMES, _LL_ENTRIES
cdef size_t _LL_NAMES_SIZE, _LL_NAMES_MAX_NAME
cdef object _BEGIN_FROM, _BEGIN_TO, _HEAD_DONE_FROM, _HEAD_DONE_TO, _MESSAGE_DONE_FROM, _MESSAGE_DONE_TO

@cython.locals(name=bytes)
cpdef tuple _field_name(bytes raw_name)
@cython.locals(entry=tuple)
cpdef tuple _field_entry(bytes raw_name)
cpdef object find_header(list headers, bytes name)
cpdef list _split_tokens(bytes value)
cpdef bytes _strip_port(bytes host)

cdef class LLParser:
    cdef llhttp_t _c
    cdef llhttp_settings_t _settings
    # The RequestParser / ResponseParser that holds this one (borrowed); the current field name,
    # while it lies in the read being parsed (_name_at), or as bytes once a read ended inside it.
    cdef void* _owner
    cdef bint _request
    cdef public object _error
    cdef const char* _name_at
    cdef size_t _name_length
    cdef bytes _name
    cdef bytes _value
    @cython.locals(offset=Py_ssize_t)
    cpdef feed_data(self, bytes data)
    @cython.locals(number=int, name=bytes)
    cpdef bytes get_method(self)
    cpdef str get_http_version(self)
    cpdef bint should_keep_alive(self)
    cpdef int get_status_code(self)
    cpdef object content_length(self)
    cpdef set_dangerous_leniencies(self, bint lenient_version=*)

@cython.locals(slot=size_t, name=bytes, entry=tuple)
cdef tuple _ll_field(const char* at, size_t length)
@cython.locals(ll=LLParser)
cdef int _ll_on_message_begin(llhttp_t* c) noexcept
@cython.locals(ll=LLParser)
cdef int _ll_on_url(llhttp_t* c, const char* at, size_t length) noexcept
@cython.locals(ll=LLParser)
cdef int _ll_on_status(llhttp_t* c, const char* at, size_t length) noexcept
@cython.locals(ll=LLParser)
cdef int _ll_on_header_field(llhttp_t* c, const char* at, size_t length) noexcept
@cython.locals(ll=LLParser)
cdef int _ll_on_header_value(llhttp_t* c, const char* at, size_t length) noexcept
@cython.locals(ll=LLParser, entry=tuple, value=bytes, raw_headers=list)
cdef int _ll_on_header_value_complete(llhttp_t* c) noexcept
@cython.locals(ll=LLParser, response=ResponseParser)
cdef int _ll_on_headers_complete(llhttp_t* c) noexcept
@cython.locals(ll=LLParser)
cdef int _ll_on_body(llhttp_t* c, const char* at, size_t length) noexcept
@cython.locals(ll=LLParser, response=ResponseParser)
cdef int _ll_on_message_complete(llhttp_t* c) noexcept

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
    cdef readonly object _parser
    cdef LLParser _ll
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
    @cython.locals(ll=LLParser)
    cpdef feed(self, bytes data)
    # The httptools callbacks: cpdef so that their locals are typed (httptools calls them as Python
    # methods either way).
    cpdef on_message_begin(self)
    cpdef on_url(self, bytes url)
    @cython.locals(raw_headers=list)
    cpdef on_header(self, bytes name, bytes value)
    @cython.locals(head=RequestHead, method=bytes, ll=LLParser, keep_alive=bint)
    cpdef on_headers_complete(self)
    @cython.locals(data=bytes, offset=Py_ssize_t)
    cpdef bint _is_http11(self, bytes method)
    cpdef on_body(self, bytes body)
    cpdef on_message_complete(self)
    @cython.locals(raw_headers=list, count=Py_ssize_t, kept=list, size=Py_ssize_t, ll=LLParser,
                   entry=tuple, name=bytes, kind=int, value=bytes, i=Py_ssize_t)
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
    cdef readonly object _parser
    cdef LLParser _ll
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
    cdef public bint _head_only
    cdef public bint after_head
    cdef Py_ssize_t _feed_events
    cdef object _carry
    cdef object _whole_feed
    cdef bint _http11
    cpdef _reset(self)
    cpdef expect_no_body(self)
    @cython.locals(ll=LLParser)
    cpdef feed(self, bytes data)
    @cython.locals(buffer=bytes, heads=Py_ssize_t, at=Py_ssize_t, n=Py_ssize_t)
    cpdef Py_ssize_t _head_end(self, bytes data) except -1
    cpdef bint feed_eof(self)
    @cython.locals(data=bytes)
    cpdef on_message_begin(self)
    cpdef on_status(self, bytes reason)
    @cython.locals(raw_headers=list)
    cpdef on_header(self, bytes name, bytes value)
    @cython.locals(head=ResponseHead, ll=LLParser, keep_alive=bint, raw_headers=list, count=Py_ssize_t, kept=list,
                   size=Py_ssize_t, entry=tuple, name=bytes, kind=int, value=bytes,
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
@cython.locals(field=tuple, name=bytes, value=bytes, size=Py_ssize_t)
cdef Py_ssize_t _fields_size(list fields) except -1
@cython.locals(size=Py_ssize_t)
cdef inline char* _put(char* at, bytes piece) noexcept
@cython.locals(field=tuple)
cdef char* _put_fields(char* at, list fields) noexcept
@cython.locals(parts=list, headers=list, length=bytes, framing=bytes, expect=bytes, method=bytes,
               target=bytes, authority=bytes, size=Py_ssize_t, fields_size=Py_ssize_t, out=bytes, at="char*")
cpdef bytes build_request_head(RequestHead head, list extra, bint expect_continue=*)
@cython.locals(parts=list, headers=list, length=bytes, framing=bytes, connection=bytes,
               status_line=bytes, size=Py_ssize_t, fields_size=Py_ssize_t, out=bytes, at="char*")
cpdef bytes build_response_head(ResponseHead head, bint chunked, bint close, bint http10_keep_alive=*)
cpdef list chunk(bytes data)
