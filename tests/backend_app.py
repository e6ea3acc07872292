"""A worker app whose result backend is its own choice (``FD_TEST_RESULT_BACKEND``), not the
scheduler's Redis database: ``celery -A tests.backend_app worker`` (tests/test_generate.py)."""

import os

from celery import Celery

import fd_celery

app = Celery("fd-test-own-backend")
app.conf.result_backend = os.environ["FD_TEST_RESULT_BACKEND"]
fd_celery.install(app)
