"""Benchmarks behind ``fd-celery bench``: each measures fd_celery side by side with a baseline in
one run, on a private Redis and real worker processes, and writes JSON plus a PNG plot."""
