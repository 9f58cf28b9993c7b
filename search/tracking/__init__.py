"""MLflow tracking: one run's tracker (:mod:`.runs`) and the sweep's write queue (:mod:`.queue`),
which sends the driver's writes from a thread of its own and survives a server outage."""

from .queue import PENDING_FILE, TrackingQueue, TrackingUnavailable, current_tracking_queue, keep_pending, tracking_queue
from .runs import DEFAULT_DB, RunTracker, check_tracking_uri, drop_orphans, flatten, resolve_tracking_uri

__all__ = [
    "DEFAULT_DB",
    "RunTracker",
    "check_tracking_uri",
    "drop_orphans",
    "flatten",
    "resolve_tracking_uri",
    "PENDING_FILE",
    "TrackingQueue",
    "TrackingUnavailable",
    "current_tracking_queue",
    "keep_pending",
    "tracking_queue",
]
