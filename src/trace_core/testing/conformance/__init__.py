"""Port conformance suites: pytest mixin classes every adapter's test module subclasses.

``QueueConformance`` needs fixtures ``queue`` and ``advance``; ``ObjectStoreConformance`` needs
``object_store``, ``fetch_signed`` and ``advance_clock``; ``SignerConformance`` needs ``signer``
and ``rotate_signer``.
"""

from trace_core.testing.conformance.object_store import ObjectStoreConformance
from trace_core.testing.conformance.queue import QueueConformance
from trace_core.testing.conformance.signer import SignerConformance

__all__ = ["ObjectStoreConformance", "QueueConformance", "SignerConformance"]
