"""Loading the connect-failure probe: find bcc, check the node, compile, attach, talk to the maps.

Theory of operation
-------------------
bcc's Python module is Debian's ``python3-bpfcc`` (pure Python over ctypes and ``libbcc.so``). It
lives in ``/usr/lib/python3/dist-packages/bcc``; ``import_bcc`` loads exactly that package by file
location, so nothing else from Debian's dist-packages ever shadows the venv (PyPI's ``bcc`` is an
unrelated project and is refused). ``check_node`` answers "can this node run the probe, and if not
why" without compiling anything: privileges, the bpf() syscall itself, BTF, kernel headers,
tracefs and the three tracepoints, bcc. ``Probe.load`` then reads the struct offsets from BTF
(``probes.btf``), compiles ``connect_failures.bpf.c`` with them as ``-D`` flags; bcc attaches the
``TRACEPOINT_PROBE`` functions as part of loading.

User space owns three maps: the ``watch`` LPM trie (addresses to follow, diffed on every change),
the ``config`` array (rate-limit window/burst, the abandoned-connect threshold) and reads the
``counters`` per-CPU array and the ``ratelimit`` LRU hash (cumulative suppressed counts). Records
arrive on the ``events`` ring buffer; its map fd is pollable, so an event loop can ``add_reader``
it and call ``consume()``.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import importlib.util
import ipaddress
import os
import platform
import struct
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

from probes.btf import VMLINUX_BTF, BTFError, ProbeOffsets, probe_offsets

BCC_DIR = Path(os.environ.get("FASTPROXY_BCC_DIR", "/usr/lib/python3/dist-packages/bcc"))
SOURCE = Path(__file__).with_name("connect_failures.bpf.c")
TRACEFS_CANDIDATES = (Path("/sys/kernel/tracing"), Path("/sys/kernel/debug/tracing"))
TRACEPOINTS = ("sock/inet_sock_set_state", "tcp/tcp_retransmit_skb")  # required
RESET_TRACEPOINT = "tcp/tcp_receive_reset"  # used only without BTF
ERROR_REPORT_TRACEPOINT = "sock/inet_sk_error_report"  # optional: ICMP errors a caller consumed

# record kinds and counters: keep in sync with connect_failures.bpf.c
K_REFUSED, K_TIMEOUT, K_RESET, K_UNREACHABLE, K_RETRANSMIT, K_OTHER = 1, 2, 3, 4, 5, 6
KIND_NAMES = {
    K_REFUSED: "refused",
    K_TIMEOUT: "timeout",
    K_RESET: "reset",
    K_UNREACHABLE: "unreachable",
    K_RETRANSMIT: "syn_retransmit",
    K_OTHER: "other",
}
COUNTERS = (
    "ringbuf_drops",
    "emitted",
    "suppressed",
    "watched_connects",
    "abandoned",
    "other",
    "tracked_closes",
    "icmp_errors",
)
N_COUNTERS = 8

# struct record (112 bytes): ts, start, suppressed, cgroup, tgid, tid, netns, retrans, err, dport,
# sport, daddr[16], saddr[16], kind, oldstate, pad[6], comm[16]
RECORD = struct.Struct("<QQQQIIIIiHH16s16sBB6x16s")
V4_PREFIX = b"\0" * 10 + b"\xff\xff"

_BPF_SYSCALL = {"x86_64": 321, "aarch64": 280, "armv7l": 386, "ppc64le": 361, "s390x": 351, "riscv64": 280}


class ProbeUnavailable(Exception):
    """eBPF cannot run here; the message says why and what to do."""


@dataclass(frozen=True)
class Record:
    ts_ns: int
    start_ns: int
    suppressed: int
    cgroup: int
    pid: int
    tid: int
    netns: int
    retrans: int
    err: int
    dport: int
    sport: int
    daddr: bytes  # 16 bytes; IPv4 as ::ffff:a.b.c.d
    saddr: bytes
    kind: int
    oldstate: int
    comm: str

    @classmethod
    def decode(cls, data: bytes) -> Record:
        (
            ts,
            start,
            suppressed,
            cgroup,
            pid,
            tid,
            netns,
            retrans,
            err,
            dport,
            sport,
            daddr,
            saddr,
            kind,
            oldstate,
            comm,
        ) = RECORD.unpack_from(data)
        return cls(
            ts,
            start,
            suppressed,
            cgroup,
            pid,
            tid,
            netns,
            retrans,
            err,
            dport,
            sport,
            daddr,
            saddr,
            kind,
            oldstate,
            comm.split(b"\0", 1)[0].decode(errors="replace"),
        )

    @property
    def kind_name(self) -> str:
        return KIND_NAMES.get(self.kind, f"kind{self.kind}")


def addr16(ip: str) -> bytes:
    """An address as the tracepoints store it: IPv6, or IPv4 as ::ffff:a.b.c.d."""
    parsed = ipaddress.ip_address(ip)
    if parsed.version == 4:
        return V4_PREFIX + parsed.packed
    return parsed.packed


def addr_text(addr: bytes) -> str:
    if addr[:12] == V4_PREFIX:
        return str(ipaddress.IPv4Address(addr[12:]))
    return str(ipaddress.IPv6Address(addr))


# ---- finding bcc ---------------------------------------------------------------------------------


def import_bcc() -> ModuleType:
    """Debian's bcc package, loaded from its directory only (never all of dist-packages)."""
    loaded = sys.modules.get("bcc")
    if loaded is not None:
        if Path(getattr(loaded, "__file__", "") or "").resolve().parent == BCC_DIR.resolve():
            return loaded
        raise ProbeUnavailable(
            f"a different 'bcc' module is already imported ({loaded.__file__}); PyPI's "
            "bcc is unrelated to the BPF compiler collection"
        )
    init = BCC_DIR / "__init__.py"
    if not init.is_file():
        raise ProbeUnavailable(
            f"bcc missing: no {init} (apt-get install python3-bpfcc; scripts/prepare-ebpf.sh does this)"
        )
    spec = importlib.util.spec_from_file_location("bcc", init, submodule_search_locations=[str(BCC_DIR)])
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["bcc"] = module
    try:
        spec.loader.exec_module(module)
    except Exception as exc:  # libbcc.so missing, wrong Python, ...
        for name in [n for n in sys.modules if n == "bcc" or n.startswith("bcc.")]:
            del sys.modules[name]
        raise ProbeUnavailable(f"bcc failed to load from {BCC_DIR}: {exc}") from None
    return module


