#!/usr/bin/env bash
# Sets up everything `make node` and `make test` need, on a fresh machine or
# an old one: system packages, the virtualenv, the quiche build (cached in
# ~/.cache/polykey, keyed by Cargo.lock) and, for tests, the npm peers.
# Each step is skipped when already done, so running it again is cheap.
#
# usage: scripts/setup.sh [node|test]
set -euo pipefail
cd "$(dirname "$0")/.."
mode=${1:-node}
venv=.venv
py=${PYTHON:-python3}

say() { printf 'setup: %s\n' "$*" >&2; }
die() { say "$*"; exit 1; }

have_libclang() {
    ldconfig -p 2>/dev/null | grep -q 'libclang[-.0-9]*\.so' && return 0
    compgen -G '/usr/lib/llvm-*/lib/libclang*.so*' >/dev/null
}

# 1. System packages. The quiche build needs cmake, libclang (bindgen), a
#    C/C++ compiler and git; the test suite needs iproute2 and iptables for
#    its network-namespace tests.
missing=()
command -v cmake >/dev/null || missing+=(cmake)
command -v cc >/dev/null || missing+=(gcc)
command -v c++ >/dev/null || missing+=(g++)
command -v git >/dev/null || missing+=(git)
have_libclang || missing+=(libclang-dev)
if [ "$mode" = test ]; then
    command -v ip >/dev/null || missing+=(iproute2)
    command -v iptables >/dev/null || missing+=(iptables)
fi
"$py" -c 'import venv, ensurepip' 2>/dev/null || missing+=(python3-venv)
if [ ${#missing[@]} -gt 0 ]; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
        say "installing ${missing[*]} with apt-get"
        export DEBIAN_FRONTEND=noninteractive
        apt-get update -qq
        apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
    else
        die "missing system packages: ${missing[*]} (install them, e.g. sudo apt-get install ${missing[*]})"
    fi
fi

# 2. Toolchains that no package manager here provides.
"$py" -c 'import sys; sys.exit(sys.version_info < (3, 11))' \
    || die "Python 3.11 or newer is needed (set PYTHON=/path/to/python3.11)"
export PATH="$HOME/.cargo/bin:$PATH"
command -v cargo >/dev/null || die "Rust (cargo) 1.88 or newer is needed: https://rustup.rs"

# 3. The virtualenv and the package, rebuilt when the build inputs change.
[ -x "$venv/bin/python" ] || { say "creating $venv"; "$py" -m venv "$venv"; }
stamp=$venv/.polykey-setup
want=$(cat pyproject.toml setup.py setup_quiche.py _quiche_build/Cargo.toml \
    _quiche_build/Cargo.lock _quiche_build/src/*.rs _quiche_build/patch_quiche.py \
    _quiche_build/fetch/Cargo.lock | sha256sum | cut -c1-32)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ] \
    || ! "$venv/bin/python" -c 'import polykey.quic._quiche' 2>/dev/null; then
    say "installing polykey (the first quiche build takes a few minutes)"
    "$venv/bin/python" -m pip install -q --upgrade pip setuptools wheel 'cffi>=1.17'
    "$venv/bin/python" -m pip install -q --no-build-isolation -e '.[dev]'
    echo "$want" > "$stamp"
fi

# 4. Interoperability peers from npm, for the test suite only: every
#    package-lock.json under tests/interop/ (one folder per peer).
if [ "$mode" = test ]; then
    for lock in tests/interop/package-lock.json tests/interop/*/package-lock.json; do
        [ -f "$lock" ] || continue
        dir=$(dirname "$lock")
        if ! command -v npm >/dev/null; then
            say "npm not found: the interoperability tests will be skipped"
            break
        fi
        if [ ! -f "$dir/node_modules/.polykey-stamp" ] \
            || [ "$(sha256sum < "$lock")" != "$(cat "$dir/node_modules/.polykey-stamp")" ]; then
            say "installing the npm interoperability peers in $dir"
            # Our locks carry entries for other platforms' optional
            # @matrixai/quic binaries, which npm ci requires (an npm lock
            # written on one platform lacks them). Should a lock lack them
            # again, install from it without rewriting it.
            (cd "$dir" && { npm ci --no-audit --no-fund --loglevel=error 2>/dev/null \
                || npm install --no-save --no-audit --no-fund --loglevel=error; })
            sha256sum < "$lock" > "$dir/node_modules/.polykey-stamp"
        fi
    done
fi
