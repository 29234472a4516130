"""Wake-ups for the Delivery Service: ``LISTEN trace_delivery`` on a dedicated connection.

Migration 0029 sends ``NOTIFY trace_delivery`` at the commit of every statement that leaves
deliveries due now (the route's insert, a retry, an attempt due again at once). The Delivery
Service ``clear()``s before a pass and, after a pass that leased nothing, ``wait``s for the
next notification or its poll interval, whichever comes first: a delivery routed while the
pass ran is not missed (the notification set the flag the wait looks at), and an idle service
leases a new delivery within a round trip instead of up to a whole poll interval later.

Notifications are hints: the poll stays the fallback. The listener is
``trace_lite.pg_wakeups.PgWakeups`` (reconnects, probes a quiet connection).
"""

from __future__ import annotations

from trace_lite.pg_wakeups import PgWakeups

#: The channel migration 0029's trigger notifies.
CHANNEL = "trace_delivery"


class DeliveryWakeups(PgWakeups):
    """A ``LISTEN trace_delivery`` connection whose notifications set one flag."""

    def __init__(self, conninfo: str, *, probe_s: float = 30.0) -> None:
        super().__init__(conninfo, CHANNEL, probe_s=probe_s)


__all__ = ["CHANNEL", "DeliveryWakeups"]
