"""Constants shared by the daemon and the client side (standard library only).

The control file is how the ``lustrefs`` CLI talks to a mount's daemon: its name at the mount root and its
inode number identify it (see lustrefs.daemon.control_channel and lustrefs.client.control_client).
"""

from __future__ import annotations

ROOT_INODE = 1
# The control file's inode (CONTROL_NAME at the root, served by lustrefs.daemon.control_channel): the largest rowid
# SQLite allows, which AUTOINCREMENT never hands out (it fails with SQLITE_FULL instead).
CONTROL_INODE = 2**63 - 1
CONTROL_NAME = ".lustrefs"  # the daemon's control file at the mount root: the name is reserved there
# Cluster engine: closed files' data not yet exported waits in the bucket under STAGING_NAME/<fs-id>/; the name is
# reserved at the root (never imported, never created) whatever the engine.
STAGING_NAME = ".lustrefs-staging"
# The largest file size (as ldiskfs, the ext4 under Lustre's targets, with 4 KiB blocks): a write or truncate beyond
# fails with EFBIG. Files above 5 TiB cannot be exported to S3 (FileSizeTooLarge) but can exist locally, as on FSx.
MAX_FILE_BYTES = 16 * 1024**4

# Lustre's enum hsm_states (lustre_user.h): the daemon computes a file's flags (lustrefs.daemon.hsm), the CLI prints
# them as ``lfs hsm_state`` does (lustrefs.client.hsm).
HS_EXISTS, HS_DIRTY, HS_RELEASED, HS_ARCHIVED = 0x01, 0x02, 0x04, 0x08
HS_NORELEASE, HS_NOARCHIVE, HS_LOST = 0x10, 0x20, 0x40
