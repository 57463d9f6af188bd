#!/usr/bin/env bash
# Re-creates the ClientHello captures in this directory (see README.md).
#
# Each capture points a real TLS client at a one-shot listener on 127.0.0.1:0 (the
# capture_client_hello example), which stores the first flight the client sends. Names
# resolve to 127.0.0.1 through each client's own override (curl --resolve, openssl
# -connect with -servername, Chromium --host-resolver-rules), so nothing leaves loopback.
#
# Usage: edge/testdata/capture.sh [capture-name ...]   (default: all; chromium only if installed)
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(cd "$here/../.." && pwd)"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT

cargo build --quiet --manifest-path "$root/Cargo.toml" -p edgible-edge --example capture_client_hello
tool="$root/target/debug/examples/capture_client_hello"

# capture NAME CLIENT-COMMAND...: runs the client against a fresh listener; the literal word
# PORT in the command is replaced by the listener's port.
capture() {
    local name="$1"
    shift
    local port_file="$work/$name.port"
    timeout 60 "$tool" listen --out "$here/$name.bin" --port-file "$port_file" &
    local listener=$!
    for _ in $(seq 1 200); do
        [[ -s "$port_file" ]] && break
        sleep 0.05
    done
    local port
    port="$(cat "$port_file")"
    local args=()
    for arg in "$@"; do
        args+=("${arg//PORT/$port}")
    done
    # The handshake is cut off after the ClientHello, so the client is expected to fail.
    timeout 45 "${args[@]}" </dev/null >"$work/$name.client.log" 2>&1 || true
    wait "$listener"
}

wanted() {
    [[ ${#selected[@]} -eq 0 ]] && return 0
    local item
    for item in "${selected[@]}"; do
        [[ "$item" == "$1" ]] && return 0
    done
    return 1
}
selected=("$@")

if wanted curl; then
    capture curl curl -sS --max-time 20 --resolve app.example.test:PORT:127.0.0.1 https://app.example.test:PORT/
fi
if wanted curl-tls12; then
    capture curl-tls12 curl -sS --max-time 20 --tls-max 1.2 --http1.1 \
        --resolve legacy.example.test:PORT:127.0.0.1 https://legacy.example.test:PORT/
fi
if wanted curl-no-sni; then
    # curl sends no server_name for an IP literal (RFC 6066 forbids addresses in SNI).
    capture curl-no-sni curl -sS --max-time 20 https://127.0.0.1:PORT/
fi
if wanted openssl; then
    capture openssl openssl s_client -connect 127.0.0.1:PORT -servername api.example.test -alpn h2,http/1.1
fi
if wanted openssl-tls12; then
    capture openssl-tls12 openssl s_client -connect 127.0.0.1:PORT -tls1_2 -servername tls12.example.test
fi
if wanted openssl-mixed-case; then
    capture openssl-mixed-case openssl s_client -connect 127.0.0.1:PORT -servername MiXeD.Example.TEST
fi
if wanted openssl-trailing-dot; then
    capture openssl-trailing-dot openssl s_client -connect 127.0.0.1:PORT -servername dot.example.test.
fi
if wanted openssl-no-sni; then
    capture openssl-no-sni openssl s_client -connect 127.0.0.1:PORT -noservername
fi
if wanted rustls; then
    "$tool" rustls --out "$here/rustls.bin" --server-name rustls.example.test
fi
if wanted rustls-no-sni; then
    "$tool" rustls --out "$here/rustls-no-sni.bin" --server-name rustls.example.test --no-sni
fi
if wanted chromium; then
    if command -v chromium >/dev/null; then
        profile="$work/chromium-profile"
        mkdir -p "$profile"
        capture chromium chromium --headless --no-sandbox --disable-gpu --disable-quic --no-first-run \
            --disable-background-networking --disable-component-update --disable-sync \
            --user-data-dir="$profile" --host-resolver-rules="MAP * 127.0.0.1" \
            --dump-dom https://www.example.test:PORT/
    else
        echo "chromium is not installed; keeping the committed chromium.bin" >&2
    fi
fi
