# Cython declarations for proxy.py (pure-Python mode): the same source, compiled with these types
# by scripts/build_compiled.py. Attributes are public (Python reads and writes them as in the pure
# form). Keep in step with the .py: an attribute added there must be declared here, or the compiled
# form raises AttributeError; a method called from inside the module is cpdef (a C call there).
cimport cython
from fastproxy.exchange cimport (
    RequestHead, RequestParser, ResponseHead, ResponseParser, build_request_head, build_response_head, chunk
)
from fastproxy.llm cimport LLMRequest, LLMRoute
from fastproxy.metrics cimport RouterStats
from fastproxy.routerbase cimport RouterBase
from fastproxy.snapshot cimport RouteTable, RoutingSnapshot, ServiceRoute

from posix.time cimport clock_gettime, timespec, CLOCK_MONOTONIC

cdef extern from "<sys/socket.h>":
    int c_getsockopt "getsockopt" (int fd, int level, int optname, void *optval, unsigned int *optlen)

cdef int _ROUTING, _QUEUED, _CONNECTING, _AWAIT_CONTINUE, _SENT, _RESPONDING, _DONE
cdef int _TCP_ESTABLISHED, _IPPROTO_TCP, _TCP_INFO
cdef bint _COMPILED

@cython.locals(now=timespec)
cdef double _monotonic()

cdef class Deadline:
    cdef public object _callback
    cdef public object _handle
    cdef public double _handle_when
    cdef public object _loop
    cdef public object _time
    cdef public object _when
    cpdef set(self, double when)
    cpdef set_after(self, double delay)
    cpdef clear(self)
    cpdef cancel(self)

cdef class UpstreamConnection:
    cdef public list _events
    cdef public int _paused
    cdef public bint closed
    cdef public Deadline deadline
    cdef public Exchange exchange
    cdef public Py_ssize_t idle_cap
    cdef public ResponseParser parser
    cdef public str pod_uid
    cdef public UpstreamPool pool
    cdef public bint reusable
    cdef public object socket
    cdef public int socket_fd
    cdef public object socket_getsockopt
    cdef public bint socket_wrapped
    cdef public object transport
    cdef public object transport_is_closing
    cdef public object transport_write
    cdef public object transport_writelines
    cdef public Py_ssize_t used
    # asyncio's callback, cpdef for its typed locals (the loop calls it as a Python method)
    @cython.locals(exchange=Exchange, events=list, last=Py_ssize_t, i=Py_ssize_t)
    cpdef data_received(self, bytes data)
    cpdef broken(self, str reason)
    cpdef pause_reading(self, int reason)
    cpdef resume_reading(self, int reason)
    @cython.locals(tcp_state=cython.uchar, length=cython.uint, fd=cython.int)
    cpdef bint peer_closed(self)
    cpdef bint is_usable(self)
    cpdef close(self)
    cpdef abort(self)

cdef class UpstreamPool:
    cdef public dict _idle_since
    cdef public object _sweeper
    cdef public object clock
    cdef public dict idle
    cdef public double idle_timeout
    cdef public object limits
    cdef public object loop
    cdef public Py_ssize_t max_idle_per_pod
    cpdef UpstreamConnection checkout(self, str uid)
    cpdef checkin(self, UpstreamConnection conn, double now=*)
    cpdef forget(self, UpstreamConnection conn)

