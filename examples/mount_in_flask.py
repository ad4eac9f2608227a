"""Mount serving inside an existing Flask app, under ``/models``.

Run it (Flask's development server; any WSGI server works the same way)::

    python examples/mount_in_flask.py
    curl http://127.0.0.1:5000/                    # the Flask app
    curl http://127.0.0.1:5000/models/echo?x=1     # the serve_core endpoint
    curl http://127.0.0.1:5000/models/-/routes     # serve_core's routes, relative to the mount

Without Flask, mount into any WSGI app the same way: ``DispatcherMiddleware(app, {...})``.
"""

from flask import Flask
from werkzeug.middleware.dispatcher import DispatcherMiddleware

import serve_core as serve

serve.init(start_server=False)  # the host app serves HTTP; serve_core only routes and runs


def echo(request):
    return {"args": request.args.to_dict(), "path": request.path, "mounted_at": request.root_path}


serve.create_endpoint("echo", "/echo")
serve.create_backend(echo, "echo:v1")
serve.link("echo", "echo:v1")

app = Flask(__name__)


@app.route("/")
def index():
    return "the host Flask app; serving lives under /models"


app.wsgi_app = DispatcherMiddleware(app.wsgi_app, {"/models": serve.wsgi_app()})  # type: ignore[method-assign]

if __name__ == "__main__":
    try:
        app.run(host="127.0.0.1", port=5000)
    finally:
        serve.shutdown()
