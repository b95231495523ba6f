"""systemd's readiness protocol (sd_notify): one datagram to the unix socket named by ``$NOTIFY_SOCKET``.

A ``Type=notify`` service sends ``READY=1`` once it serves and ``STOPPING=1`` when it starts shutting down.
An address starting with ``@`` is in the abstract namespace. Without ``$NOTIFY_SOCKET`` nothing is sent.
"""

from __future__ import annotations

import logging
import os
import socket

log = logging.getLogger(__name__)


def notify(message: str) -> bool:
    """Send ``message`` (e.g. ``"READY=1"``) to the service manager; whether it was sent. Never raises."""
    address = os.environ.get("NOTIFY_SOCKET", "")
    if not address:
        return False
    if address.startswith("@"):
        address = "\0" + address[1:]
    elif not address.startswith("/"):
        log.warning("NOTIFY_SOCKET=%s is not a unix socket path; not notifying", address)
        return False
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.connect(address)
            sock.sendall(message.encode())
    except OSError as exc:
        log.warning("cannot notify the service manager (%s): %s", message, exc)
        return False
    return True
