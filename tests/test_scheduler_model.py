"""The placement and steal scripts hold to their pure-Python model (fd_celery.scheduler.model).

Hypothesis generates node states (roles, load scores, heartbeats, slots, running counts, queue
contents over the four priority lists, shard counts) and a few operations (placements with a blur
band and prefill tokens, steal attempts by one node or another). Each state is written into a real
Redis under a topic of its own, each operation runs the real Lua script through the function the
product calls (``loadtable.place``, ``stealing.steal_one``), and the test checks that the decision
is one the model allows, that Redis holds exactly what the model says that decision leaves, and
that every message is still in exactly one queue. Then the scripts themselves: their headers
match their code, and a server that lost them (SCRIPT FLUSH) gets them again, on a client and in
the output writer's pipeline.
"""

from __future__ import annotations

import collections
import json
import re
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
import redis
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from fd_celery import keys, scripts
from fd_celery.config import SchedulerConfig
from fd_celery.local_cluster import RedisServer
from fd_celery.scheduler import loadtable, model, stealing
from fd_celery.scheduler.model import NodeState
from fd_celery.streams import OutputWriter

# Heartbeat ages sit far from every threshold, so a slow machine cannot move a node across one
# between writing the state and running the script.
EXPIRE_MS = 60_000
FORGET_AFTER_S = 600.0
AGES_MS = {"live": 0.0, "dead": 2.0 * EXPIRE_MS, "long dead": 2000.0 * FORGET_AFTER_S, "never": None}
SCORE_TOLERANCE = 1e-9
SETTINGS = settings(
    max_examples=300,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


@pytest.fixture(scope="module")
def client() -> Iterator[redis.Redis]:
    server = RedisServer().start()
    try:
        yield server.client()
    finally:
        server.stop()


# --------------------------------------------------------------------------- strategies

MESSAGE_KINDS = ("request", "no headers", "not json")


@st.composite
def node_states(draw: st.DrawFn) -> list[dict[str, Any]]:
    count = draw(st.integers(2, 8))
    message = st.tuples(st.integers(0, model.PRIORITY_LISTS - 1), st.sampled_from(MESSAGE_KINDS))
    # Weighted towards what makes decisions interesting: mostly mixed nodes, mostly live, mostly
    # in the table, and many an empty queue (a thief) beside full ones (victims).
    return [
        {
            "role": draw(st.sampled_from(("mixed",) * 6 + ("prefill", "decode"))),
            "score": draw(st.integers(0, 8).map(lambda k: k / 2) | st.none()),
            "beat": draw(st.sampled_from(("live",) * 3 + tuple(AGES_MS)[1:])),
            "slots": draw(st.none() | st.integers(0, 4)),
            "running": draw(st.none() | st.integers(0, 4)),
            "queue": draw(st.just([]) | st.lists(message, min_size=1, max_size=8)),  # (priority, kind)
        }
        for _ in range(count)
    ]


PLACE_OPS = st.tuples(
    st.just("place"),
    st.sampled_from((("mixed",), keys.PREFILL_ROLES, keys.DECODE_ROLES)),
    st.sampled_from((0.0, 0.25, 0.5, 1.0)),  # blur
    st.none() | st.integers(0, 1024),  # prefill prompt tokens
)
# (steal, whether the thief is an idle node where one is, which one, its running count)
STEAL_OPS = st.tuples(st.just("steal"), st.booleans(), st.integers(0, 7), st.integers(0, 4))
OPERATIONS = st.lists(PLACE_OPS | STEAL_OPS, min_size=1, max_size=5)


# --------------------------------------------------------------------------- Redis side


def _message(kind: str, number: int) -> str:
    if kind == "request":
        return json.dumps({"body": "", "headers": {"id": f"req-{number}", "task": "fd.generate"}})
    if kind == "no headers":
        return json.dumps({"body": "", "n": number})
    return f"raw message {number}"


def _nodes(drawn: list[dict[str, Any]]) -> dict[str, NodeState]:
    nodes, number = {}, 0
    for i, spec in enumerate(drawn):
        queue: list[list[str]] = [[] for _ in range(model.PRIORITY_LISTS)]
        for priority, kind in spec["queue"]:
            queue[priority].insert(0, _message(kind, number))  # LPUSH, as kombu publishes
            number += 1
        name = f"node{i}@host"
        nodes[name] = NodeState(
            name,
            spec["role"],
            spec["score"],
            AGES_MS[spec["beat"]],
            spec["slots"],
            spec["running"],
            tuple(tuple(q) for q in queue),
        )
    return nodes


def _config(shards: int, min_score: float) -> SchedulerConfig:
    return SchedulerConfig(
        scheduler_name="global",
        scheduler_topic=f"model-{uuid.uuid4().hex[:16]}",
        scheduler_load_shards_num=shards,
        scheduler_min_load_score=min_score,
        scheduler_expire_period=EXPIRE_MS,
    )


def _shard(config: SchedulerConfig, node: NodeState) -> str:
    return keys.load_shard(
        config.scheduler_topic, node.role, keys.shard_of(node.name, config.scheduler_load_shards_num)
    )


def _queue_lists(config: SchedulerConfig, node: NodeState) -> list[str]:
    return loadtable.queue_lists(keys.node_queue(config.scheduler_topic, node.role, node.name))


def _write(client: redis.Redis, config: SchedulerConfig, nodes: dict[str, NodeState]) -> None:
    topic, now_ms = config.scheduler_topic, time.time() * 1000
    pipe = client.pipeline(transaction=False)
    for node in nodes.values():
        if node.beat_age_ms is not None:
            pipe.zadd(keys.nodes_zset(topic), {node.name: now_ms - node.beat_age_ms})
        if node.score is not None:
            pipe.zadd(_shard(config, node), {node.name: node.score})
        facts = {"role": json.dumps(node.role)}
        facts.update(
            {k: str(v) for k, v in (("slots", node.slots), ("running", node.running)) if v is not None}
        )
        pipe.hset(keys.node_hash(topic, node.name), mapping=facts)
        for key, messages in zip(_queue_lists(config, node), node.queue):
            if messages:
                pipe.rpush(key, *messages)
    pipe.execute()


def _read(client: redis.Redis, config: SchedulerConfig, nodes: dict[str, NodeState]) -> dict[str, NodeState]:
    """The node states as Redis holds them now (heartbeats are never written by the scripts)."""
    topic = config.scheduler_topic
    table: dict[tuple[str, str], float] = {}
    for role in keys.ROLES:
        for shard in loadtable.shard_keys(config, role):
            for name, score in client.zrange(shard, 0, -1, withscores=True):
                node = nodes[name.decode()]
                assert (node.role, _shard(config, node)) == (role, shard), f"{node.name} is in {shard}"
                table[(role, node.name)] = score
    listed = {
        name.decode(): score for name, score in client.zrange(keys.nodes_zset(topic), 0, -1, withscores=True)
    }
    assert set(listed) == {n.name for n in nodes.values() if n.beat_age_ms is not None}
    out = {}
    for node in nodes.values():
        slots, running = client.hmget(keys.node_hash(topic, node.name), "slots", "running")
        out[node.name] = NodeState(
            node.name,
            node.role,
            table.get((node.role, node.name)),
            node.beat_age_ms,
            None if slots is None else int(slots),
            None if running is None else int(running),
            tuple(tuple(m.decode() for m in client.lrange(key, 0, -1)) for key in _queue_lists(config, node)),
            frozenset(e.decode() for e in client.zrange(keys.prefill_ledger(topic, node.name), 0, -1)),
        )
    lists = {k.decode() for k in client.keys(f"fd.{topic}.*")}
    assert lists <= {key for n in nodes.values() for key in _queue_lists(config, n)}, (
        "a message left its queues"
    )
    return out


def _assert_same(actual: dict[str, NodeState], expected: dict[str, NodeState], what: str) -> None:
    for name, want in expected.items():
        got = actual[name]
        if want.score is None or got.score is None:
            assert got.score == want.score, f"{what}: {name} in the load table: {got.score} != {want.score}"
        else:
            assert abs(got.score - want.score) < SCORE_TOLERANCE, (
                f"{what}: {name} score {got.score} != {want.score}"
            )
        assert (got.queue, got.slots, got.running, got.ledger) == (
            want.queue,
            want.slots,
            want.running,
            want.ledger,
        ), f"{what}: {name}"


def _messages(nodes: dict[str, NodeState]) -> collections.Counter[str]:
    return collections.Counter(m for n in nodes.values() for q in n.queue for m in q)


# --------------------------------------------------------------------------- operations


def _place(
    client: redis.Redis,
    config: SchedulerConfig,
    nodes: dict[str, NodeState],
    roles: tuple[str, ...],
    blur: float,
    tokens: int | None,
) -> dict[str, NodeState]:
    request_id = uuid.uuid4().hex
    charge = 1.0 if tokens is None else 1.0 + tokens / loadtable.PREFILL_TOKEN_UNIT
    entry = None if tokens is None else loadtable.ledger_entry(request_id, tokens)
    allowed = model.place(nodes, roles, EXPIRE_MS, blur, charge, entry)
    placed = loadtable.place(client, config, roles, blur, None if tokens is None else (request_id, tokens))
    what = f"place(roles={roles}, blur={blur}, tokens={tokens})"
    event(f"place: {min(len(allowed), 3)} allowed")
    if placed is None:
        assert not allowed, f"{what} found no node; the model allows {sorted(allowed)}"
        return nodes
    node, role = placed
    assert node in allowed, f"{what} picked {node}; the model allows {sorted(allowed)}"
    assert role == nodes[node].role
    after = _read(client, config, nodes)
    _assert_same(after, allowed[node], what)
    return after


def _thief(nodes: dict[str, NodeState], idle: bool, index: int) -> str:
    names = [n.name for n in nodes.values() if not n.waiting] if idle else []
    names = names or list(nodes)
    return names[index % len(names)]


def _steal(
    client: redis.Redis,
    config: SchedulerConfig,
    nodes: dict[str, NodeState],
    idle: bool,
    index: int,
    running: int,
    counters: collections.Counter[str],
) -> dict[str, NodeState]:
    thief = _thief(nodes, idle, index)
    role = nodes[thief].role
    decision = model.steal(
        nodes,
        role,
        thief,
        expire_ms=EXPIRE_MS,
        forget_after_ms=FORGET_AFTER_S * 1000,
        min_score=config.scheduler_min_load_score,
        top_candidates=stealing.TOP_CANDIDATES,
        thief_running=running,
    )
    idle_since_ms = int(time.time() * 1000) - 7
    steal = stealing.steal_one(client, config, role, thief, idle_since_ms, FORGET_AFTER_S, running)
    after = _read(client, config, nodes)
    what = f"steal by {thief}"
    event(f"steal: {min(len(decision.outcomes), 3)} allowed")
    if decision.unchanged != nodes:
        event("steal: a dead node forgotten")
    if steal is None:
        assert not decision.outcomes, f"{what} took nothing; the model allows {sorted(decision.outcomes)}"
        _assert_same(after, decision.unchanged, what)
        return after
    outcome = decision.outcomes.get(steal.victim)
    assert outcome is not None, f"{what} robbed {steal.victim}; the model allows {sorted(decision.outcomes)}"
    assert (steal.request_id, steal.orphan) == (outcome.request_id, outcome.orphan), what
    assert abs(steal.victim_score - outcome.victim_score) < 1e-6, what
    _assert_same(after, outcome.nodes, what)
    if outcome.request_id:
        assert stealing.stolen_from(client, config, outcome.request_id) == (
            steal.victim,
            idle_since_ms / 1000,
        )
    counters.update({f"{thief}:made": 1, f"{steal.victim}:suffered": 1})
    return after


# --------------------------------------------------------------------------- the properties


@SETTINGS
@given(
    drawn=node_states(),
    shards=st.integers(1, 3),
    min_score=st.sampled_from((0.0, 0.5, 1.0, 2.0, 3.0)),
    operations=OPERATIONS,
)
def test_placements_and_steals_are_ones_the_model_allows_and_lose_nothing(
    client, drawn, shards, min_score, operations
):
    config = _config(shards, min_score)
    nodes = _nodes(drawn)
    _write(client, config, nodes)
    start = _read(client, config, nodes)
    _assert_same(start, nodes, "as written")
    counters: collections.Counter[str] = collections.Counter()
    for operation in operations:
        if operation[0] == "place":
            nodes = _place(client, config, nodes, *operation[1:])
        else:
            nodes = _steal(client, config, nodes, *operation[1:], counters=counters)
        assert _messages(nodes) == _messages(start), f"{operation}: a message was lost or duplicated"
    raw = client.hgetall(keys.steals_hash(config.scheduler_topic))
    assert {k.decode(): int(v) for k, v in raw.items()} == dict(counters)
    stolen = {k.decode() for k in client.keys(keys.stolen_marker(config.scheduler_topic, "*"))}
    for key in stolen:
        assert 0 < client.ttl(key) <= config.ttl_s


def _copies(
    client: redis.Redis, nodes: dict[str, NodeState], min_score: float, tries: int
) -> list[SchedulerConfig]:
    configs = [_config(2, min_score) for _ in range(tries)]
    for config in configs:
        _write(client, config, nodes)
    return configs


TIGHT_TRIES = 48  # a pick among up to 3 equals misses one with odds 3 * (2/3)**48, about 1e-8


@settings(
    max_examples=40,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(drawn=node_states(), blur=st.sampled_from((0.0, 0.5, 1.0)), thief_index=st.integers(0, 7))
def test_every_pick_the_model_allows_is_made(client, drawn, blur, thief_index):
    """The other direction: where the model allows up to three picks, the scripts make each of
    them (a model that allowed anything would pass the test above)."""
    nodes = _nodes(drawn)
    allowed = model.place(nodes, ("mixed",), EXPIRE_MS, blur)
    event(f"place: {min(len(allowed), 4)} allowed")
    if 1 < len(allowed) <= 3:
        picked = {
            loadtable.place(client, c, ("mixed",), blur) for c in _copies(client, nodes, 1.0, TIGHT_TRIES)
        }
        assert picked == {(name, "mixed") for name in allowed}
    thief = _thief(nodes, True, thief_index)
    decision = model.steal(
        nodes,
        nodes[thief].role,
        thief,
        expire_ms=EXPIRE_MS,
        forget_after_ms=FORGET_AFTER_S * 1000,
        min_score=1.0,
        top_candidates=stealing.TOP_CANDIDATES,
        thief_running=0,
    )
    event(f"steal: {min(len(decision.outcomes), 4)} allowed")
    if 1 < len(decision.outcomes) <= stealing.TOP_CANDIDATES:
        steals = [
            stealing.steal_one(client, c, nodes[thief].role, thief, 0, FORGET_AFTER_S, 0)
            for c in _copies(client, nodes, 1.0, TIGHT_TRIES)
        ]
        assert {s.victim for s in steals if s is not None} == set(decision.outcomes)


def test_thieves_spread_over_the_top_candidates_and_orphans_come_first(client):
    """Four busy live nodes and a dead one: the dead one is always among the candidates, with
    the two most loaded live ones; the rest never are."""
    states = [NodeState("thief", "mixed", 0.0, 0.0, 1, 0)]
    for name, score, age_ms in (
        ("dead", 0.5, AGES_MS["dead"]),
        ("top", 4.0, 0.0),
        ("second", 3.5, 0.0),
        ("third", 3.0, 0.0),
        ("fourth", 2.5, 0.0),
    ):
        states.append(NodeState(name, "mixed", score, age_ms, 1, 1, ((f"{name}-a", f"{name}-b"), (), (), ())))
    nodes = {n.name: n for n in states}
    decision = model.steal(
        nodes,
        "mixed",
        "thief",
        expire_ms=EXPIRE_MS,
        forget_after_ms=FORGET_AFTER_S * 1000,
        min_score=1.0,
        top_candidates=stealing.TOP_CANDIDATES,
        thief_running=0,
    )
    assert set(decision.outcomes) == {"dead", "top", "second"}
    assert decision.outcomes["dead"].orphan and decision.outcomes["dead"].message == "dead-b"
    steals = [
        stealing.steal_one(client, c, "mixed", "thief", 0, FORGET_AFTER_S, 0)
        for c in _copies(client, nodes, 1.0, TIGHT_TRIES)
    ]
    assert {s.victim for s in steals if s is not None} == {"dead", "top", "second"}


@pytest.mark.parametrize("score, stolen", [(2.0, True), (1.75, False)])
def test_a_live_node_is_stolen_from_at_the_minimum_load_score_not_below(client, score, stolen):
    nodes = {
        "thief": NodeState("thief", "mixed", 0.0, 0.0, 1, 0),
        "busy": NodeState("busy", "mixed", score, 0.0, 1, 1, (("busy-a", "busy-b"), (), (), ())),
    }
    config = _config(1, 2.0)
    decision = model.steal(
        nodes,
        "mixed",
        "thief",
        expire_ms=EXPIRE_MS,
        forget_after_ms=FORGET_AFTER_S * 1000,
        min_score=2.0,
        top_candidates=stealing.TOP_CANDIDATES,
        thief_running=0,
    )
    assert set(decision.outcomes) == ({"busy"} if stolen else set())
    _write(client, config, nodes)
    steal = stealing.steal_one(client, config, "mixed", "thief", 0, FORGET_AFTER_S, 0)
    assert (steal is not None and steal.victim) == ("busy" if stolen else False)
    _assert_same(_read(client, config, nodes), decision.outcomes["busy"].nodes if stolen else nodes, "steal")


# --------------------------------------------------------------------------- the scripts

_BINDING = re.compile(r"^local (\w+) = .*\b(KEYS|ARGV)\[(\d+)\]")
_INDEXED = re.compile(r"\b(KEYS|ARGV)\[(\d+)\]")


@pytest.mark.parametrize("script", scripts.ALL, ids=lambda s: s.name)
def test_script_headers_draw_every_key_and_argument_the_code_binds(script):
    slots = script.slots
    assert slots, f"{script.name}.lua draws no KEYS or ARGV"
    for table in ("KEYS", "ARGV"):
        indices = [s.index for s in slots if s.table == table]
        assert indices == list(range(1, len(indices) + 1)), f"{script.name}.lua: {table} drawn out of order"
    code = [line for line in script.source.splitlines() if not line.startswith("--")]
    bound = {}
    for line in code:
        for table, index in _INDEXED.findall(line):
            match = _BINDING.match(line)
            assert match and (match[2], match[3]) == (table, index), (
                f"{script.name}.lua uses {table}[{index}] outside its binding: {line.strip()}"
            )
            bound[(table, int(index))] = match[1]
    for slot in slots:
        if slot.variadic:
            pattern = (
                rf"^local {slot.name} = \{{unpack\({slot.table}, {slot.index}\)\}}$|"
                rf"^for \w+ = {slot.index}, #{slot.table}\b.*\b{slot.name}\b"
            )
            assert any(re.search(pattern, line) for line in code), (
                f"{script.name}.lua: {slot.name} is not bound"
            )
        else:
            assert bound.get((slot.table, slot.index)) == slot.name, (
                f"{script.name}.lua draws {slot.table}[{slot.index}] as {slot.name}, binds it as "
                f"{bound.get((slot.table, slot.index))}"
            )
    assert len(bound) == sum(not s.variadic for s in slots), f"{script.name}.lua binds what it does not draw"


def test_a_call_with_the_wrong_number_of_keys_names_the_script_and_its_keys(client):
    with pytest.raises(ValueError, match=r"admit\.lua takes 1 KEYS \(pending\); 2 given"):
        scripts.ADMIT(client, keys=["a", "b"], args=[0, 1, "t", 0])
    with pytest.raises(ValueError, match=r"steal\.lua takes 13 to any ARGV"):
        scripts.STEAL(client, keys=["n", "s", "t"], args=["thief"])


def test_scripts_come_back_after_the_server_forgets_them(client):
    config = _config(1, 1.0)
    nodes = {"solo": NodeState("solo", "mixed", 0.0, 0.0, 2, 0)}
    _write(client, config, nodes)
    client.script_flush()
    assert loadtable.place(client, config, ("mixed",)) == ("solo", "mixed")
    assert client.script_exists(scripts.PLACE.sha) == [True]
    # The output writer sends appends by EVALSHA on a pipeline: a flush between two batches
    # costs one reload, and every chunk still arrives once.
    writer = OutputWriter(client, parallel=1, batch_size=16)  # not writer_for: that is the process's own
    stream = keys.output_stream(config.scheduler_topic, "flushed")
    writer.write(stream, [(0, {"t": 0})], ttl_s=60)
    assert writer.finish(stream, [(1, {"t": 1})], ttl_s=60) == {"t": 1}
    client.script_flush()
    other = keys.output_stream(config.scheduler_topic, "flushed-again")
    writer.write(other, [(0, {"t": 0})], ttl_s=60)
    writer.write(other, [(1, {"t": 1})], ttl_s=60)
    assert writer.finish(other, [(1, {"t": 1}), (2, {"t": 2})], ttl_s=60) == {"t": 2}
    assert [int(eid.split(b"-")[1]) for eid, _ in client.xrange(other)] == [1, 2, 3]
    assert client.xrange(other)[-1][1][b"end"] == b"1"
    client.script_flush()  # and a request short enough to be ended by its own thread, on the client
    short = keys.output_stream(config.scheduler_topic, "short")
    assert writer.finish(short, [(0, {"t": 0})], ttl_s=60) == {"t": 0}
    assert writer.finish(short, [(0, {"t": "again"})], ttl_s=60) == {"t": 0}  # an earlier run's end