cdef class Exchange:
    cdef public object _continue_timer
    cdef public object _waiter
    cdef public object _waiter_timer
    cdef public Py_ssize_t attempts
    cdef public bint busy_refused
    cdef public ClientConnection client
    cdef public bint continue_sent
    cdef public RequestHead head
    cdef public list hold
    cdef public Py_ssize_t hold_bytes
    cdef public LLMRequest llm
    cdef public bint out_chunked
    cdef public object pod
    cdef public double queue_deadline
    cdef public object release
    cdef public list replay
    cdef public Py_ssize_t replay_bytes
    cdef public bint request_complete
    cdef public bint request_sent
    cdef public double request_side
    cdef public bint response_close
    cdef public str revision
    cdef public RouterBase router
    cdef public int stage
    cdef public int status
    cdef public double t_head
    cdef public double t_response
    cdef public UpstreamConnection upstream
    @cython.locals(router=RouterBase, snapshot=RoutingSnapshot, table=RouteTable, route=ServiceRoute)
    cpdef start(self)
    @cython.locals(request=LLMRequest)
    cpdef _start_peek(self, LLMRoute llm)
    @cython.locals(request=LLMRequest, route=LLMRoute, table=RouteTable, target=ServiceRoute)
    cpdef _end_peek(self)
    @cython.locals(router=RouterBase, llm=LLMRequest, wait=double)
    cpdef _acquire(self)
    @cython.locals(llm=LLMRequest)
    cpdef _leave_queue(self, bint taking=*)
    @cython.locals(router=RouterBase, now=double, until=double)
    cpdef _wait_affine(self, LLMRequest llm, double wait)
    @cython.locals(llm=LLMRequest)
    cpdef _on_affine_done(self, object waiter)
    @cython.locals(llm=LLMRequest, began=double, waited=double, attempts=Py_ssize_t, stats=RouterStats)
    cpdef _affine_expired(self)
    @cython.locals(pool=UpstreamPool)
    cpdef _on_lease(self, tuple lease)
    cpdef _unavailable(self, object failure)
    @cython.locals(router=RouterBase)
    cpdef _send(self, UpstreamConnection conn)
    cpdef _flush_hold(self, UpstreamConnection conn, object head_bytes)
    cpdef _send_body(self)
    cpdef _request_fully_sent(self)
    @cython.locals(llm=LLMRequest)
    cpdef request_body(self, bytes data)
    cpdef request_end(self)
    @cython.locals(stats=RouterStats)
    cpdef on_response_head(self, ResponseHead response)
    cpdef on_response_body(self, bytes data)
    @cython.locals(router=RouterBase, stats=RouterStats, pool=UpstreamPool)
    cpdef on_response_end(self, UpstreamConnection conn)
    cpdef on_upstream_error(self, object exc)
    cpdef on_upstream_lost(self, UpstreamConnection conn, object exc)
    cpdef on_first_byte_timeout(self, UpstreamConnection conn)
    cpdef _give_back_slot(self)
    cpdef fail(self, object exc)
    cpdef _finish(self)
    cpdef client_gone(self)

@cython.locals(queue=list, client=ClientConnection)
cpdef flush_queued_writes(RouterBase router)

cdef class ClientConnection:
    cdef public list _events
    cdef public list _out
    cdef public int _paused
    cdef public bint closing
    cdef public Exchange exchange
    cdef public bint flush_queued
    cdef public double head_since
    cdef public Py_ssize_t linger_budget
    cdef public double linger_since
    cdef public RequestParser parser
    cdef public str peer
    cdef public bytes peer_bytes
    cdef public bytes pending_body
    cdef public RouterBase router
    cdef public object transport
    cdef public object transport_is_closing
    cdef public object transport_write
    cdef public object transport_writelines
    cdef public bint trusted
    cdef public double waiting_since
    @cython.locals(count=Py_ssize_t, exchange=Exchange, body=bytes)
    cpdef _process_events(self)
    cpdef _reject(self, object exc)
    cpdef _linger(self)
    cpdef exchange_finished(self, Exchange exchange, double now=*)
    cpdef check_timeouts(self, double now)
    cpdef pause_reading(self, int reason)
    cpdef resume_reading(self, int reason)
    cpdef queue(self, bytes data)
    cpdef flush_soon(self)
    cpdef queue_many(self, list data)
    cpdef flush(self)
    cpdef write(self, bytes data)
    cpdef writelines(self, list data)
    cpdef abort(self)
    cpdef list forwarding_headers(self, RequestHead head)
    cpdef shutdown(self)
