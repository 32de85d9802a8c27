"""Valkey ACL users, one per role: each process can do what its part of the design needs, no more.

Theory of operation
-------------------
``statesync.keys`` says who writes and who reads every key; this module turns that table into
``ACL SETUSER`` rules, taking every key and channel name from ``Keys`` (never a second copy of the
strings), so a renamed key or another namespace changes the rules with it. Key patterns are
glob-escaped (a namespace may contain ``*`` or ``[``) and tagged ``%R~`` (read), ``%W~`` (write) or
``~`` (both) so a reader of a key cannot write it and an appender of the stream cannot read it.

=========  ==============================================  ============================================
role       commands                                        keys and channels
=========  ==============================================  ============================================
router     GET HGETALL HVALS MULTI EXEC DISCARD (boot-    read: version, state-epoch, pods (and the
           strap in one transaction), XRANGE (gap fill),   packed pod chunks + their version), routes,
                                                           changes (the change log);
           SUBSCRIBE UNSUBSCRIBE (deltas + heartbeats),    channel: deltas (subscribe only);
           XADD (exclusion reports, ``ReportForwarder``)   write: events (append only)
writer     EXISTS INCRBY SET GET (lease), MULTI EXEC       all (~) of: lease, epoch, version,
           DISCARD ZRANGE HGETALL HVALS (load), EVALSHA    state-epoch, applied, pods, routes,
           EVAL SCRIPT LOAD + what the commit/renew        changes, events: every key of ``Keys``;
           scripts run (HSET HDEL DEL ZADD                 channel: deltas (publish + subscribe)
           ZREMRANGEBYRANK PEXPIRE XADD XACK PUBLISH),
           XGROUP CREATE XREADGROUP XACK
           XAUTOCLAIM XPENDING XINFO GROUPS XTRIM
           (consumer group), XADD (recovery outcomes,
           informer), PUBLISH (heartbeats)
agent      XADD (ConnectFailed), GET HGETALL MULTI EXEC    write: events (append only);
           DISCARD (its watch list), SUBSCRIBE             read: version, pods (not routes);
           UNSUBSCRIBE (deltas)                            channel: deltas (subscribe only)
sidecar    XADD (readiness pushes, discovery)              write: events (append only)
=========  ==============================================  ============================================

Every role also gets PING and CLIENT SETINFO (valkey-py sends it on connect). Nobody but the writer
can PUBLISH (a forged delta would be applied by every router), run a script, touch the lease or
write a pod record; nobody but the writer can read or trim the events stream (events carry pod
addresses from every node). The node agent reads pods because it must know which addresses to
watch in the kernel; it never sees routes. Use db 0: the rules grant no SELECT.

``python -m statesync.acl`` prints the ``ACL SETUSER`` lines (passwords from
``FASTPROXY_ACL_<ROLE>_PASSWORD`` or ``--password role=secret``; ``--hashed`` prints SHA-256 hashes,
so the lines can go into an ACL file or a ConfigMap without the clear password). ``apply_users``
does the same through a client, for tests and for an operator's bootstrap job.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import re
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from statesync.keys import Keys

ROLES = ("router", "writer", "agent", "sidecar")

_CONNECTION = ("ping", "client|setinfo")
_TRANSACTION = ("multi", "exec", "discard")
_PUBSUB_READ = ("subscribe", "unsubscribe")
# leadership (lease, fencing epoch) and loading the committed state
_WRITER_LEADERSHIP = ("exists", "incrby", "set", "get", "zrange", "hgetall", "hvals")
# the fenced commit and lease renewal scripts, and what they run
_WRITER_SCRIPTS = ("evalsha", "eval", "script|load", "hset", "hdel", "del", "zadd", "zremrangebyrank",
                   "pexpire", "xadd", "xack", "publish")  # fmt: skip
# the events stream's consumer group
_WRITER_GROUP = ("xgroup|create", "xreadgroup", "xack", "xautoclaim", "xpending", "xinfo|groups", "xtrim")


@dataclass(frozen=True, slots=True)
class RoleRules:
    role: str
    commands: tuple[str, ...]
    read_keys: tuple[str, ...] = ()
    write_keys: tuple[str, ...] = ()
    all_keys: tuple[str, ...] = ()
    channels: tuple[str, ...] = ()

    def tokens(self) -> list[str]:
        """The rule tokens after ``ACL SETUSER <name> reset on <password>``."""
        out = ["resetchannels", "-@all"]
        out += [f"+{command}" for command in self.commands]
        out += [f"%R~{glob_escape(key)}" for key in self.read_keys]
        out += [f"%W~{glob_escape(key)}" for key in self.write_keys]
        out += [f"~{glob_escape(key)}" for key in self.all_keys]
        out += [f"&{glob_escape(channel)}" for channel in self.channels]
        return out


_GLOB_SPECIAL = re.compile(r"([*?\[\]\\])")


def glob_escape(name: str) -> str:
    """ACL key and channel patterns are globs: a literal name must escape ``* ? [ ] \\``."""
    return _GLOB_SPECIAL.sub(r"\\\1", name)


def role_rules(role: str, keys: Keys | None = None) -> RoleRules:
    keys = keys or Keys()
    if role == "router":
        # The packed bootstrap view (pod chunks and their version) is read like pods, where the
        # data model has it.
        packed = tuple(
            getattr(keys, name) for name in ("pod_chunks", "chunks_version") if hasattr(keys, name)
        )
        return RoleRules(
            role,
            commands=(
                *_CONNECTION,
                *_TRANSACTION,
                *_PUBSUB_READ,
                "get",
                "hgetall",
                "xrange",
                "xadd",
                *(("hvals",) if packed else ()),
            ),
            read_keys=(keys.version, keys.state_epoch, keys.pods, *packed, keys.routes, keys.changes),
            write_keys=(keys.events,),
            channels=(keys.channel,),
        )
    if role == "writer":
        return RoleRules(
            role,
            commands=(
                *_CONNECTION,
                *_TRANSACTION,
                *_PUBSUB_READ,
                *_WRITER_LEADERSHIP,
                *_WRITER_SCRIPTS,
                *_WRITER_GROUP,
            ),
            all_keys=writer_keys(keys),
            channels=(keys.channel,),
        )
    if role == "agent":
        return RoleRules(
            role,
            commands=(*_CONNECTION, *_TRANSACTION, *_PUBSUB_READ, "get", "hgetall", "xadd"),
            read_keys=(keys.version, keys.pods),
            write_keys=(keys.events,),
            channels=(keys.channel,),
        )
    if role == "sidecar":
        return RoleRules(role, commands=(*_CONNECTION, "xadd"), write_keys=(keys.events,))
    raise ValueError(f"unknown role {role!r} (roles: {', '.join(ROLES)})")


def writer_keys(keys: Keys) -> tuple[str, ...]:
    """Every key of the data model: the writer owns them all (a key added to ``Keys`` is the
    writer's at once; readers get it only when their rules name it)."""
    names = [name for name, value in vars(Keys).items() if isinstance(value, property) and name != "channel"]
    return tuple(getattr(keys, name) for name in names)


def default_username(role: str, keys: Keys | None = None) -> str:
    return f"{(keys or Keys()).ns}-{role}"


def setuser_args(
    role: str, username: str, password: str, keys: Keys | None = None, *, hashed: bool = False
) -> list[str]:
    """``ACL SETUSER`` as an argument list (``reset`` first: re-applying replaces, never adds)."""
    if not password:
        raise ValueError(f"role {role}: an empty password would let anyone in as {username}")
    secret = "#" + hashlib.sha256(password.encode()).hexdigest() if hashed else ">" + password
    return ["ACL", "SETUSER", username, "reset", "on", secret, *role_rules(role, keys).tokens()]


async def apply_users(client: Any, passwords: dict[str, str], keys: Keys | None = None) -> dict[str, str]:
    """Create (or replace) one user per role in ``passwords``; returns role -> username."""
    names = {}
    for role, password in passwords.items():
        username = default_username(role, keys)
        await client.execute_command(*setuser_args(role, username, password, keys))
        names[role] = username
    return names


def _quote(token: str) -> str:
    """valkey-cli splits on spaces and honours double quotes."""
    if token and not re.search(r'[\s"\\\']', token):
        return token
    return '"' + token.replace("\\", "\\\\").replace('"', '\\"') + '"'


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m statesync.acl",
        description="Print ACL SETUSER lines for the fastproxy roles (router, writer, agent, sidecar).",
    )
    parser.add_argument("--namespace", default="fastproxy", help="key prefix (as given to every process)")
    parser.add_argument("--role", action="append", choices=ROLES, help="roles to print (default: all)")
    parser.add_argument("--password", action="append", default=[], metavar="ROLE=SECRET",
                        help="a role's password (default: env FASTPROXY_ACL_<ROLE>_PASSWORD)")  # fmt: skip
    parser.add_argument(
        "--hashed", action="store_true", help="print SHA-256 hashes (#...) instead of >password"
    )
    args = parser.parse_args(argv)
    keys = Keys(args.namespace)
    given = {}
    for item in args.password:
        role, sep, secret = item.partition("=")
        if not sep or role not in ROLES:
            parser.error(f"--password wants ROLE=SECRET with ROLE one of {', '.join(ROLES)}, got {item!r}")
        given[role] = secret
    missing = []
    for role in args.role or ROLES:
        password = given.get(role) or os.environ.get(f"FASTPROXY_ACL_{role.upper()}_PASSWORD", "")
        if not password:
            missing.append(role)
            continue
        line = setuser_args(role, default_username(role, keys), password, keys, hashed=args.hashed)
        print(" ".join(_quote(token) for token in line))
    if missing:
        names = ", ".join(f"FASTPROXY_ACL_{r.upper()}_PASSWORD" for r in missing)
        print(
            f"no password for {', '.join(missing)}: set {names} or pass --password ROLE=SECRET",
            file=sys.stderr,
        )
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
