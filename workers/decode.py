"""`celery -A workers.decode worker`: a decode node, configured from the environment."""

from fd_celery.worker_apps import make_app

app = make_app("decode")
