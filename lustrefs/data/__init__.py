"""The data cache's parts, behind the ``lustrefs.data.cache.Cache`` facade (the rest of the daemon uses that).

- ``model``: the values it works on (``ObjectVersion``, ``FileData``, ``CacheStats``, ``Buffer``);
- ``diskio``: the system calls on part files (whole-part writes, ``O_DIRECT``, ``RWF_NOWAIT`` reads, fsync);
- ``parts``: ``DiskParts``, the parts on disk: layout, index and LRU, pins, capacity and eviction, part files;
- ``fetch``: ``Fetcher``, single-flight GETs of runs of parts, recent parts in memory, prefetch;
- ``local``: ``LocalData``, reads of file data and the local parts of dirty files.

Each module depends only on those listed before it.
"""
