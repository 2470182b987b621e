#!/usr/bin/env python3
"""An app under load on a Redis deployment, with the real redis-py client.

It reads its credential from the JSON file a rekey-sidecar writes
(username, password) and, when the file changes, builds new clients with
it and switches once they answer; the old ones are closed. Meanwhile it
writes through the primary and reads from replicas, one command after the
other, and counts what succeeded and what failed. With Sentinel it writes
through `master_for` and reads from each replica the Sentinels named, in
turn; in a cluster, `RedisCluster` reads from replicas.

    redis_app.py CONFIG_JSON

CONFIG_JSON: {"mode": "sentinel" | "cluster", "creds": PATH, "stop": PATH,
"key": PREFIX, "sentinels": ["h:p", ...], "master": NAME,
"nodes": ["h:p", ...], "tls": {"ca": PATH, "cert": PATH, "key": PATH} | null}

It prints "started" once a write and a read succeeded, and when the stop
file appears a JSON summary: {"ok", "failed", "errors", "by_password"}
(successes per SHA-256 prefix of the password used; never a password).
"""

import hashlib
import json
import os
import sys
import time

import redis
from redis.backoff import ExponentialBackoff
from redis.cluster import ClusterNode, RedisCluster
from redis.exceptions import ConnectionError, ReadOnlyError, TimeoutError
from redis.retry import Retry
from redis.sentinel import Sentinel

cfg = json.loads(sys.argv[1])
RETRYABLE = [ConnectionError, TimeoutError, ReadOnlyError]


def hostport(a):
    h, p = a.rsplit(":", 1)
    return h, int(p)


def tls_kwargs():
    t = cfg.get("tls")
    if not t:
        return {}
    return {
        "ssl": True,
        "ssl_ca_certs": t["ca"],
        "ssl_certfile": t.get("cert"),
        "ssl_keyfile": t.get("key"),
        "ssl_cert_reqs": "required",
    }


def retry():
    # A failover takes a few seconds; the client waits it out, as an
    # app's client would be configured to.
    return Retry(ExponentialBackoff(cap=0.5, base=0.02), 60)


def build(user, password):
    common = dict(
        username=user,
        password=password,
        socket_timeout=2,
        socket_connect_timeout=2,
        retry=retry(),
        retry_on_error=RETRYABLE,
        **tls_kwargs(),
    )
    if cfg["mode"] == "sentinel":
        s = Sentinel(
            [hostport(a) for a in cfg["sentinels"]],
            sentinel_kwargs=dict(socket_timeout=2, **tls_kwargs()),
            **common,
        )
        # Every replica the Sentinels name, each read in turn: redis-py's
        # slave_for falls back to the primary when a replica refuses it,
        # which would hide a replica that lacks the password.
        replicas = s.discover_slaves(cfg["master"])
        if not replicas:
            raise RuntimeError("the Sentinels name no replica")
        readers = [redis.Redis(host=h, port=p, **common) for h, p in replicas]
        return s.master_for(cfg["master"]), readers
    c = RedisCluster(
        startup_nodes=[ClusterNode(*hostport(a)) for a in cfg["nodes"]],
        read_from_replicas=True,
        cluster_error_retry_attempts=20,
        **common,
    )
    return c, [c]


def stamp(path):
    try:
        st = os.stat(path)
        return (st.st_mtime_ns, st.st_ino)
    except FileNotFoundError:
        return None


def main():
    ok = failed = 0
    errors = []
    by_password = {}
    seen = None
    clients = None
    tag = None
    started = False
    n = 0
    while not os.path.exists(cfg["stop"]):
        s = stamp(cfg["creds"])
        if s != seen and s is not None:
            try:
                with open(cfg["creds"]) as f:
                    c = json.load(f)
                new = build(c["username"], c["password"])
                new[0].ping()
                for r in new[1]:
                    r.ping()
                old, clients = clients, new
                tag = hashlib.sha256(c["password"].encode()).hexdigest()[:12]
                seen = s
                if old is not None:
                    old[0].close()
                    for r in old[1]:
                        if r is not old[0]:
                            r.close()
            except Exception as e:  # noqa: BLE001 - every failure is counted
                errors.append(f"new clients: {type(e).__name__}: {e}")
                time.sleep(0.05)
        if clients is None:
            time.sleep(0.01)
            continue
        n += 1
        key = f"{cfg['key']}:{n % 16}"
        try:
            clients[0].incr(key)
            readers = clients[1]
            readers[n % len(readers)].get(key)
            ok += 2
            by_password[tag] = by_password.get(tag, 0) + 2
            if not started:
                print("started", flush=True)
                started = True
        except Exception as e:  # noqa: BLE001 - every failure is counted
            failed += 1
            if len(errors) < 50:
                errors.append(f"{type(e).__name__}: {e}")
        time.sleep(0.002)
    print(
        json.dumps(
            {"ok": ok, "failed": failed, "errors": errors, "by_password": by_password}
        ),
        flush=True,
    )


if __name__ == "__main__":
    main()
