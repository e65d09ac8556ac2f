"""The micro-batcher: a bounded queue in front of a batch function run on one worker thread."""

from __future__ import annotations

import asyncio
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable

from fgvr.serve.settings import UploadError

log = logging.getLogger("fgvr.serve")


@dataclass
class _Item:
    payload: Any
    future: asyncio.Future
    queued: float = field(default_factory=time.perf_counter)


class MicroBatcher:
    """A bounded queue in front of a batch function run on one worker thread.

    `fn(payloads) -> outputs` (same length, same order) sees up to `max_batch` items. After the first item
    the worker takes whatever else is queued and, while `pending()` says more items are on their way (e.g.
    still being decoded), waits up to `max_wait_s` for them; a lone request is never held back. One batch
    runs at a time, so the model behind `fn` is never called concurrently from here.
    """

    def __init__(self, name: str, fn: Callable[[list[Any]], list[Any]], max_batch: int, max_wait_s: float,
                 max_queue: int, pending: Callable[[], int] = lambda: 0,
                 on_batch: Callable[[int], None] = lambda n: None) -> None:
        self.name, self.fn, self.max_batch, self.max_wait_s = name, fn, max(1, max_batch), max(0.0, max_wait_s)
        self.max_queue, self.pending, self.on_batch = max_queue, pending, on_batch
        self.queue: asyncio.Queue[_Item] | None = None
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"fgvr-{name}")
        self.task: asyncio.Task | None = None

    def start(self) -> None:
        self.queue = asyncio.Queue()
        self.task = asyncio.get_running_loop().create_task(self._run(), name=f"fgvr-{self.name}")

    async def stop(self) -> None:
        if self.task is not None:
            self.task.cancel()
            try:
                await self.task
            except asyncio.CancelledError:
                pass
        self.executor.shutdown(wait=True)

    def depth(self) -> int:
        return self.queue.qsize() if self.queue is not None else 0

    async def submit(self, payload: Any) -> tuple[Any, float]:
        """The item's output and the seconds it waited in the queue; 503 when the queue is full."""
        assert self.queue is not None, "MicroBatcher.start() was not called"
        if self.queue.qsize() >= self.max_queue:
            raise UploadError(503, f"the {self.name} queue is full ({self.max_queue} images waiting); retry shortly")
        item = _Item(payload, asyncio.get_running_loop().create_future())
        await self.queue.put(item)
        return await item.future

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        assert self.queue is not None
        while True:
            batch = [await self.queue.get()]
            deadline = loop.time() + self.max_wait_s
            while len(batch) < self.max_batch:
                if not self.queue.empty():
                    batch.append(self.queue.get_nowait())
                    continue
                left = deadline - loop.time()
                if left <= 0 or self.pending() <= 0:
                    break
                try:
                    batch.append(await asyncio.wait_for(self.queue.get(), left))
                except asyncio.TimeoutError:
                    break
            batch = [it for it in batch if not it.future.done()]  # a client that went away
            if not batch:
                continue
            started = time.perf_counter()
            try:
                outputs = await loop.run_in_executor(self.executor, self.fn, [it.payload for it in batch])
                if len(outputs) != len(batch):
                    raise RuntimeError(f"{self.name} returned {len(outputs)} outputs for {len(batch)} inputs")
            except Exception as e:  # noqa: BLE001 - the worker must outlive a failing batch
                log.exception("%s batch of %d failed", self.name, len(batch))
                for it in batch:
                    if not it.future.done():
                        it.future.set_exception(UploadError(500, f"{self.name} failed: {type(e).__name__}: {e}"))
                continue
            self.on_batch(len(batch))
            for it, out in zip(batch, outputs):
                if not it.future.done():
                    it.future.set_result((out, started - it.queued))
