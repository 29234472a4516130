"""The alert operators a Lite worker runs (``trace_sdk.alerts``) over its platform ports.

``alert_operators(state_pool, data_pool)`` is what a Lite worker adds to ``BUILTIN_OPERATORS``
for alerting: ``alert_detector`` and ``alert_route``, reading input rows with
``trace_lite.alert_inputs.PgAlertInputs`` (the data tables of buffered datasets) or
``trace_lite.chain.operators.PgPartitionReader`` (Parquet partitions of range events), and recording
deliveries with ``trace_lite.delivery.DeliveryStore.record_planned``, because the task API has
no route for either yet. Both check that the calling attempt is its task's running one, as the
task API would.
"""

from __future__ import annotations

from psycopg_pool import AsyncConnectionPool

from trace_core.ports import ObjectStore
from trace_lite.alert_inputs import PgAlertInputs
from trace_lite.chain.operators import PgPartitionReader
from trace_lite.delivery import DeliveryStore
from trace_sdk import Operator
from trace_sdk.alerts import make_alert_detector, make_alert_route

#: The operators of ``alert_operators`` with one line each (for validating DAG files offline).
ALERT_OPERATORS = {
    "alert_detector": "runs an alert rule over its input rows into the alert_events dataset",
    "alert_route": "routes alert events to org destinations as alert deliveries",
}


def alert_operators(
    state_pool: AsyncConnectionPool, data_pool: AsyncConnectionPool, store: ObjectStore
) -> dict[str, Operator]:
    """``alert_detector`` and ``alert_route`` over the state and data databases (and the
    object store, for Parquet partitions: ``PgPartitionReader``)."""
    inputs = PgAlertInputs(state_pool, data_pool)
    return {
        "alert_detector": make_alert_detector(inputs, PgPartitionReader(state_pool, store)),
        "alert_route": make_alert_route(inputs, DeliveryStore(state_pool)),
    }


__all__ = ["ALERT_OPERATORS", "alert_operators"]
