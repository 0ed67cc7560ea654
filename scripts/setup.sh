#!/usr/bin/env bash
# Sets up everything `make node` and `make test` need, on a fresh machine or
# an old one: system packages, the virtualenv, the quiche build (cached in
# ~/.cache/polykey, keyed by Cargo.lock) and, for tests, the npm peers.
# Each step is skipped when already done, so running it again is cheap.
#
# usage: scripts/setup.sh [node|test|bench]   set up for that command
#        scripts/setup.sh --check             print what is present (make doctor)
#        scripts/setup.sh --plan [node|test]  print the system packages it
#                                             would install, and stop
#
# PK_SYSROOT (tests only) points the library probe at a fake filesystem.
set -euo pipefail
cd "$(dirname "$0")/.."
action=setup
case "${1:-}" in
    --check) action=check; shift; set -- test ;;
    --plan) action=plan; shift ;;
esac
mode=${1:-node}
venv=.venv
py=${PYTHON:-python3}
root=${PK_SYSROOT:-}

say() { printf 'setup: %s\n' "$*" >&2; }
die() { say "$*"; exit 1; }

# The libclang that bindgen (clang-sys) can load: libclang.so,
# libclang.so.N or libclang-N[.N].so[.N]. Not libclang-cpp.so.N (the C++
# interface, package libclang-cpp14), which bindgen cannot use: a glob
# `libclang*.so*` matching it is how a machine without libclang-dev once
# passed this check and then failed the quiche build.
find_libclang() {
    local dir f base
    local dirs=()
    [ -n "${LIBCLANG_PATH:-}" ] && [ -z "$root" ] && dirs+=("$LIBCLANG_PATH")
    for dir in "$root"/usr/lib/llvm-*/lib "$root"/usr/lib/*-linux-gnu \
        "$root"/lib/*-linux-gnu "$root"/usr/lib64 "$root"/usr/lib "$root"/usr/local/lib; do
        [ -d "$dir" ] && dirs+=("$dir")
    done
    for dir in "${dirs[@]}"; do
        for f in "$dir"/libclang*.so*; do
            [ -e "$f" ] || continue
            base=${f##*/}
            if [[ $base =~ ^libclang(-[0-9]+(\.[0-9]+)*)?\.so(\.[0-9]+)*$ ]]; then
                echo "$f"
                return 0
            fi
        done
    done
    return 1
}

first_line() { "$@" 2>&1 | head -n 1; }

# 1. System packages. The quiche build needs cmake, libclang (bindgen), a
#    C/C++ compiler and git; the test suite needs iproute2 and iptables for
#    its network-namespace tests.
missing=()
command -v cmake >/dev/null || missing+=(cmake)
command -v cc >/dev/null || missing+=(gcc)
command -v c++ >/dev/null || missing+=(g++)
command -v git >/dev/null || missing+=(git)
find_libclang >/dev/null || missing+=(libclang-dev)
if [ "$mode" != node ]; then
    command -v ip >/dev/null || missing+=(iproute2)
    command -v iptables >/dev/null || missing+=(iptables)
fi
"$py" -c 'import venv, ensurepip' 2>/dev/null || missing+=(python3-venv)
if [ "$action" = plan ]; then
    echo "${missing[*]}"
    exit 0
fi
if [ "$action" = check ]; then
    report() {  # name, found-or-empty
        if [ -n "$2" ]; then printf '  %-10s %s\n' "$1" "$2"; else printf '  %-10s MISSING\n' "$1"; fi
    }
    version_of() { command -v "$1" >/dev/null && first_line "$@" || true; }
    echo "polykey set-up check (what make node / make test need):"
    report python3 "$(version_of "$py" --version)"
    report venv "$("$py" -c 'import venv, ensurepip; print("ok")' 2>/dev/null || true)"
    report cargo "$(PATH="$HOME/.cargo/bin:$PATH" version_of cargo --version)"
    report cmake "$(version_of cmake --version)"
    report cc "$(version_of cc --version)"
    report c++ "$(version_of c++ --version)"
    report git "$(version_of git --version)"
    report libclang "$(find_libclang || true)"
    report ip "$(version_of ip -V)"
    report iptables "$(version_of iptables --version)"
    report node "$(version_of node --version)"
    report npm "$(version_of npm --version)"
    report .venv "$([ -x "$venv/bin/python" ] && "$venv/bin/python" -c 'import polykey.quic._quiche, polykey; print("polykey installed, quiche built")' 2>/dev/null || true)"
    if [ ${#missing[@]} -gt 0 ]; then
        echo "missing system packages: ${missing[*]} (make node / make test install them as root with apt-get)"
        exit 1
    fi
    echo "all system packages present"
    exit 0
fi
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

# 4. Peers from npm: for the test suite every package-lock.json under
#    tests/interop/ (one folder per peer); for the benchmarks bench/js, and
#    grpcio (a benchmark peer, never a dependency of the package).
locks=()
if [ "$mode" = test ]; then
    locks=(tests/interop/package-lock.json tests/interop/*/package-lock.json)
elif [ "$mode" = bench ]; then
    locks=(bench/js/package-lock.json)
    "$venv/bin/python" -c 'import grpc' 2>/dev/null \
        || { say "installing grpcio (benchmark peer)"; "$venv/bin/python" -m pip install -q grpcio; }
fi
if [ ${#locks[@]} -gt 0 ]; then
    for lock in "${locks[@]}"; do
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
