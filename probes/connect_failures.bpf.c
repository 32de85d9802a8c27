// Connect failures to watched pods, classified in the kernel (bcc; tracepoints only).
//
// sock:inet_sock_set_state  CLOSE->SYN_SENT   (inside connect(), the caller's context): if the
//                           destination is in the watch trie, remember pid/tid/comm/cgroup/netns
//                           and the start time, keyed by socket pointer.
//                           SYN_SENT->CLOSE   classify by sk_err (read at the BTF offset):
//                           111 refused, 110 timeout, 113/101/112 unreachable, 104 reset, and 0
//                           (the client gave up) timeout if a SYN was retransmitted or the
//                           connect lasted >= abort_min, otherwise an abandoned connect (counted).
//                           ESTABLISHED/CLOSE_WAIT/...->CLOSE  104/32 reset, 110 timeout.
// tcp:tcp_retransmit_skb    state SYN_SENT: an early warning (the peer does not answer SYNs).
// sock:inet_sk_error_report  (if the kernel has it) an ICMP error queued on a watched socket.
//                           An ICMP that arrives while connect() still holds the socket (a REJECT
//                           rule on this node, loopback) only sets sk_err_soft, which a
//                           non-blocking caller (asyncio, uvloop) consumes with SO_ERROR before it
//                           closes the socket: the close then shows sk_err 0. Remembered per
//                           (daddr, dport, sport), it makes that close "unreachable".
// tcp:tcp_receive_reset     only without BTF (sk_err unreadable): marks the socket, so a RST
//                           classifies its close (refused at SYN_SENT, reset otherwise).
//
// Only tracepoint fields and BTF-derived offsets are used: the installed headers need not match the
// running kernel. Every record is rate-limited per (daddr, dport, kind): at most `burst` records per
// `window_ns`, the rest counted in the LRU entry's cumulative `suppressed` (which every record of
// that key carries, and which user space also sweeps).
//
// Compile-time constants (-D): SK_ERR_OFF, SKC_NET_OFF, NET_INUM_OFF (-1: unknown), WATCH_MAX,
// CONN_MAX, RL_MAX, RINGBUF_PAGES, HAVE_ERROR_REPORT (1 if sock:inet_sk_error_report exists).

#ifndef SK_ERR_OFF
#define SK_ERR_OFF -1
#endif
#ifndef SKC_NET_OFF
#define SKC_NET_OFF -1
#endif
#ifndef NET_INUM_OFF
#define NET_INUM_OFF -1
#endif
#ifndef WATCH_MAX
#define WATCH_MAX 65536
#endif
#ifndef CONN_MAX
#define CONN_MAX 65536
#endif
#ifndef RL_MAX
#define RL_MAX 16384
#endif
#ifndef HAVE_ERROR_REPORT
#define HAVE_ERROR_REPORT 0
#endif
#ifndef RINGBUF_PAGES
#define RINGBUF_PAGES 256
#endif

#define FP_TCP_ESTABLISHED 1
#define FP_TCP_SYN_SENT 2
#define FP_TCP_CLOSE 7
#define FP_IPPROTO_TCP 6

// record kinds (keep in sync with probes/agent.py)
#define K_REFUSED 1
#define K_TIMEOUT 2
#define K_RESET 3
#define K_UNREACHABLE 4
#define K_RETRANSMIT 5
#define K_OTHER 6

// counters (keep in sync with probes/agent.py)
#define C_RB_DROPS 0
#define C_EMITTED 1
#define C_SUPPRESSED 2
#define C_WATCHED_CONNECTS 3
#define C_ABANDONED 4
#define C_OTHER 5
#define C_TRACKED_CLOSES 6
#define C_ICMP_ERRORS 7
#define N_COUNTERS 8

struct watch_key {
    u32 prefixlen;
    u8 addr[16];  // IPv6, or IPv4 as ::ffff:a.b.c.d (how the tracepoints store it)
};

struct watch_val {
    u16 port;  // 0: any port
    u16 flags;
};

struct conn {
    u64 start_ns;
    u64 cgroup;
    u32 tgid;
    u32 tid;
    u32 netns;
    u32 retrans;
    u32 rst;
    u32 pad;
    char comm[16];
};

struct rl_key {
    u8 addr[16];
    u16 port;
    u8 kind;
    u8 pad;
};

struct rl_val {
    u64 window_start;
    u64 suppressed;  // cumulative for this key since it was created
    u64 count;       // records in the current window
};

struct config {
    u64 window_ns;
    u64 abort_min_ns;
    u64 burst;
};

struct record {
    u64 ts_ns;       // bpf_ktime_get_ns() at the failure (CLOCK_MONOTONIC)
    u64 start_ns;    // when connect() started (0: unknown)
    u64 suppressed;  // cumulative suppressed count of this (daddr, dport, kind)
    u64 cgroup;
    u32 tgid;
    u32 tid;
    u32 netns;
    u32 retrans;
    s32 err;
    u16 dport;
    u16 sport;
    u8 daddr[16];
    u8 saddr[16];
    u8 kind;
    u8 oldstate;
    u8 pad[6];
    char comm[16];
};

