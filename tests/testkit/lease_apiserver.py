#!/usr/bin/env python3
"""A stand-in for the Kubernetes API server's Lease endpoints, for tests.

No Kubernetes API server can run on the test machines, so this serves the
three calls leader election makes (GET, POST and PUT on
/apis/coordination.k8s.io/v1/namespaces/NS/leases[/NAME]) with the server's
rules: bearer-token authentication, 404 NotFound, 409 AlreadyExists on a
second create, 409 Conflict when an update's metadata.resourceVersion is not
the stored one, 422 Invalid for a malformed Lease (MicroTime with six
fraction digits, a positive integer duration), a new resourceVersion on
every write. It answers over HTTPS with the certificate it is given.

Every successful write is appended to the history file as one JSON line
with the server's monotonic time, so tests can check how candidates took
turns. The token file is read for every request, as kubelet rotates it.

Usage: lease_apiserver.py --cert C --key K --token-file T --history H
Prints "listening PORT" once it accepts connections.
"""

import argparse
import json
import re
import ssl
import threading
import time
import uuid
from http.server import ThreadingHTTPServer

from kube_stand_in import JsonHandler, status

PREFIX = "/apis/coordination.k8s.io/v1/namespaces/"
LEASE_SPEC_FIELDS = {
    "acquireTime", "holderIdentity", "leaseDurationSeconds", "leaseTransitions",
    "renewTime", "preferredHolder", "strategy",
}
MICRO_TIME = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}\.\d{6}Z$")

lock = threading.Lock()
leases = {}  # (namespace, name) -> object
version = [1000]


def invalid(obj, ns, name):
    """The apiserver's validation of a Lease, as far as election uses it."""
    if obj.get("apiVersion") != "coordination.k8s.io/v1" or obj.get("kind") != "Lease":
        return "apiVersion/kind: must be coordination.k8s.io/v1 Lease"
    meta = obj.get("metadata") or {}
    if meta.get("name") != name:
        return "metadata.name: must match the URL"
    if meta.get("namespace", ns) != ns:
        return "metadata.namespace: does not match the namespace of the request"
    spec = obj.get("spec") or {}
    unknown = set(spec) - LEASE_SPEC_FIELDS
    if unknown:
        return f"spec: unknown fields {sorted(unknown)}"
    for f in ("acquireTime", "renewTime"):
        if f in spec and spec[f] is not None and not MICRO_TIME.match(str(spec[f])):
            return f"spec.{f}: not a MicroTime: {spec[f]!r}"
    d = spec.get("leaseDurationSeconds")
    if d is not None and (not isinstance(d, int) or isinstance(d, bool) or d <= 0):
        return "spec.leaseDurationSeconds: must be greater than 0"
    t = spec.get("leaseTransitions")
    if t is not None and (not isinstance(t, int) or t < 0):
        return "spec.leaseTransitions: must be greater than or equal to 0"
    h = spec.get("holderIdentity")
    if h is not None and not isinstance(h, str):
        return "spec.holderIdentity: must be a string"
    return None


class Handler(JsonHandler):
    def authorized(self):
        with open(self.server.token_file) as f:
            token = f.read().strip()
        return self.headers.get("Authorization") == f"Bearer {token}"

    def route(self):
        if not self.path.startswith(PREFIX):
            return None
        parts = self.path[len(PREFIX):].split("/")
        if len(parts) == 2 and parts[1] == "leases":
            return parts[0], None
        if len(parts) == 3 and parts[1] == "leases" and parts[2]:
            return parts[0], parts[2]
        return None

    def body(self):
        n = int(self.headers.get("Content-Length") or 0)
        try:
            return json.loads(self.rfile.read(n) or b"null")
        except ValueError:
            return None

    def record(self, method, obj):
        with open(self.server.history, "a") as f:
            f.write(json.dumps({
                "t": time.monotonic(),
                "method": method,
                "holder": obj["spec"].get("holderIdentity"),
                "duration": obj["spec"].get("leaseDurationSeconds"),
                "transitions": obj["spec"].get("leaseTransitions"),
                "resourceVersion": obj["metadata"]["resourceVersion"],
            }) + "\n")

    def handle_one(self, method):
        obj = self.body() if method in ("POST", "PUT") else None
        if not self.authorized():
            return status(401, "Unauthorized", "Unauthorized")
        r = self.route()
        if r is None:
            return status(404, "NotFound", "the server could not find the requested resource")
        ns, name = r
        with lock:
            if method == "GET" and name:
                cur = leases.get((ns, name))
                if cur is None:
                    return status(404, "NotFound", f'leases.coordination.k8s.io "{name}" not found')
                return 200, cur
            if method == "POST" and name is None:
                if not isinstance(obj, dict):
                    return status(400, "BadRequest", "the body is not a JSON object")
                name = (obj.get("metadata") or {}).get("name")
                why = invalid(obj, ns, name)
                if why:
                    return status(422, "Invalid", f'Lease "{name}" is invalid: {why}')
                if (ns, name) in leases:
                    return status(409, "AlreadyExists", f'leases.coordination.k8s.io "{name}" already exists')
                version[0] += 1
                obj["metadata"].update({
                    "namespace": ns,
                    "resourceVersion": str(version[0]),
                    "uid": str(uuid.uuid4()),
                })
                leases[(ns, name)] = obj
                self.record("POST", obj)
                return 201, obj
            if method == "PUT" and name:
                if not isinstance(obj, dict):
                    return status(400, "BadRequest", "the body is not a JSON object")
                why = invalid(obj, ns, name)
                if why:
                    return status(422, "Invalid", f'Lease "{name}" is invalid: {why}')
                cur = leases.get((ns, name))
                if cur is None:
                    return status(404, "NotFound", f'leases.coordination.k8s.io "{name}" not found')
                rv = obj["metadata"].get("resourceVersion")
                if not rv:
                    return status(422, "Invalid", "metadata.resourceVersion: must be specified for an update")
                if rv != cur["metadata"]["resourceVersion"]:
                    return status(409, "Conflict", f'Operation cannot be fulfilled on leases.coordination.k8s.io "{name}": the object has been modified; please apply your changes to the latest version and try again')
                version[0] += 1
                obj["metadata"]["resourceVersion"] = str(version[0])
                obj["metadata"]["uid"] = cur["metadata"]["uid"]
                leases[(ns, name)] = obj
                self.record("PUT", obj)
                return 200, obj
        return status(405, "MethodNotAllowed", f"{method} is not supported here")

    def dispatch(self, method):
        code, body = self.handle_one(method)
        self.reply(code, body)

    def do_GET(self):
        self.dispatch("GET")

    def do_POST(self):
        self.dispatch("POST")

    def do_PUT(self):
        self.dispatch("PUT")


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--cert", required=True)
    p.add_argument("--key", required=True)
    p.add_argument("--token-file", required=True)
    p.add_argument("--history", required=True)
    a = p.parse_args()
    srv = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    srv.daemon_threads = True
    srv.token_file = a.token_file
    srv.history = a.history
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(a.cert, a.key)
    srv.socket = ctx.wrap_socket(srv.socket, server_side=True)
    print(f"listening {srv.server_address[1]}", flush=True)
    srv.serve_forever()


if __name__ == "__main__":
    main()
