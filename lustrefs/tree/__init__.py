"""The POSIX tree: ``namespace`` (queries, POSIX operations, lookup and open counts), ``loader`` (lazy loading of
directories from S3, targeted lookups, entries that appear or change in S3), ``listing`` (one directory listing,
shared with the importer) and ``heads`` (the HEAD pool that applies objects' POSIX metadata)."""
