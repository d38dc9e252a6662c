"""The one exception type a user should see as a message, not a traceback.
"""

from __future__ import annotations


class StageError(Exception):
    """A problem the user can fix (bad data, a gate, a missing file): shown as a message, not a traceback."""
