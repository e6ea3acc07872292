"""Log redaction: logs at INFO never carry prompts or generated text.

Celery logs a task's return value and, for a message it cannot handle, the message's body and
headers; for fd tasks both are user text. The filters here keep the facts (the error, the sizes)
and drop the text.
"""

from __future__ import annotations

import logging

__all__ = ["install_log_redaction"]


class _RedactResults(logging.Filter):
    """Celery logs a task's return value at INFO; for fd tasks that is generated text.
    Replace it with its size, so logs at INFO never carry prompts or outputs."""

    def filter(self, record: logging.LogRecord) -> bool:
        args = record.args
        if isinstance(args, dict) and str(args.get("name", "")).startswith("fd."):
            value = args.get("return_value")
            if value is not None:
                summary = f"<result: {len(str(value))} chars redacted>"
                record.args = {**args, "return_value": summary}
        return True


class _RedactRejectedMessages(logging.Filter):
    """Celery logs the full body and headers of a message it cannot handle (unknown task,
    undecodable body, no task header): for fd queues that is a prompt. Keep the error, log the
    sizes."""

    def __init__(self) -> None:
        super().__init__()
        from celery.worker.consumer import consumer as c

        # template -> positions of its arguments that carry message contents
        self.contents = {
            c.UNKNOWN_FORMAT: (0,),
            c.UNKNOWN_TASK_ERROR: (1, 2),
            c.INVALID_TASK_ERROR: (1,),
            c.MESSAGE_DECODE_ERROR: (3, 4),
        }

    def filter(self, record: logging.LogRecord) -> bool:
        positions = self.contents.get(record.msg) if isinstance(record.msg, str) else None
        if positions and isinstance(record.args, tuple):
            args = list(record.args)
            for i in positions:
                if i < len(args):
                    args[i] = f"<{len(str(args[i]))} chars redacted>"
            record.args = tuple(args)
        return True


def install_log_redaction() -> None:
    """Filters on Celery's loggers that keep prompts and outputs out of the logs (idempotent)."""
    for name, kind in (
        ("celery.app.trace", _RedactResults),
        ("celery.worker.consumer.consumer", _RedactRejectedMessages),
    ):
        target = logging.getLogger(name)
        if not any(isinstance(f, kind) for f in target.filters):
            target.addFilter(kind())
