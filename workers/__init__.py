"""Ready worker apps, one per role: ``celery -A workers.mixed worker`` (or prefill, decode).

Each is configured from the environment only: ``FD_SCHEDULER_*`` for the scheduler and its Redis
(127.0.0.1:6379 by default), ``FD_MODEL`` and ``FD_DEVICE`` for the engine.
"""
