"""The HTTP front: a Werkzeug WSGI application over a :class:`~serve_core.Serve` instance.

* :mod:`.app` — :class:`ServeApp`, the WSGI application (mount it anywhere);
* :mod:`.routing` — the exact-path route map rebuilt from the registry;
* :mod:`.request` — turning a WSGI request into a query (body, SLO, call method);
* :mod:`.responses` — encoding results and mapping errors to responses, in one place;
* :mod:`.server` — the standalone threaded Werkzeug server (:mod:`.connection`: one connection's
  deadlines, body stream and response framing; :mod:`.parsing`: strict RFC 9112 checks);
* :mod:`.granian` — running the app under Granian (optional extra), through :mod:`.rsgi`: the
  async front that awaits endpoint calls without holding a thread;
* :mod:`.dashboard` — the live page at ``/-/dashboard`` and its data;
* :mod:`.accesslog` — the access log, request ids and the ``Server-Timing`` header;
* :mod:`.metrics` — the Prometheus export (``/-/metrics``, ``Serve.metrics_app()``; optional extra).

The core never imports this package at module level; ``Serve.wsgi_app()`` and the
standalone server import it lazily.
"""

from __future__ import annotations

from .app import ServeApp

__all__ = ["ServeApp"]
