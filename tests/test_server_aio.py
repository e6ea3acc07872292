"""``AsyncClient``, the asyncio twin of ``Client``: the same requests, the same tokens, and its
followers are asyncio tasks, not threads."""

from __future__ import annotations

import asyncio
import threading

import pytest

import fd_celery
from fd_celery.client.aio import AsyncClient
from fd_celery.errors import ClientClosed, InvalidRequest, RequestExpired
from tests.conftest import make_app, run_topic


def test_async_client_gives_client_submit_tokens(app, node):
    prompt = "The quick brown fox"
    with fd_celery.Client(app) as client:
        direct = client.submit(prompt, max_tokens=10, temperature=0.9, seed=11).result(timeout=60)

    async def run() -> tuple[list[fd_celery.OutputChunk], fd_celery.GenerationResult]:
        async with AsyncClient(app) as client:
            handle = await client.submit(prompt, max_tokens=10, temperature=0.9, seed=11)
            chunks = [chunk async for chunk in handle.stream(timeout=60)]
            return chunks, await handle.result()

    chunks, result = asyncio.run(run())
    assert result.token_ids == direct.token_ids and result.text == direct.text
    assert "".join(c.text for c in chunks) == direct.text
    assert [t for c in chunks for t in c.token_ids] == list(direct.token_ids)


def test_many_requests_are_followed_by_a_few_tasks_and_no_new_thread(app, node):
    async def run() -> tuple[list[fd_celery.GenerationResult], int]:
        async with AsyncClient(app) as client:
            handles = [await client.submit(f"n{i}", max_tokens=2, seed=i) for i in range(40)]
            threads = threading.active_count()
            results = await asyncio.gather(*(h.result(timeout=120) for h in handles))
            return results, threading.active_count() - threads

    results, new_threads = asyncio.run(run())
    assert len({r.request_id for r in results}) == 40 and all(r.token_ids for r in results)
    assert new_threads <= 0


def test_errors_are_the_clients(redis_server):
    async def run() -> None:
        app = make_app(redis_server, scheduler_topic=run_topic("aio-none"), scheduler_ttl=1)
        client = AsyncClient(app)
        with pytest.raises(InvalidRequest, match="max_tokens"):
            await client.submit("x", max_tokens=0)
        handle = await client.submit("nobody serves this topic", max_tokens=2)
        with pytest.raises(RequestExpired, match="TTL"):
            await handle.result(timeout=30)
        await client.aclose()
        await client.aclose()
        with pytest.raises(ClientClosed):
            await client.submit("after", max_tokens=2)

    asyncio.run(run())