struct icmp_key {
    u8 addr[16];
    u16 dport;
    u16 sport;
};

BPF_LPM_TRIE(watch, struct watch_key, struct watch_val, WATCH_MAX);
BPF_TABLE("lru_hash", u64, struct conn, conns, CONN_MAX);
BPF_TABLE("lru_hash", struct rl_key, struct rl_val, ratelimit, RL_MAX);
BPF_ARRAY(config, struct config, 1);
BPF_PERCPU_ARRAY(counters, u64, N_COUNTERS);
BPF_RINGBUF_OUTPUT(events, RINGBUF_PAGES);
#if HAVE_ERROR_REPORT
BPF_TABLE("lru_hash", struct icmp_key, u64, icmp_errors, 4096);
#endif

static __always_inline void count(int index) {
    u64 *value = counters.lookup(&index);
    if (value)
        *value += 1;
}

static __always_inline int watched(const u8 *daddr, u16 dport) {
    struct watch_key key = {.prefixlen = 128};
    __builtin_memcpy(key.addr, daddr, 16);
    struct watch_val *val = watch.lookup(&key);
    return val && (val->port == 0 || val->port == dport);
}

static __always_inline u32 sock_netns(const void *sk) {
#if SKC_NET_OFF >= 0 && NET_INUM_OFF >= 0
    void *net = 0;
    u32 inum = 0;
    bpf_probe_read_kernel(&net, sizeof(net), (const char *)sk + SKC_NET_OFF);
    if (net)
        bpf_probe_read_kernel(&inum, sizeof(inum), (const char *)net + NET_INUM_OFF);
    return inum;
#else
    return 0;
#endif
}

static __always_inline int sock_err(const void *sk) {
#if SK_ERR_OFF >= 0
    int err = 0;
    bpf_probe_read_kernel(&err, sizeof(err), (const char *)sk + SK_ERR_OFF);
    return err;
#else
    return -1;
#endif
}

// 1: emit (r->suppressed set), 0: suppressed.
static __always_inline int admit(struct record *r) {
    int zero = 0;
    struct config *cfg = config.lookup(&zero);
    u64 window = cfg ? cfg->window_ns : 1000000000ULL;
    u64 burst = cfg && cfg->burst ? cfg->burst : 1;
    struct rl_key key = {};
    __builtin_memcpy(key.addr, r->daddr, 16);
    key.port = r->dport;
    key.kind = r->kind;
    struct rl_val *val = ratelimit.lookup(&key);
    if (!val) {
        struct rl_val fresh = {.window_start = r->ts_ns, .suppressed = 0, .count = 1};
        ratelimit.update(&key, &fresh);
        r->suppressed = 0;
        return 1;
    }
    if (r->ts_ns - val->window_start >= window) {
        val->window_start = r->ts_ns;
        val->count = 1;
        r->suppressed = val->suppressed;
        return 1;
    }
    if (val->count < burst) {
        __sync_fetch_and_add(&val->count, 1);
        r->suppressed = val->suppressed;
        return 1;
    }
    __sync_fetch_and_add(&val->suppressed, 1);
    count(C_SUPPRESSED);
    return 0;
}

static __always_inline void emit(struct record *r) {
    if (!admit(r))
        return;
    if (events.ringbuf_output(r, sizeof(*r), 0) < 0)
        count(C_RB_DROPS);
    else
        count(C_EMITTED);
}

static __always_inline void fill_from_conn(struct record *r, const struct conn *c) {
    r->start_ns = c->start_ns;
    r->cgroup = c->cgroup;
    r->tgid = c->tgid;
    r->tid = c->tid;
    r->netns = c->netns;
    r->retrans = c->retrans;
    __builtin_memcpy(r->comm, c->comm, sizeof(r->comm));
}

