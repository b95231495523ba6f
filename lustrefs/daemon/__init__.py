"""The daemon side of a mount: ``process`` (the daemon process and its life cycle), ``core`` (the composition root),
``fs`` (FUSE requests), ``control_channel`` (the control file), ``hsm`` and ``tasks`` (HSM commands and data
repository tasks), ``stats`` and ``sdnotify``."""
