"""How S3 keys map to POSIX paths under an import prefix.

FSx's rule: the import prefix filters, it does not re-root.

A directory is identified by its key prefix: ``""`` for the root, ``"a/b/"`` for ``/a/b``. A file's key is its
directory's prefix plus its name.
"""

from __future__ import annotations

from dataclasses import dataclass

from lustrefs.constants import CONTROL_NAME, STAGING_NAME

NAME_MAX = 255


def name_problem(name: str) -> str | None:
    """Why ``name`` cannot be a POSIX path component, or None when it can."""
    if name == "":
        return "empty path component"
    if name in (".", ".."):
        return f"path component {name!r}"
    if "\0" in name:
        return "NUL in path component"
    if len(name.encode()) > NAME_MAX:
        return f"path component longer than {NAME_MAX} bytes"
    return None


def is_reserved(dir_prefix: str, name: str) -> bool:
    """Whether ``name`` is reserved in the directory ``dir_prefix``: the control file's and the cluster's
    staging area's names at the root."""
    return dir_prefix == "" and name in (CONTROL_NAME, STAGING_NAME)


def entry_problem(dir_prefix: str, name: str) -> str | None:
    """Why a listed ``name`` cannot be an entry of the directory ``dir_prefix`` (``""``: the root), or None."""
    if problem := name_problem(name):
        return f"not a POSIX path ({problem})"
    if is_reserved(dir_prefix, name):
        return f"{name} at the root of the file system is reserved for lustrefs (control file, staging area)"
    return None


@dataclass(frozen=True)
class Listing:
    """How to list one directory: the S3 ``Prefix`` to ask for, and how to turn results into child names.

    ``only_child`` is set when the import prefix reaches past the directory's next component: the
    directory then has at most that one child, a directory, present iff any key starts with the prefix.
    """

    prefix: str
    dir_prefix: str
    only_child: str | None = None

    def child_name(self, key: str) -> str:
        """The child name of a listed key or common prefix (common prefixes end in ``/``)."""
        rest = key[len(self.dir_prefix) :]
        return rest[:-1] if rest.endswith("/") else rest


def listing_for(dir_prefix: str, import_prefix: str) -> Listing | None:
    """How to list the directory ``dir_prefix`` under ``import_prefix``; None if nothing is below it."""
    if dir_prefix.startswith(import_prefix):
        return Listing(prefix=dir_prefix, dir_prefix=dir_prefix)
    if not import_prefix.startswith(dir_prefix):
        return None
    rest = import_prefix[len(dir_prefix) :]
    head, slash, _ = rest.partition("/")
    if slash:
        return Listing(prefix=import_prefix, dir_prefix=dir_prefix, only_child=head)
    return Listing(prefix=import_prefix, dir_prefix=dir_prefix)