TRACEPOINT_PROBE(sock, inet_sock_set_state) {
    if (args->protocol != FP_IPPROTO_TCP)
        return 0;
    int oldstate = args->oldstate;
    int newstate = args->newstate;
    u64 sk = (u64)args->skaddr;

    if (newstate == FP_TCP_SYN_SENT) {
        if (oldstate != FP_TCP_CLOSE)
            return 0;
        u8 daddr[16];
        __builtin_memcpy(daddr, args->daddr_v6, 16);
        if (!watched(daddr, args->dport))
            return 0;
        struct conn c = {};
        u64 id = bpf_get_current_pid_tgid();
        c.start_ns = bpf_ktime_get_ns();
        c.cgroup = bpf_get_current_cgroup_id();
        c.tgid = id >> 32;
        c.tid = (u32)id;
        c.netns = sock_netns(args->skaddr);
        bpf_get_current_comm(&c.comm, sizeof(c.comm));
        conns.update(&sk, &c);
        count(C_WATCHED_CONNECTS);
        return 0;
    }
    if (newstate != FP_TCP_CLOSE)
        return 0;

    struct conn *c = conns.lookup(&sk);
    if (!c)
        return 0;
    count(C_TRACKED_CLOSES);
    struct record r = {};
    r.ts_ns = bpf_ktime_get_ns();
    fill_from_conn(&r, c);
    u32 rst = c->rst;
    conns.delete(&sk);

    int err = sock_err(args->skaddr);
    r.err = err;
    r.oldstate = oldstate;
    r.dport = args->dport;
    r.sport = args->sport;
    __builtin_memcpy(r.daddr, args->daddr_v6, 16);
    __builtin_memcpy(r.saddr, args->saddr_v6, 16);

    if (oldstate == FP_TCP_SYN_SENT) {
        if (err == 111) {
            r.kind = K_REFUSED;
        } else if (err == 110) {
            r.kind = K_TIMEOUT;
        } else if (err == 113 || err == 101 || err == 112) {
            r.kind = K_UNREACHABLE;
        } else if (err == 104) {
            r.kind = K_RESET;
        } else if (err <= 0) {
#if HAVE_ERROR_REPORT
            struct icmp_key ik = {};
            // volatile: copy from the stack record, not (re-optimised) from the ctx pointer
            *(u64 *)&ik.addr[0] = *(volatile u64 *)&r.daddr[0];
            *(u64 *)&ik.addr[8] = *(volatile u64 *)&r.daddr[8];
            ik.dport = *(volatile u16 *)&r.dport;
            ik.sport = *(volatile u16 *)&r.sport;
            u64 *icmp_at = icmp_errors.lookup(&ik);
            int icmp = icmp_at != 0 && *icmp_at >= r.start_ns;  // not an earlier socket's
            if (icmp)
                icmp_errors.delete(&ik);
#else
            int icmp = 0;
#endif
            if (err < 0 && rst) {  // sk_err unreadable: a RST to our SYN is a refusal
                r.kind = K_REFUSED;
            } else if (icmp) {  // the caller consumed the ICMP error (SO_ERROR) and closed
                r.kind = K_UNREACHABLE;
            } else {
                int zero = 0;
                struct config *cfg = config.lookup(&zero);
                u64 abort_min = cfg ? cfg->abort_min_ns : 200000000ULL;
                if (r.retrans > 0 || r.ts_ns - r.start_ns >= abort_min) {
                    r.kind = K_TIMEOUT;  // the client's own connect timeout
                } else {
                    count(C_ABANDONED);  // closed early by the client: not a failure
                    return 0;
                }
            }
        } else {
            r.kind = K_OTHER;
            count(C_OTHER);
        }
    } else {
        if (err == 104 || err == 32 || (err < 0 && rst))
            r.kind = K_RESET;
        else if (err == 110)
            r.kind = K_TIMEOUT;
        else
            return 0;  // an orderly close
    }
    emit(&r);
    return 0;
}

TRACEPOINT_PROBE(tcp, tcp_retransmit_skb) {
    if (args->state != FP_TCP_SYN_SENT)
        return 0;
    u64 sk = (u64)args->skaddr;
    struct conn *c = conns.lookup(&sk);
    if (!c)
        return 0;
    __sync_fetch_and_add(&c->retrans, 1);
    struct record r = {};
    r.ts_ns = bpf_ktime_get_ns();
    fill_from_conn(&r, c);
    r.kind = K_RETRANSMIT;
    r.oldstate = FP_TCP_SYN_SENT;
    r.dport = args->dport;
    r.sport = args->sport;
    __builtin_memcpy(r.daddr, args->daddr_v6, 16);
    __builtin_memcpy(r.saddr, args->saddr_v6, 16);
    emit(&r);
    return 0;
}

#if HAVE_ERROR_REPORT
TRACEPOINT_PROBE(sock, inet_sk_error_report) {
    if (args->protocol != FP_IPPROTO_TCP || args->error != 0)
        return 0;  // an error in sk_err is read at the close anyway
    u8 daddr[16];
    __builtin_memcpy(daddr, args->daddr_v6, 16);
    if (!watched(daddr, args->dport))
        return 0;
    struct icmp_key key = {};
    __builtin_memcpy(key.addr, daddr, 16);
    key.dport = args->dport;
    key.sport = args->sport;
    u64 now = bpf_ktime_get_ns();
    icmp_errors.update(&key, &now);
    count(C_ICMP_ERRORS);
    return 0;
}
#endif

#if SK_ERR_OFF < 0
// Only without BTF: sk_err cannot be read, so a RST seen on the socket classifies its close. With
// BTF it is not compiled (and not attached): it would cost every refused connect on the node a
// map lookup (~0.17 us measured) for nothing sk_err does not already say.
TRACEPOINT_PROBE(tcp, tcp_receive_reset) {
    u64 sk = (u64)args->skaddr;
    struct conn *c = conns.lookup(&sk);
    if (c)
        c->rst = 1;
    return 0;
}
#endif
