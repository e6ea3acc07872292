"""`celery -A workers.mixed worker`: a mixed node, configured from the environment."""

from fd_celery.worker_apps import make_app

app = make_app("mixed")
