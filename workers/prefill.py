"""`celery -A workers.prefill worker`: a prefill node, configured from the environment."""

from workers import make_app

app = make_app("prefill")
