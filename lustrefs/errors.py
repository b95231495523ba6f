"""Errors of the control plane, named and printed as the FSx API and the AWS CLI name and print them."""

from __future__ import annotations


class FsxError(Exception):
    """An FSx API error: `code` is the API's error name (``InvalidImportPath``, ``BadRequest``…)."""

    def __init__(self, code: str, message: str, operation: str = "") -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.operation = operation

    def __str__(self) -> str:
        op = self.operation or "Unknown"
        return f"An error occurred ({self.code}) when calling the {op} operation: {self.message}"


class NoEntry(Exception):
    """The inode or name does not exist (ENOENT)."""
