#!/usr/bin/env python3
"""A stand-in for the Kubernetes TokenReview API, for tests.

No Kubernetes API server can run on the test machines, so this answers the
one call OpenBao's (and Vault's) kubernetes auth method makes at login,
POST /apis/authentication.k8s.io/v1/tokenreviews, over plain HTTP, as the
API server would:

- the caller must present a bearer token: the reviewer token when one is
  given (the auth method's token_reviewer_jwt), otherwise a token that is
  itself valid (the auth method then reviews the login JWT with itself);
  anything else gets 401 Unauthorized, a Status object;
- a reviewed token listed in the tokens file is authenticated, as the user
  system:serviceaccount:NAMESPACE:NAME with that account's uid and groups,
  and the requested audiences echoed back (the API server answers with the
  requested audiences the token is valid for);
- any other token gets status.authenticated=false and an error, with 201.

The tokens file is a JSON object, token -> {"namespace", "name", "uid"},
read for every request so a test can add tokens, or remove one as if its
service account had been deleted, while this runs. Every review is logged
to stderr as one JSON line.

Usage: tokenreview.py --tokens FILE [--reviewer-token-file FILE]
Prints "listening PORT" once it accepts connections.
"""

import argparse
import json
import sys
from http.server import ThreadingHTTPServer

from kube_stand_in import JsonHandler, status

PATH = "/apis/authentication.k8s.io/v1/tokenreviews"


class Handler(JsonHandler):
    def tokens(self):
        try:
            with open(self.server.tokens) as f:
                return json.load(f)
        except (OSError, ValueError):
            return {}

    def reviewer_token(self):
        if not self.server.reviewer_token_file:
            return None
        with open(self.server.reviewer_token_file) as f:
            return f.read().strip()

    def review(self):
        n = int(self.headers.get("Content-Length") or 0)
        try:
            obj = json.loads(self.rfile.read(n) or b"null")
        except ValueError:
            obj = None
        if self.path.split("?")[0] != PATH:
            return status(404, "NotFound", "the server could not find the requested resource")
        tokens = self.tokens()
        bearer = self.headers.get("Authorization", "")
        bearer = bearer[len("Bearer "):] if bearer.startswith("Bearer ") else None
        reviewer = self.reviewer_token()
        if bearer is None or (bearer != reviewer and bearer not in tokens):
            return status(401, "Unauthorized", "Unauthorized")
        if (
            not isinstance(obj, dict)
            or obj.get("apiVersion", "authentication.k8s.io/v1") != "authentication.k8s.io/v1"
            or obj.get("kind", "TokenReview") != "TokenReview"
            or not isinstance(obj.get("spec"), dict)
        ):
            return status(400, "BadRequest", "the body is not a TokenReview")
        spec = obj["spec"]
        token = spec.get("token") or ""
        audiences = spec.get("audiences") or []
        account = tokens.get(token)
        if account is None:
            result = {"authenticated": False, "error": "[invalid bearer token, token lookup failed]"}
        else:
            ns, name = account["namespace"], account["name"]
            result = {
                "authenticated": True,
                "user": {
                    "username": f"system:serviceaccount:{ns}:{name}",
                    "uid": account["uid"],
                    "groups": [
                        "system:serviceaccounts",
                        f"system:serviceaccounts:{ns}",
                        "system:authenticated",
                    ],
                },
                "audiences": audiences or ["https://kubernetes.default.svc"],
            }
        print(json.dumps({
            "audiences": audiences,
            "authenticated": result["authenticated"],
            "user": (result.get("user") or {}).get("username"),
        }), file=sys.stderr, flush=True)
        return 201, {
            "kind": "TokenReview",
            "apiVersion": "authentication.k8s.io/v1",
            "metadata": {"creationTimestamp": None},
            "spec": spec,
            "status": result,
        }

    def do_POST(self):
        self.reply(*self.review())

    def do_GET(self):
        self.reply(*status(405, "MethodNotAllowed", "only POST is supported here"))


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--tokens", required=True)
    p.add_argument("--reviewer-token-file")
    a = p.parse_args()
    srv = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    srv.daemon_threads = True
    srv.tokens = a.tokens
    srv.reviewer_token_file = a.reviewer_token_file
    print(f"listening {srv.server_address[1]}", flush=True)
    srv.serve_forever()


if __name__ == "__main__":
    main()
