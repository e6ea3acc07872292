"""Every Redis Lua script fd_celery runs, one ``.lua`` file each beside this module, and the one
way to run them.

=============  ==========================================  =====================================
script         what it does atomically                     called from
=============  ==========================================  =====================================
publish.lua    a node's heartbeat and load score            scheduler.loadtable.publish
place.lua      pick the least loaded live node, charge it   scheduler.loadtable.place
steal.lua      move one waiting request to an idle thief    scheduler.stealing.steal_one
restore.lua    requeue a message a dead node held           scheduler.recovery
admit.lua      a place in the local queue, if one is free   scheduler.admission.admit
append.lua     a request's output chunks and end, once      streams.writer.OutputWriter
cancel.lua     end a request's stream as cancelled, once     streams.cancel.cancel_stream
=============  ==========================================  =====================================

Each file begins with a header that draws its keys and arguments (``-- KEYS[1]  name  type  what``,
``-- ARGV[2..]  name  what`` for "this one and all after it"), and binds each to a local of the
same name on its first lines; :class:`Script` reads that header, so a call with too few or too
many keys or arguments fails here, naming them, instead of inside Redis.

A script runs by EVALSHA. Its sha is the SHA-1 of its source, which is what Redis computes too,
so it is known without asking; a server that answers NOSCRIPT (the first call after it started,
or after SCRIPT FLUSH) is sent the source once with SCRIPT LOAD and the call is made again. In a
pipeline, :meth:`Script.queue` adds the EVALSHA; whoever executes the pipeline checks its replies
with :meth:`Script.missing`, calls :meth:`Script.load` and sends those calls again.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import resources
from typing import Any

import redis
from redis.exceptions import NoScriptError

__all__ = ["Script", "Slot", "PUBLISH", "PLACE", "STEAL", "RESTORE", "ADMIT", "APPEND", "CANCEL", "ALL"]

_SLOT_LINE = re.compile(r"^-- (KEYS|ARGV)\[(\d+)(\.\.)?\]\s+(\w+)(.*)$")


@dataclass(frozen=True)
class Slot:
    """One entry of KEYS or ARGV as a script's header draws it."""

    table: str  # "KEYS" or "ARGV"
    index: int  # 1-based, as Lua counts
    name: str  # the local the script binds it to
    variadic: bool  # this index and every one after it
    optional: bool  # the header says "(optional)": it may be left out (the last ones only)


def parse_header(source: str) -> list[Slot]:
    """The KEYS and ARGV entries drawn in a script's leading comment, in order."""
    slots = []
    for line in source.splitlines():
        if not line.startswith("--"):
            break
        match = _SLOT_LINE.match(line)
        if match:
            table, index, variadic, name, rest = match.groups()
            slots.append(Slot(table, int(index), name, bool(variadic), "(optional)" in rest))
    return slots


class Script:
    """One Lua script of this package, run by EVALSHA with a reload on NOSCRIPT."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.source = resources.files(__name__).joinpath(f"{name}.lua").read_text(encoding="utf-8")
        self.sha = hashlib.sha1(self.source.encode("utf-8")).hexdigest()
        self.slots = parse_header(self.source)

    def __repr__(self) -> str:
        return f"Script({self.name!r})"

    def __call__(self, client: redis.Redis, keys: Sequence[Any], args: Sequence[Any]) -> Any:
        """Run it on ``client``; loads it first if this server does not know it yet."""
        self._check(keys, args)
        try:
            return client.evalsha(self.sha, len(keys), *keys, *args)
        except NoScriptError:
            self.load(client)
            return client.evalsha(self.sha, len(keys), *keys, *args)

    def queue(self, pipe: redis.client.Pipeline, keys: Sequence[Any], args: Sequence[Any]) -> None:
        """Add a call to ``pipe``; its reply is a ``NoScriptError`` where :meth:`missing` says so."""
        self._check(keys, args)
        pipe.evalsha(self.sha, len(keys), *keys, *args)

    @staticmethod
    def missing(reply: Any) -> bool:
        """Whether a pipeline reply says the server did not know the script (load it, resend)."""
        return isinstance(reply, NoScriptError)

    def load(self, client: redis.Redis) -> None:
        sha = client.script_load(self.source)
        sha = sha.decode() if isinstance(sha, bytes) else sha
        if sha != self.sha:  # the server hashes something else than we sent: no EVALSHA can work
            raise redis.exceptions.ResponseError(
                f"script {self.name}: the server loaded it as {sha}, not {self.sha}"
            )

    def _check(self, keys: Sequence[Any], args: Sequence[Any]) -> None:
        for table, given in (("KEYS", len(keys)), ("ARGV", len(args))):
            drawn = [slot for slot in self.slots if slot.table == table]
            least = max((s.index - (1 if s.variadic else 0) for s in drawn if not s.optional), default=0)
            most = None if any(s.variadic for s in drawn) else len(drawn)
            if given < least or (most is not None and given > most):
                names = ", ".join(s.name + ("..." if s.variadic else "") for s in drawn)
                wanted = f"{least}" if most == least else f"{least} to {'any' if most is None else most}"
                raise ValueError(f"script {self.name}.lua takes {wanted} {table} ({names}); {given} given")


PUBLISH = Script("publish")
PLACE = Script("place")
STEAL = Script("steal")
RESTORE = Script("restore")
ADMIT = Script("admit")
APPEND = Script("append")
CANCEL = Script("cancel")

#: Every script, for checks that go over all of them.
ALL = (PUBLISH, PLACE, STEAL, RESTORE, ADMIT, APPEND, CANCEL)
