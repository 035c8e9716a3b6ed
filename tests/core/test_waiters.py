"""The fair FIFO core both async pools share (``_waiters.Slots``) alone: no database.

Real futures on a real event loop, no mocks. :class:`Pool` below is the smallest pool
that uses :class:`Slots` the way ``_fairpool`` and ``_ormpool`` do: take a slot or
queue up, hand a returned connection to the oldest waiter, pass on what a cancelled
waiter was handed.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from typing import Any

import pytest

from django_asyncpool.core.waiters import TIMED_OUT, Budget, Slots
from django_asyncpool.errors import PoolClosed, PoolTimeout

LONG = 10.0  # a timeout no test reaches, seconds


def run(main: Callable[[], Coroutine[Any, Any, Any]]) -> Any:
    return asyncio.run(main())


async def settle() -> None:
    """Let every ready task run until it blocks again."""
    for _ in range(5):
        await asyncio.sleep(0)


class Pool:
    """Connections are strings; ``acquire`` returns one (``"new"`` for a slot it opened).

    Over a shared :class:`Budget`, each Pool is one kind: it closes (``closed``) what
    it cannot hand to the oldest caller, and evicts its longest idle one on demand.
    """

    def __init__(self, cap: int | Budget) -> None:
        self.slots = Slots(cap, self.evict)
        self.idle: list[Any] = []
        self.closed: list[Any] = []

    def evict(self) -> bool:
        if not self.idle:
            return False
        self.closed.append(self.idle.pop(0))
        self.slots.release()
        return True

    async def acquire(self, timeout: float = LONG) -> Any:
        if self.idle:
            return self.idle.pop()
        if self.slots.take():
            return "new"
        waiter, timer = self.slots.join(timeout)
        try:
            got = await waiter
        except BaseException:
            self.slots.abandon(waiter, self.pass_on)
            raise
        finally:
            timer.cancel()
        if got is TIMED_OUT:
            raise PoolTimeout("timed out")
        return "new" if got is None else got

    def give_back(self, conn: Any) -> None:
        if self.slots.hand_over(conn):
            return
        if self.slots.wanted_elsewhere():
            self.closed.append(conn)
            self.slots.release()
            return
        self.idle.append(conn)

    def pass_on(self, got: Any) -> None:
        if got is None:
            self.slots.release()
        else:
            self.give_back(got)


def test_take_counts_slots_up_to_the_cap() -> None:
    slots = Slots(2)
    assert [slots.take(), slots.take(), slots.take()] == [True, True, False]
    assert slots.opened == 2
    assert slots.waiting() == 0


def test_callers_queue_at_the_cap_and_waiting_counts_them() -> None:
    async def main() -> None:
        slots = Slots(1)
        assert slots.take()
        served, expires, stays = (slots.join(t)[0] for t in (LONG, 0.01, LONG))
        assert slots.waiting() == 3
        slots.release()  # to `served`
        assert served.result() is None
        assert slots.waiting() == 2
        await asyncio.wait_for(asyncio.shield(expires), 1.0)
        assert slots.waiting() == 1
        assert not stays.done()
        slots.fail_all(lambda: PoolClosed("closed"))
        assert slots.waiting() == 0

    run(main)


def test_a_release_hands_the_slot_to_the_oldest_waiter() -> None:
    async def main() -> None:
        slots = Slots(1)
        assert slots.take()
        first, _ = slots.join(LONG)
        second, _ = slots.join(LONG)
        slots.release()
        assert first.done() and first.result() is None  # a slot, still counted
        assert not second.done()
        assert slots.opened == 1
        later, _ = slots.join(LONG)  # arrives after `second`: served after it
        assert slots.hand_over("conn")
        assert second.result() == "conn"
        assert not later.done()
        slots.release()
        assert later.result() is None
        assert slots.opened == 1
        slots.release()  # nobody waits: the slot is given up
        assert slots.opened == 0
        assert not slots.hand_over("conn")

    run(main)


def test_tasks_are_served_in_the_order_they_queued() -> None:
    async def main() -> list[int]:
        pool = Pool(1)
        held = await pool.acquire()
        order: list[int] = []

        async def use(n: int) -> None:
            conn = await pool.acquire()
            order.append(n)
            await asyncio.sleep(0)
            pool.give_back(conn)

        tasks = []
        for n in range(5):
            tasks.append(asyncio.create_task(use(n)))
            await settle()  # each queues before the next starts
        assert pool.slots.waiting() == 5
        pool.give_back(held)
        await asyncio.gather(*tasks)
        assert pool.slots.opened == 1 and pool.idle == ["new"]
        return order

    assert run(main) == [0, 1, 2, 3, 4]


def test_a_timed_out_waiter_gets_no_later_handoff_and_no_slot_is_lost() -> None:
    async def main() -> None:
        pool = Pool(1)
        held = await pool.acquire()
        with pytest.raises(PoolTimeout):
            await asyncio.wait_for(pool.acquire(timeout=0.01), 1.0)
        assert pool.slots.waiting() == 0
        after = asyncio.create_task(pool.acquire())
        await settle()
        pool.give_back(held)  # to `after`, not to the one that timed out
        assert await after == held
        pool.slots.release()  # `after` closes its connection; nobody waits
        assert pool.slots.opened == 0
        assert await pool.acquire() == "new"  # the slot is free again
        assert pool.slots.opened == 1

    run(main)


def test_the_only_waiter_timing_out_leaves_the_count_right() -> None:
    async def main() -> None:
        slots = Slots(1)
        assert slots.take()
        waiter, _ = slots.join(0.01)
        assert await asyncio.wait_for(asyncio.shield(waiter), 1.0) is TIMED_OUT
        slots.release()
        assert slots.opened == 0
        assert waiter.result() is TIMED_OUT
        assert slots.take()

    run(main)


@pytest.mark.parametrize("handed", ["conn", None], ids=["connection", "slot"])
def test_abandon_passes_a_simultaneous_handoff_to_the_next_waiter(handed: Any) -> None:
    async def main() -> None:
        pool = Pool(1)
        assert await pool.acquire() == "new"
        cancelled = asyncio.create_task(pool.acquire())
        await settle()
        nxt = asyncio.create_task(pool.acquire())
        await settle()
        # The handoff and the cancel land before `cancelled` runs again: it wakes up
        # cancelled, with the handoff already in its future.
        pool.pass_on(handed)
        assert not nxt.done()
        cancelled.cancel()
        with pytest.raises(asyncio.CancelledError):
            await cancelled
        assert await asyncio.wait_for(nxt, 1.0) == ("new" if handed is None else handed)
        assert pool.slots.opened == 1
        assert pool.idle == []

    run(main)


def test_abandon_with_nobody_next_keeps_the_connection_or_frees_the_slot() -> None:
    async def main() -> None:
        pool = Pool(1)
        assert await pool.acquire() == "new"
        task = asyncio.create_task(pool.acquire())
        await settle()
        pool.give_back("conn")
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert pool.idle == ["conn"]
        assert pool.slots.opened == 1

        pool.idle.clear()
        task = asyncio.create_task(pool.acquire())
        await settle()
        pool.slots.release()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert pool.slots.opened == 0

    run(main)


def test_abandon_before_a_handoff_cancels_the_waiter_and_passes_nothing() -> None:
    async def main() -> None:
        slots = Slots(1)
        assert slots.take()
        passed: list[Any] = []
        cancelled, _ = slots.join(LONG)
        slots.abandon(cancelled, passed.append)
        assert cancelled.cancelled()
        timed_out, _ = slots.join(0.01)
        await asyncio.wait_for(asyncio.shield(timed_out), 1.0)
        slots.abandon(timed_out, passed.append)
        assert passed == []  # neither was handed anything
        assert slots.waiting() == 0
        nxt, _ = slots.join(LONG)
        slots.release()
        assert nxt.result() is None  # skips the cancelled and the timed-out
        assert slots.opened == 1

    run(main)


def test_fail_all_raises_a_new_error_in_every_waiter() -> None:
    async def main() -> None:
        pool = Pool(1)
        await pool.acquire()
        expired = asyncio.create_task(pool.acquire(timeout=0.01))
        tasks = [asyncio.create_task(pool.acquire()) for _ in range(3)]
        await settle()
        with pytest.raises(PoolTimeout):
            await asyncio.wait_for(expired, 1.0)
        pool.slots.fail_all(lambda: PoolClosed("closed", alias="replica"))
        errors = await asyncio.gather(*tasks, return_exceptions=True)
        assert all(isinstance(e, PoolClosed) and e.alias == "replica" for e in errors)
        assert len({id(e) for e in errors}) == 3  # one each: a shared one mixes tracebacks
        assert not pool.slots.budget.queue
        assert pool.slots.waiting() == 0
        assert not pool.slots.hand_over("conn")

    run(main)


# -- one budget, several kinds ----------------------------------------------------------------


def test_kinds_share_one_cap() -> None:
    budget = Budget(3)
    rw, ro, orm = Slots(budget), Slots(budget), Slots(budget)
    assert [rw.take(), ro.take(), orm.take()] == [True, True, True]
    assert not any(kind.take() for kind in (rw, ro, orm))
    assert (budget.opened, rw.opened, ro.opened, orm.opened) == (3, 1, 1, 1)
    ro.release()
    assert orm.take() and not rw.take()
    assert (budget.opened, ro.opened, orm.opened) == (3, 0, 2)


def test_every_kind_waits_in_one_queue_oldest_first() -> None:
    async def main() -> list[str]:
        budget = Budget(2)
        rw, ro, orm = Pool(budget), Pool(budget), Pool(budget)
        held = [await rw.acquire(), await rw.acquire()]
        order: list[str] = []

        async def use(pool: Pool, name: str) -> None:
            conn = await pool.acquire()
            order.append(name)
            await asyncio.sleep(0)
            pool.give_back(conn)

        tasks = []
        for pool, name in [(ro, "ro1"), (orm, "orm1"), (rw, "rw1"), (ro, "ro2"), (orm, "orm2")]:
            tasks.append(asyncio.create_task(use(pool, name)))
            await settle()
        assert budget.waiting() == 5 and ro.slots.waiting() == 2
        for conn in held:
            rw.give_back(conn)  # the oldest wants a read-only one: closed, its slot handed
        await asyncio.gather(*tasks)
        assert budget.opened <= 2
        assert rw.closed  # a read-write connection made room for the others
        return order

    assert run(main) == ["ro1", "orm1", "rw1", "ro2", "orm2"]


def test_at_the_cap_an_idle_connection_of_another_kind_makes_room() -> None:
    async def main() -> None:
        budget = Budget(2)
        rw, orm = Pool(budget), Pool(budget)
        a, b = await rw.acquire(), await rw.acquire()
        rw.give_back(a)
        rw.give_back(b)
        assert rw.idle == ["new", "new"] and budget.opened == 2
        assert await asyncio.wait_for(orm.acquire(), 1.0) == "new"  # no wait: one evicted
        assert (len(rw.closed), len(rw.idle), budget.opened) == (1, 1, 2)
        assert await asyncio.wait_for(orm.acquire(), 1.0) == "new"
        assert (rw.idle, budget.opened, orm.slots.opened, rw.slots.opened) == ([], 2, 2, 0)

    run(main)


def test_no_eviction_while_callers_wait() -> None:
    async def main() -> None:
        budget = Budget(1)
        rw, orm = Pool(budget), Pool(budget)
        held = await rw.acquire()
        first = asyncio.create_task(orm.acquire())
        await settle()
        rw.idle.append("stray")  # an idle one appearing while a caller waits
        assert not rw.slots.take()  # a newcomer queues behind `first`, evicts nothing
        assert rw.idle == ["stray"]
        rw.give_back(held)  # `first` wants the ORM kind: closed, slot handed
        assert await asyncio.wait_for(first, 1.0) == "new"
        assert rw.closed == [held]

    run(main)


def test_fail_all_fails_only_its_own_kind() -> None:
    async def main() -> None:
        budget = Budget(1)
        rw, orm = Pool(budget), Pool(budget)
        held = await rw.acquire()
        mine = asyncio.create_task(orm.acquire())
        theirs = asyncio.create_task(rw.acquire())
        await settle()
        orm.slots.fail_all(lambda: PoolClosed("closed"))
        with pytest.raises(PoolClosed):
            await mine
        assert rw.slots.waiting() == 1
        rw.give_back(held)
        assert await asyncio.wait_for(theirs, 1.0) == held

    run(main)
