"""`celery -A workers.mixed worker`: a mixed node, configured from the environment."""

from workers import make_app

app = make_app("mixed")
