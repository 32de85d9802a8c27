"""Struct member offsets of the *running* kernel, read from its BTF in pure Python.

Theory of operation
-------------------
The kernel headers installed on a node need not match the running kernel (measured here: Debian's
6.1 headers on a 6.18 kernel put ``sock.sk_err`` at 544 where the kernel has it at 284), so the
probe never reads a kernel struct through header layouts. Instead the few offsets it needs are
looked up in ``/sys/kernel/btf/vmlinux`` and handed to the compiler as ``-D`` constants.

The parser makes one pass over the type section to record where each type record starts and the
ids of named structs/unions; members are decoded only for the types a lookup walks through.
A dotted path (``"__sk_common.skc_net.net"``) descends through typedefs and qualifiers, and a name
not found directly is searched in anonymous struct/union members, as C itself does.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path

VMLINUX_BTF = Path("/sys/kernel/btf/vmlinux")

BTF_MAGIC = 0xEB9F
# kinds
INT, PTR, ARRAY, STRUCT, UNION, ENUM, FWD, TYPEDEF, VOLATILE, CONST, RESTRICT = range(1, 12)
FUNC, FUNC_PROTO, VAR, DATASEC, FLOAT, DECL_TAG, TYPE_TAG, ENUM64 = range(12, 20)

# bytes of kind-specific data after the 12-byte common header: fixed part, per-vlen part
_EXTRA: dict[int, tuple[int, int]] = {
    INT: (4, 0), PTR: (0, 0), ARRAY: (12, 0), STRUCT: (0, 12), UNION: (0, 12), ENUM: (0, 8),
    FWD: (0, 0), TYPEDEF: (0, 0), VOLATILE: (0, 0), CONST: (0, 0), RESTRICT: (0, 0), FUNC: (0, 0),
    FUNC_PROTO: (0, 8), VAR: (4, 0), DATASEC: (0, 12), FLOAT: (0, 0), DECL_TAG: (4, 0),
    TYPE_TAG: (0, 0), ENUM64: (0, 12),
}  # fmt: skip
_QUALIFIERS = (TYPEDEF, VOLATILE, CONST, RESTRICT, TYPE_TAG)


class BTFError(Exception):
    """BTF is missing, malformed, or lacks a type/member we need."""


@dataclass(frozen=True)
class Member:
    name: str
    type_id: int
    bit_offset: int
    bitfield_size: int


class BTF:
    def __init__(self, data: bytes) -> None:
        if len(data) < 24:
            raise BTFError("BTF blob too short")
        magic, _version, _flags, hdr_len = struct.unpack_from("<HBBI", data, 0)
        if magic != BTF_MAGIC:
            raise BTFError(f"bad BTF magic {magic:#x}")
        type_off, type_len, str_off, str_len = struct.unpack_from("<IIII", data, 8)
        self._data = data
        self._types_start = hdr_len + type_off
        self._types_end = self._types_start + type_len
        self._strs = hdr_len + str_off
        self._strs_end = self._strs + str_len
        self._offsets: list[int] = [0]  # type id -> position of its record (id 0 is void)
        self._by_name: dict[str, list[int]] = {}  # struct/union name -> ids
        self._index()

    @classmethod
    def load(cls, path: Path = VMLINUX_BTF) -> BTF:
        try:
            return cls(path.read_bytes())
        except OSError as exc:
            raise BTFError(f"cannot read {path}: {exc.strerror or exc}") from None

    def _index(self) -> None:
        data = self._data
        pos = self._types_start
        end = self._types_end
        unpack = struct.Struct("<III").unpack_from
        offsets = self._offsets
        names = self._by_name
        extra = _EXTRA
        while pos < end:
            name_off, info, _ = unpack(data, pos)
            kind = (info >> 24) & 0x1F
            vlen = info & 0xFFFF
            try:
                fixed, per = extra[kind]
            except KeyError:
                raise BTFError(f"unknown BTF kind {kind} at byte {pos}") from None
            offsets.append(pos)
            if kind in (STRUCT, UNION) and name_off:
                names.setdefault(self.string(name_off), []).append(len(offsets) - 1)
            pos += 12 + fixed + per * vlen

    def string(self, off: int) -> str:
        start = self._strs + off
        stop = self._data.index(b"\0", start, self._strs_end)
        return self._data[start:stop].decode()

    def _header(self, type_id: int) -> tuple[int, int, int, int, bool]:
        """(name_off, kind, vlen, size_or_type, kind_flag)"""
        if not 0 < type_id < len(self._offsets):
            raise BTFError(f"no BTF type id {type_id}")
        name_off, info, size_or_type = struct.unpack_from("<III", self._data, self._offsets[type_id])
        return name_off, (info >> 24) & 0x1F, info & 0xFFFF, size_or_type, bool(info >> 31)

    def resolve(self, type_id: int) -> int:
        """Skip typedefs and qualifiers."""
        for _ in range(64):
            _, kind, _, target, _ = self._header(type_id)
            if kind not in _QUALIFIERS:
                return type_id
            type_id = target
        raise BTFError("typedef chain too long")

    def kind(self, type_id: int) -> int:
        return self._header(type_id)[1]

    def members(self, type_id: int) -> list[Member]:
        _, kind, vlen, _, kind_flag = self._header(type_id)
        if kind not in (STRUCT, UNION):
            raise BTFError(f"type {type_id} is not a struct or union")
        out = []
        pos = self._offsets[type_id] + 12
        for i in range(vlen):
            name_off, mtype, offset = struct.unpack_from("<III", self._data, pos + 12 * i)
            if kind_flag:
                bits, size = offset & 0xFFFFFF, offset >> 24
            else:
                bits, size = offset, 0
            out.append(Member(self.string(name_off) if name_off else "", mtype, bits, size))
        return out

    def struct_id(self, name: str) -> int:
        """The id of a complete (non-empty) struct or union of that name."""
        for type_id in self._by_name.get(name, ()):
            if self._header(type_id)[2] > 0 or self._header(type_id)[3] > 0:
                return type_id
        raise BTFError(f"struct {name} not in BTF")

    def _find(self, type_id: int, name: str) -> tuple[int, int] | None:
        """(bit offset, member type id) of ``name`` in the struct, looking into anonymous members."""
        for member in self.members(type_id):
            if member.name == name:
                return member.bit_offset, member.type_id
        for member in self.members(type_id):
            if not member.name:
                inner = self.resolve(member.type_id)
                if self.kind(inner) in (STRUCT, UNION):
                    found = self._find(inner, name)
                    if found is not None:
                        return member.bit_offset + found[0], found[1]
        return None

    def offset(self, struct_name: str, path: str) -> int:
        """Byte offset of ``path`` (dotted, through nested structs) inside ``struct struct_name``."""
        type_id = self.struct_id(struct_name)
        bits = 0
        for part in path.split("."):
            type_id = self.resolve(type_id)
            if self.kind(type_id) not in (STRUCT, UNION):
                raise BTFError(f"{struct_name}.{path}: {part!r} is inside a non-struct member")
            found = self._find(type_id, part)
            if found is None:
                raise BTFError(f"struct {struct_name} has no member {path}")
            bits += found[0]
            type_id = found[1]
        if bits % 8:
            raise BTFError(f"{struct_name}.{path} is a bitfield")
        return bits // 8


@dataclass(frozen=True)
class ProbeOffsets:
    sk_err: int  # struct sock.sk_err (int)
    skc_net: int  # struct sock -> struct net * (possible_net_t's pointer); -1 without netns
    net_inum: int  # struct net.ns.inum (unsigned int); -1 without netns

    def cflags(self) -> list[str]:
        return [
            f"-DSK_ERR_OFF={self.sk_err}",
            f"-DSKC_NET_OFF={self.skc_net}",
            f"-DNET_INUM_OFF={self.net_inum}",
        ]


def probe_offsets(btf: BTF | None = None) -> ProbeOffsets:
    """The offsets the connect-failure probe reads; raises BTFError when BTF lacks ``sk_err``."""
    btf = btf or BTF.load()
    sk_err = btf.offset("sock", "sk_err")
    try:
        skc_net = btf.offset("sock", "__sk_common.skc_net.net")
        net_inum = btf.offset("net", "ns.inum")
    except BTFError:  # CONFIG_NET_NS=n: possible_net_t is empty; report netns 0
        skc_net = net_inum = -1
    return ProbeOffsets(sk_err=sk_err, skc_net=skc_net, net_inum=net_inum)
