"""Output streams: a request's tokens travel through one Redis stream, written by the node's
writer threads and followed by the caller's reader threads."""

from fd_celery.streams.stream import (
    END_RETENTION_S,
    EXPIRED_RETENTION_S,
    OutputWriter,
    Record,
    StreamEntry,
    StreamReaders,
    last_entry,
    writer_for,
)

__all__ = ["OutputWriter", "StreamReaders", "StreamEntry", "Record", "last_entry", "writer_for",
           "END_RETENTION_S", "EXPIRED_RETENTION_S"]
