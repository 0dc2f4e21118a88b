"""The published state of customers rebuilt from the log: from their outbox, and for one
whose earliest transitions another engine published (its partition taken over), from the
snapshot the takeover wrote, then the transitions after it."""

from __future__ import annotations

from pathlib import Path

from actors._customer import Customer
from actors._stored import outbox_entry, snapshot_row, transition_of
from actors.engine._published import Published
from protocol import DefinitionCause, Transition, from_instant
from store import Store

T0 = 1_767_225_600_000_000


def change(customer: str, segment: str, entered: bool, version: int, at: int) -> Transition:
    return Transition(
        customer_id=customer,
        segment=segment,
        change="entered" if entered else "exited",
        at=from_instant(at),
        cause=DefinitionCause(),
        version=version,
    )


async def test_a_customer_without_its_first_transitions_goes_on_from_its_snapshot(
    tmp_path: Path,
) -> None:
    history = {
        "full": [change("full", "a", True, 1, T0), change("full", "b", True, 2, T0 + 1)],
        # Taken over at version 2 (a and b entered, by the other engine); then a exited here.
        "taken": [change("taken", "a", False, 3, T0 + 5)],
        "quiet": [],  # taken over at version 1 (entered a), nothing since
        "new": [],  # no transition, no snapshot
    }
    before = Customer("taken")
    before.restore([change("taken", "a", True, 1, T0), change("taken", "b", True, 2, T0 + 2)])
    quiet = Customer("quiet")
    quiet.restore([change("quiet", "a", True, 1, T0 + 3)])
    async with await Store.open(tmp_path / "shoal.db") as store:
        entries = [outbox_entry(t) for ts in history.values() for t in ts]
        rows = [snapshot_row(c, needs="old", log_seq=0) for c in (before, quiet)]
        await store.commit([], entries, snapshots=rows)

        customers = {i: Customer(i) for i in history}
        published = Published(store)
        for o in await store.outbox.of_customers(list(history)):
            published.add(customers[o.customer_id], transition_of(o))
        await published.finish(customers)

    state = {i: (c.version, dict(c.members), c.watermark) for i, c in customers.items()}
    assert state == {
        "full": (2, {"a": T0, "b": T0 + 1}, T0 + 1),
        "taken": (3, {"b": T0 + 2}, T0 + 5),
        "quiet": (1, {"a": T0 + 3}, T0 + 3),
        "new": (0, {}, Customer("new").watermark),
    }
