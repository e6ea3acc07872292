"""`celery -A workers.prefill worker`: a prefill node, configured from the environment."""

from fd_celery.worker_apps import make_app

app = make_app("prefill")
