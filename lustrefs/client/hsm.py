"""HSM commands, the CLI's side: ``lustrefs hsm_*`` ask the daemon through the mount and print what Lustre's
``lfs hsm_*`` print, so FSx scripts work with ``lfs`` replaced by ``lustrefs``. The daemon's side (states,
archive, release, restore) is lustrefs.daemon.hsm.
"""

from __future__ import annotations

from lustrefs.client import control_client
from lustrefs.constants import HS_ARCHIVED, HS_DIRTY, HS_EXISTS, HS_LOST, HS_NOARCHIVE, HS_NORELEASE, HS_RELEASED

# The flags in the order ``lfs hsm_state`` prints them.
FLAG_NAMES = (
    (HS_RELEASED, "released"),
    (HS_EXISTS, "exists"),
    (HS_DIRTY, "dirty"),
    (HS_ARCHIVED, "archived"),
    (HS_NORELEASE, "never_release"),
    (HS_NOARCHIVE, "never_archive"),
    (HS_LOST, "lost_from_hsm"),
)


def format_state(path: str, flags: int, archive_id: int) -> str:
    """One line of ``lfs hsm_state``: ``<path>: (0x0000000d) released exists archived, archive_id:1``."""
    text = f"{path}: (0x{flags:08x})" + "".join(f" {name}" for bit, name in FLAG_NAMES if flags & bit)
    return text + (f", archive_id:{archive_id}" if archive_id else "")


def format_action(path: str, action: str, state: str = "", moved: int = 0) -> str:
    """One line of ``lfs hsm_action``: ``<path>: NOOP`` or ``<path>: ARCHIVE running (0 bytes moved)``."""
    if action == "NOOP":
        return f"{path}: NOOP"
    where = f"({moved} bytes moved)" if state == "running" else "(from 0 to EOF)"
    return f"{path}: {action} {state} {where}"


def read_state(path: str) -> str:
    """``lfs hsm_state`` of one file, through the mount. Raises OSError (control_client's errors)."""
    state = control_client.request(path, "hsm_state")
    return format_state(path, state["flags"], state["archive_id"])


def read_action(path: str) -> str:
    """``lfs hsm_action`` of one file, through the mount. Raises OSError (control_client's errors)."""
    action = control_client.request(path, "hsm_action")
    return format_action(path, action["action"], action["state"], action["bytes"])


def request(path: str, action: str) -> None:
    """Ask the daemon for ``action`` (hsm_archive, hsm_release, hsm_restore) on one file; waits for it.

    Raises control_client.ControlError, whose ``strerror`` is the daemon's explanation (``PathSizeTooLong: …``),
    or another OSError (control_client.NotLustrefs outside a lustrefs mount).
    """
    control_client.request(path, action)
