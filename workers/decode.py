"""`celery -A workers.decode worker`: a decode node, configured from the environment."""

from workers import make_app

app = make_app("decode")
