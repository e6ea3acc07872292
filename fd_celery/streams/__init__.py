"""Output streams: a request's tokens travel through one Redis stream, written by the node's
writer threads (:mod:`fd_celery.streams.writer`) and followed by the caller's reader threads
(:mod:`fd_celery.streams.reader`); what an entry holds is :mod:`fd_celery.streams.entries`.
Tokens never travel as one Celery task each."""

from fd_celery.streams.entries import (
    END_RETENTION_S,
    EXPIRED_RETENTION_S,
    Record,
    StreamEntry,
    last_entry,
)
from fd_celery.streams.reader import StreamReaders
from fd_celery.streams.writer import OutputWriter, writer_for

__all__ = [
    "OutputWriter",
    "StreamReaders",
    "StreamEntry",
    "Record",
    "last_entry",
    "writer_for",
    "END_RETENTION_S",
    "EXPIRED_RETENTION_S",
]
