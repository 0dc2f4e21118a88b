"""Lines of history (Segment Spec JSON) for the tests of import, export and replay files."""

from __future__ import annotations

import json
from typing import Any

from protocol import parse_timestamp

NOW = parse_timestamp("2025-06-01T09:00:00Z")
"""The instant history is imported at."""
T1 = "2025-05-01T10:00:00Z"
T2 = "2025-05-02T10:00:00.250000+01:00"


def line(**fields: Any) -> str:
    """One JSON line of these fields."""
    return json.dumps(fields)


def visit(user: str, ts: str = T1, **extra: Any) -> str:
    """A ``Visit`` track event of ``user`` at ``ts``."""
    return line(type="track", userId=user, event="Visit", timestamp=ts, **extra)
