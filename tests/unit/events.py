"""Hand-made Celery events for the unit tests of the state model."""
T0 = 1_700_000_000.0
W = "w1@h"


def ev(kind, **fields):
    """An event of ``kind`` with the fields every event carries (defaults: worker W at T0)."""
    fields.setdefault("timestamp", T0)
    fields.setdefault("utcoffset", 0)
    fields.setdefault("hostname", W)
    return {"type": kind, **fields}
