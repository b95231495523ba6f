"""The client side of lustrefs: the ``lustrefs`` and ``mount.lustrefs`` commands and what they need.

Nothing here imports trio, pyfuse3 or the daemon's modules (tests/test_layout.py checks it): the control plane,
the HSM and task commands and ``mount``/``umount`` work without the FUSE stack. ``mount`` starts the daemon as
a process (``python -m lustrefs.daemon.process``); only ``mount --foreground`` imports it, to serve in this process.
"""
