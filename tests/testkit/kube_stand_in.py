"""What the stand-ins for Kubernetes API endpoints share
(lease_apiserver.py, tokenreview.py): the API server's Status object for
errors, and a request handler that answers JSON quietly."""

import json
from http.server import BaseHTTPRequestHandler


def status(code, reason, message):
    """A failure as the API server answers it: (code, Status object)."""
    return code, {
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": message,
        "reason": reason,
        "code": code,
    }


class JsonHandler(BaseHTTPRequestHandler):
    """HTTP/1.1, no access log, replies as JSON with a length."""

    protocol_version = "HTTP/1.1"

    def log_message(self, fmt, *args):
        pass

    def reply(self, code, body):
        data = json.dumps(body).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)