# ---- can this node run it? -----------------------------------------------------------------------


@dataclass(frozen=True)
class Check:
    name: str
    ok: bool
    detail: str


def _capabilities() -> int:
    with contextlib.suppress(OSError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("CapEff:"):
                return int(line.split()[1], 16)
    return 0


def _check_privileges() -> Check:
    caps = _capabilities()
    sys_admin, perfmon, bpf = bool(caps >> 21 & 1), bool(caps >> 38 & 1), bool(caps >> 39 & 1)
    if os.geteuid() == 0 and sys_admin:
        return Check("privileges", True, "root")
    if sys_admin or (bpf and perfmon):
        return Check("privileges", True, "CAP_SYS_ADMIN" if sys_admin else "CAP_BPF + CAP_PERFMON")
    who = "not root" if os.geteuid() != 0 else "root without CAP_SYS_ADMIN"
    return Check(
        "privileges",
        False,
        f"{who} (uid {os.geteuid()}): needs root, CAP_BPF + CAP_PERFMON, or CAP_SYS_ADMIN",
    )


def _check_bpf_syscall() -> Check:
    number = _BPF_SYSCALL.get(platform.machine())
    if number is None:
        return Check("bpf()", True, f"not probed on {platform.machine()}")
    libc = ctypes.CDLL(None, use_errno=True)
    attr = (ctypes.c_uint32 * 18)(2, 4, 4, 1)  # BPF_MAP_TYPE_ARRAY, key 4, value 4, 1 entry
    fd = libc.syscall(number, 0, ctypes.byref(attr), ctypes.sizeof(attr))  # BPF_MAP_CREATE
    if fd >= 0:
        os.close(fd)
        return Check("bpf()", True, "map create ok")
    err = ctypes.get_errno()
    if err == errno.ENOSYS:
        return Check("bpf()", False, "no BPF: the kernel has no bpf() syscall (CONFIG_BPF_SYSCALL=n)")
    if err == errno.EPERM:
        return Check(
            "bpf()", False, "bpf() not permitted (capabilities, or a seccomp profile blocking bpf())"
        )
    return Check("bpf()", False, f"bpf() failed: {os.strerror(err)}")


def _check_btf() -> Check:
    try:
        offsets = probe_offsets()
    except BTFError as exc:  # the probe still runs, classifying by RST and retransmits
        return Check(
            "BTF",
            True,
            f"degraded: {exc} (without CONFIG_DEBUG_INFO_BTF sk_err cannot be read "
            "safely: failures are classified by RST and SYN retransmits, netns is not reported)",
        )
    return Check(
        "BTF",
        True,
        f"{VMLINUX_BTF}: sock.sk_err at {offsets.sk_err}, netns via "
        f"{'skc_net' if offsets.skc_net >= 0 else 'none (no CONFIG_NET_NS)'}",
    )


def _check_headers() -> Check:
    release = platform.release()
    build = Path("/lib/modules") / release / "build"
    if (build / "include").is_dir() or (build / "Makefile").is_file():
        return Check("headers", True, f"{build} -> {os.path.realpath(build)}")
    if Path("/sys/kernel/kheaders.tar.xz").exists():
        return Check("headers", True, "/sys/kernel/kheaders.tar.xz (CONFIG_IKHEADERS)")
    return Check(
        "headers",
        False,
        f"no kernel headers at {build} (install linux-headers and link them there; "
        "scripts/prepare-ebpf.sh does this)",
    )


def tracefs() -> Path | None:
    for base in TRACEFS_CANDIDATES:
        if (base / "events").is_dir():
            return base
    return None


def _check_tracefs() -> Check:
    base = tracefs()
    if base is None:
        return Check("tracefs", False, "tracefs not mounted (mount -t tracefs nodev /sys/kernel/tracing)")
    missing = [tp for tp in TRACEPOINTS if not (base / "events" / tp / "format").exists()]
    if missing:
        return Check("tracefs", False, f"{base}: missing tracepoints {', '.join(missing)}")
    reset = (base / "events" / RESET_TRACEPOINT / "format").exists()
    return Check(
        "tracefs",
        True,
        f"{base}: {', '.join(TRACEPOINTS)}"
        f"{', ' + RESET_TRACEPOINT if reset else ' (no ' + RESET_TRACEPOINT + ': needed only without BTF)'}",
    )


def _check_bcc() -> Check:
    try:
        bcc = import_bcc()
    except ProbeUnavailable as exc:
        return Check("bcc", False, str(exc))
    return Check("bcc", True, f"{BCC_DIR} (bcc {getattr(bcc, '__version__', '?')})")


def check_node() -> list[Check]:
    """Every prerequisite, each with a reason (nothing is compiled or attached)."""
    return [
        _check_privileges(),
        _check_bpf_syscall(),
        _check_btf(),
        _check_headers(),
        _check_tracefs(),
        _check_bcc(),
    ]


def require_node() -> None:
    problems = [f"{c.name}: {c.detail}" for c in check_node() if not c.ok]
    if problems:
        raise ProbeUnavailable("; ".join(problems))


# ---- the probe -----------------------------------------------------------------------------------


class Probe:
    def __init__(
        self,
        *,
        window: float = 1.0,
        burst: int = 1,
        abort_min: float = 0.2,
        ringbuf_pages: int = 256,
        watch_max: int = 65536,
        conn_max: int = 65536,
        ratelimit_max: int = 16384,
        use_btf: bool = True,
    ) -> None:
        self.use_btf = use_btf
        self.degraded = ""  # why classification is weaker than with BTF, if it is
        self.window = window
        self.burst = burst
        self.abort_min = abort_min
        self.defines = {
            "RINGBUF_PAGES": ringbuf_pages,
            "WATCH_MAX": watch_max,
            "CONN_MAX": conn_max,
            "RL_MAX": ratelimit_max,
        }
        self.bpf: Any = None
        self.load_seconds = 0.0
        self.watching: dict[bytes, int] = {}  # address (16 bytes) -> port (0: any)
        self._callback: Any = None
        self._attached = False

    def load(self, check: bool = True) -> float:
        """Check, compile, load and attach. Raises ProbeUnavailable with the reason."""
        if check:
            require_node()
        bcc = import_bcc()
        if self.use_btf:
            try:
                offsets = probe_offsets()
            except BTFError as exc:
                self.degraded = f"no BTF ({exc}): classifying by RST and retransmits, netns unknown"
                offsets = ProbeOffsets(sk_err=-1, skc_net=-1, net_inum=-1)
        else:
            self.degraded = "BTF not used: classifying by RST and retransmits, netns unknown"
            offsets = ProbeOffsets(sk_err=-1, skc_net=-1, net_inum=-1)
        base = tracefs()
        error_report = base is not None and (base / "events" / ERROR_REPORT_TRACEPOINT / "format").exists()
        defines = {**self.defines, "HAVE_ERROR_REPORT": int(error_report)}
        cflags = [*offsets.cflags(), *(f"-D{k}={v}" for k, v in defines.items()), "-w"]
        started = time.perf_counter()
        try:
            self.bpf = bcc.BPF(src_file=str(SOURCE).encode(), cflags=cflags)
        except Exception as exc:  # compile error, verifier rejection, attach failure
            raise ProbeUnavailable(f"loading the probe failed: {exc}") from None
        self.load_seconds = time.perf_counter() - started
        self._attached = True
        self.configure()
        return self.load_seconds

    def configure(
        self, window: float | None = None, burst: int | None = None, abort_min: float | None = None
    ) -> None:
        if window is not None:
            self.window = window
        if burst is not None:
            self.burst = burst
        if abort_min is not None:
            self.abort_min = abort_min
        table = self.bpf[b"config"]
        leaf = table.Leaf()
        leaf.window_ns = int(self.window * 1e9)
        leaf.abort_min_ns = int(self.abort_min * 1e9)
        leaf.burst = max(1, int(self.burst))
        table[ctypes.c_int(0)] = leaf

    # ---- watch list

    def set_watch(self, wanted: dict[bytes, int]) -> tuple[int, int]:
        """Make the trie hold exactly ``wanted`` (address -> port, 0 = any). Returns (added, removed)."""
        trie = self.bpf[b"watch"]
        added = removed = 0
        for addr in [a for a in self.watching if a not in wanted]:
            with contextlib.suppress(KeyError):
                del trie[self._trie_key(trie, addr)]
            del self.watching[addr]
            removed += 1
        for addr, port in wanted.items():
            if self.watching.get(addr) == port:
                continue
            leaf = trie.Leaf()
            leaf.port = port
            leaf.flags = 0
            trie[self._trie_key(trie, addr)] = leaf
            self.watching[addr] = port
            added += 1
        return added, removed

    @staticmethod
    def _trie_key(trie: Any, addr: bytes) -> Any:
        key = trie.Key()
        key.prefixlen = 128
        ctypes.memmove(ctypes.addressof(key.addr), addr, 16)
        return key

    # ---- records and counters

    def open(self, on_data: Callable[[bytes], None]) -> int:
        """Route ring-buffer records to ``on_data(raw bytes)``; returns the pollable map fd."""

        def callback(_ctx: Any, data: Any, size: int) -> int:
            on_data(ctypes.string_at(data, size))
            return 0

        events = self.bpf[b"events"]
        events.open_ring_buffer(callback)
        self._callback = callback
        return int(events.map_fd)

    def consume(self) -> None:
        self.bpf.ring_buffer_consume()

    def poll(self, timeout_ms: int = 100) -> None:
        self.bpf.ring_buffer_poll(timeout_ms)

    def counters(self) -> dict[str, int]:
        table = self.bpf[b"counters"]
        out = {}
        for index, name in enumerate(COUNTERS):
            out[name] = int(sum(table[ctypes.c_int(index)]))
        return out

    def counter(self, name: str) -> int:
        return int(sum(self.bpf[b"counters"][ctypes.c_int(COUNTERS.index(name))]))

    def ratelimit_entries(self) -> Iterator[tuple[bytes, int, int, int]]:
        """(address, port, kind, cumulative suppressed) for every rate-limit entry."""
        table = self.bpf[b"ratelimit"]
        try:
            items: Any = list(table.items_lookup_batch())
        except Exception:  # kernels without batch ops on this map type
            items = list(table.items())
        for key, value in items:
            yield bytes(key.addr), int(key.port), int(key.kind), int(value.suppressed)

    # ---- in-kernel run time (benchmarks): BPF_ENABLE_STATS + bpf_prog_info.run_time_ns/run_cnt

    @contextlib.contextmanager
    def run_time_stats(self) -> Iterator[None]:
        """Count run time of every BPF program while inside (BPF_ENABLE_STATS; off again on exit)."""
        number = _BPF_SYSCALL.get(platform.machine())
        if number is None:
            raise ProbeUnavailable(f"bpf() syscall number unknown on {platform.machine()}")
        libc = ctypes.CDLL(None, use_errno=True)
        attr = (ctypes.c_uint32 * 18)(0)  # enable_stats.type = BPF_STATS_RUN_TIME
        fd = libc.syscall(number, 32, ctypes.byref(attr), ctypes.sizeof(attr))  # BPF_ENABLE_STATS
        if fd < 0:
            raise OSError(ctypes.get_errno(), "BPF_ENABLE_STATS failed")
        try:
            yield
        finally:
            os.close(fd)

    def run_time(self) -> dict[str, tuple[int, int]]:
        """Program name -> (run_time_ns, run_cnt) so far (counted only under ``run_time_stats``)."""
        from probes.btf import BTF

        number = _BPF_SYSCALL[platform.machine()]
        btf = BTF.load()
        time_off, count_off = (
            btf.offset("bpf_prog_info", "run_time_ns"),
            btf.offset("bpf_prog_info", "run_cnt"),
        )
        size = max(time_off, count_off) + 8
        libc = ctypes.CDLL(None, use_errno=True)
        out = {}
        for name, function in self.bpf.funcs.items():
            info = ctypes.create_string_buffer(size)
            attr = struct.pack("<IIQ", function.fd, size, ctypes.addressof(info)) + bytes(48)
            attr_buf = ctypes.create_string_buffer(attr, len(attr))
            if libc.syscall(number, 15, attr_buf, len(attr)) < 0:  # BPF_OBJ_GET_INFO_BY_FD
                raise OSError(ctypes.get_errno(), "BPF_OBJ_GET_INFO_BY_FD failed")
            (run_time,) = struct.unpack_from("<Q", info.raw, time_off)
            (run_cnt,) = struct.unpack_from("<Q", info.raw, count_off)
            out[name.decode().removeprefix("tracepoint__")] = (run_time, run_cnt)
        return out

    # ---- attach / detach (benchmarks) and teardown

    def tracepoints(self) -> list[tuple[bytes, bytes]]:
        """(category:event, function) for every probe function in the program."""
        out = []
        for function in self.bpf.funcs:
            _, category, event = function.decode().split("__", 2)
            out.append((f"{category}:{event}".encode(), function))
        return out

    def detach(self) -> None:
        if self._attached:
            for tp, _ in self.tracepoints():
                self.bpf.detach_tracepoint(tp)
            self._attached = False

    def attach(self) -> None:
        if not self._attached:
            for tp, fn in self.tracepoints():
                self.bpf.attach_tracepoint(tp=tp, fn_name=fn)
            self._attached = True

    @property
    def attached(self) -> bool:
        return self._attached

    def close(self) -> None:
        if self.bpf is not None:
            with contextlib.suppress(Exception):
                self.bpf.cleanup()
            self.bpf = None
            self._attached = False
