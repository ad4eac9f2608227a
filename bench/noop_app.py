"""The no-op deployment measured by ``bench/http_load.py`` (``serve-core run`` style file)."""

import serve_core as serve


def noop():
    return b"Hello, World!"


serve.create_endpoint("noop", "/noop")
serve.create_backend(noop, "noop:v1")
serve.link("noop", "noop:v1")
