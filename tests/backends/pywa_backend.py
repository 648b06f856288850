"""A WhatsApp backend built on pywa (PyPI), the way its users write one for a custom server:
every POST goes through pywa's own signature check (`webhook_update_validator`, HMAC-SHA256
with the app secret) and its dispatcher (`webhook_update_handler`). The handlers record what
the application saw; `GET /seen` returns it as JSON. pywa's own duplicate filter is off, so a
repeat delivery would show.

    python pywa_backend.py APP_SECRET   # prints "listening on PORT", serves on 127.0.0.1
"""

import json
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from pywa import WhatsApp, types

APP_SECRET = sys.argv[1]
wa = WhatsApp(
    phone_id="106540352242922",
    token="unused-in-this-test",
    server=None,
    app_secret=APP_SECRET,
    verify_token="unused",
    validate_updates=True,
    skip_duplicate_updates=False,
    filter_updates=False,
)
lock = threading.Lock()
seen = {"messages": [], "statuses": [], "refused": 0, "requests": 0}


@wa.on_message
def on_message(_: WhatsApp, msg: types.Message):
    with lock:
        seen["messages"].append({"id": msg.id, "text": msg.text})


@wa.on_message_status
def on_status(_: WhatsApp, status: types.MessageStatus):
    with lock:
        seen["statuses"].append({"id": status.id, "status": str(status.status.value)})


class Handler(BaseHTTPRequestHandler):
    def do_POST(self):
        body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
        with lock:
            seen["requests"] += 1
        refused = wa.webhook_update_validator(body, self.headers.get("X-Hub-Signature-256"))
        if refused is not None:
            with lock:
                seen["refused"] += 1
            text, status = refused
            return self.answer(status, str(text))
        text, status = wa.webhook_update_handler(body)
        self.answer(status, str(text))

    def do_GET(self):
        with lock:
            self.answer(200, json.dumps(seen))

    def answer(self, status, text):
        data = text.encode()
        self.send_response(status)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
print(f"listening on {server.server_address[1]}", flush=True)
server.serve_forever()
