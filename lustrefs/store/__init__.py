"""The store layer: the only code that speaks SQL.

One module per table group, each returning typed records:

- ``db``: the schema (a comment per column), the connection (WAL), transactions, and the ``settings`` table;
- ``inodes``: ``inodes`` and ``whiteouts`` — the tree, names and attributes (``Inode`` records);
- ``cacheparts``: ``cache_parts`` — the index of the local data cache;
- ``exports``: the export state of entries (``dirty``, ``exported_key``, ``export_intents``, ``pending_deletes``).

Every method runs on the caller's connection, on the trio thread, inside the caller's transaction if there is one
(``db.transaction``). A second implementation (a server database) sits behind the same methods.
"""
