"""What placement and stealing must decide, in plain Python: no Redis, no I/O.

Placement (``fd_celery/scripts/place.lua``, run by :func:`fd_celery.scheduler.loadtable.place`)
and stealing (``fd_celery/scripts/steal.lua``, run by
:func:`fd_celery.scheduler.stealing.steal_one`) decide atomically inside Redis. This module is
their specification: given the node states the scripts read, it says what they may decide and
what each decision leaves behind. Where a script picks at random among equals (the blur band of a
placement, the top candidates of a steal) the model answers with every allowed pick.
``tests/test_scheduler_model.py`` holds the scripts to it over generated states.

The rules, as the scripts apply them:

* a node is live while its last heartbeat is at most ``expire_ms`` old;
* placement: among live nodes of the roles asked for that are in the load table, any node whose
  score is within ``blur`` of the lowest; it is charged ``charge / slots`` (and its prefill
  ledger gets the entry, if one is given);
* stealing: nothing when the thief's own queue holds a message. Victims are the other nodes of
  the role's table that are dead, or live at ``min_score`` or above, and wait for more requests
  than they have free slots (``slots - running``; a dead node has none). Dead ones come first,
  then by score, highest first; the thief takes from one of the first ``top_candidates``. It
  moves the message kombu would consume next (the first non-empty priority list, its right end)
  to the same list of its own queue, and 1/slots of load from victim to thief. Dead nodes with
  nothing left to steal that have been silent for ``forget_after_ms`` leave the table.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace

__all__ = [
    "NodeState",
    "Nodes",
    "StealOutcome",
    "StealDecision",
    "place",
    "steal",
    "PRIORITY_LISTS",
    "BAND_EPSILON",
]

#: Lists per queue, one per kombu priority step, in consume order.
PRIORITY_LISTS = 4
#: The placement script's tolerance at the edge of the blur band.
BAND_EPSILON = 1e-9


@dataclass(frozen=True)
class NodeState:
    """One node as the scripts see it."""

    name: str
    role: str
    score: float | None = None  # its load score in its role's table; None: not in the table
    beat_age_ms: float | None = None  # since its last heartbeat; None: no heartbeat listed
    slots: int | None = None  # its slots fact (None: missing)
    running: int | None = None  # its running fact (None: missing)
    # Its own queue's lists in kombu's consume order, each as stored (kombu takes the right end).
    queue: tuple[tuple[str, ...], ...] = ((),) * PRIORITY_LISTS
    ledger: frozenset[str] = field(default_factory=frozenset)  # its prefill ledger entries

    def live(self, expire_ms: float) -> bool:
        return self.beat_age_ms is not None and self.beat_age_ms <= expire_ms

    @property
    def waiting(self) -> int:
        return sum(len(messages) for messages in self.queue)

    @property
    def charge_slots(self) -> int:
        """The slots a charge or a steal divides by: a missing or zero fact counts as 1."""
        return max(1, self.slots if self.slots is not None else 1)

    @property
    def free_slots(self) -> int:
        """Requests a live node can start itself (a missing slots fact counts as 1)."""
        return max(0, (self.slots if self.slots is not None else 1) - (self.running or 0))


Nodes = Mapping[str, NodeState]


def place(
    nodes: Nodes,
    roles: Sequence[str],
    expire_ms: float,
    blur: float = 0.0,
    charge: float = 1.0,
    ledger_entry: str | None = None,
) -> dict[str, dict[str, NodeState]]:
    """Every node a placement may pick, each with the states it leaves; empty when no node of
    ``roles`` is live and in the table."""
    live = [n for n in nodes.values() if n.role in roles and n.score is not None and n.live(expire_ms)]
    if not live:
        return {}
    best = min(n.score for n in live if n.score is not None)
    allowed: dict[str, dict[str, NodeState]] = {}
    for node in live:
        assert node.score is not None
        if node.score <= best + blur + BAND_EPSILON:
            ledger = node.ledger | {ledger_entry} if ledger_entry is not None else node.ledger
            charged = replace(node, score=node.score + charge / node.charge_slots, ledger=ledger)
            allowed[node.name] = {**nodes, node.name: charged}
    return allowed


@dataclass(frozen=True)
class StealOutcome:
    """One steal the script may make, and what it leaves."""

    victim: str
    message: str  # the message moved
    priority: int  # the index of the list it came from and went to
    request_id: str  # its ``headers.id`` ('' when it has none): the stolen marker's key
    orphan: bool  # the victim was dead
    victim_score: float  # before the steal
    nodes: dict[str, NodeState]


@dataclass(frozen=True)
class StealDecision:
    """Every steal allowed (by victim; empty: none), and the states when none is made."""

    outcomes: dict[str, StealOutcome]
    unchanged: dict[str, NodeState]  # dead nodes forgotten, nothing else touched


def steal(
    nodes: Nodes,
    role: str,
    thief: str,
    *,
    expire_ms: float,
    forget_after_ms: float,
    min_score: float,
    top_candidates: int,
    thief_running: int,
) -> StealDecision:
    """What one steal attempt of ``thief`` (a node of ``role``, listed in ``nodes``) may do."""
    if nodes[thief].waiting:
        return StealDecision({}, dict(nodes))
    scanned = [n for n in nodes.values() if n.role == role and n.score is not None and n.name != thief]
    eligible = [n for n in scanned if not n.live(expire_ms) or (n.score or 0.0) >= min_score]
    after = dict(nodes)
    for node in eligible:
        if _forgotten(node, expire_ms, forget_after_ms):
            after[node.name] = replace(node, score=None)
    victims = [n for n in eligible if n.waiting > (0 if not n.live(expire_ms) else n.free_slots)]
    if not victims:
        return StealDecision({}, after)
    return StealDecision(
        {
            v.name: _steal_from(after, v, thief, thief_running, expire_ms)
            for v in _top(victims, top_candidates, expire_ms)
        },
        after,
    )


def _forgotten(node: NodeState, expire_ms: float, forget_after_ms: float) -> bool:
    return (
        not node.live(expire_ms)
        and not node.waiting
        and (node.beat_age_ms is None or node.beat_age_ms > forget_after_ms)
    )


def _top(victims: list[NodeState], top_candidates: int, expire_ms: float) -> list[NodeState]:
    """The victims that can be among the first ``top_candidates`` in the script's order (dead
    first, then highest score): its sort breaks ties in no set order, so every victim ranked
    level with the last of them may be."""

    def rank(node: NodeState) -> tuple[bool, float]:
        return node.live(expire_ms), -(node.score or 0.0)

    ordered = sorted(victims, key=rank)
    last = rank(ordered[min(top_candidates, len(ordered)) - 1])
    return [v for v in victims if rank(v) <= last]


def _steal_from(
    nodes: Nodes, victim: NodeState, thief: str, thief_running: int, expire_ms: float
) -> StealOutcome:
    priority = next(i for i, messages in enumerate(victim.queue) if messages)
    message = victim.queue[priority][-1]
    victim_queue = list(victim.queue)
    victim_queue[priority] = victim.queue[priority][:-1]
    robbed = nodes[thief]
    thief_queue = list(robbed.queue)
    thief_queue[priority] = (*robbed.queue[priority], message)
    assert victim.score is not None
    after = {
        **nodes,
        victim.name: replace(victim, queue=tuple(victim_queue), score=victim.score - 1 / victim.charge_slots),
        thief: replace(
            robbed,
            queue=tuple(thief_queue),
            running=thief_running,
            score=(robbed.score or 0.0) + 1 / robbed.charge_slots,
        ),
    }
    return StealOutcome(
        victim.name, message, priority, _request_id(message), not victim.live(expire_ms), victim.score, after
    )


def _request_id(message: str) -> str:
    """A kombu message's ``headers.id``, as the script reads it: '' for anything else."""
    try:
        decoded = json.loads(message)
    except ValueError:
        return ""
    headers = decoded.get("headers") if isinstance(decoded, dict) else None
    request_id = headers.get("id") if isinstance(headers, dict) else None
    return request_id if isinstance(request_id, str) else ""
