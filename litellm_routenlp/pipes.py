"""Non-blocking reads of a child process's pipe, shared by the decision log's writer link and the router process."""

from __future__ import annotations

import os
from typing import Optional

READ_CHUNK = 1 << 16


def read_available(fd: int) -> Optional[bytes]:
    """What has arrived on non-blocking ``fd``: None when nothing yet, ``b""`` when the other end is gone.

    A read error counts as gone (``b""``): both callers then treat the child as lost, which is what
    an EOF means too."""
    try:
        return os.read(fd, READ_CHUNK)
    except BlockingIOError:
        return None
    except OSError:
        return b""
