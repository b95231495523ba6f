"""The link with the data repository: ``exporter`` (the export state machine: local changes to the export prefix)
and ``importer`` (automatic import: changes made in S3 by others, and the kernel notifier)."""
