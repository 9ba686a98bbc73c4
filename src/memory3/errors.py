"""memory3's exceptions: one hierarchy, so that callers catch `Memory3Error` and the command line
and the server map each kind to one exit code and one HTTP status (`exit_code`, `http_status`).

    Memory3Error
      InputError          what a user gave is wrong: a file, an argument, a request field
      ConfigError         a configuration that cannot work (also a ValueError)
      CheckpointError     a model directory that is missing, damaged or of another kind
      StoreError          a memory bank that is missing, of another format, or used the wrong way
        StoreCorruptError     bytes on disk that fail their checksum or disagree with the metadata
        StoreLockedError      another process holds the bank's writer lock
        FingerprintMismatchError  memories written by another model or memory config

The library's older exception classes (`CodecError`, `IndexFormatError`, `QAFormatError`, …)
derive from these, so they are caught the same way. Input and configuration errors are also
`ValueError`s, store errors `RuntimeError`s, as before.

A message is one line that names the problem and what to do about it, meant for a person at a
terminal as much as for a Python caller.
"""

from __future__ import annotations


class Memory3Error(Exception):
    """Base of every error memory3 raises on purpose."""

    exit_code: int = 1
    http_status: int = 500


class InputError(Memory3Error, ValueError):
    """A file, argument or request that memory3 cannot use as given."""

    exit_code = 2
    http_status = 400


class ConfigError(Memory3Error, ValueError):
    """A configuration whose values cannot work together."""

    exit_code = 2
    http_status = 400


class CheckpointError(Memory3Error, ValueError):
    """A model or adapter directory that is missing, damaged, or not one memory3 can load."""

    exit_code = 2
    http_status = 500


class StoreError(Memory3Error, RuntimeError):
    """A memory bank that is missing, of another format, or used the wrong way."""

    exit_code = 1
    http_status = 500


class StoreCorruptError(StoreError):
    """Bytes on disk that do not match their checksum or the metadata."""


class StoreLockedError(StoreError):
    """Another process holds the bank's writer lock."""

    http_status = 409


class FingerprintMismatchError(StoreError):
    """The bank holds memories written by another model or memory configuration."""

    exit_code = 2
