#!/usr/bin/env python3
"""Copies a wasm module without the proxy-wasm callbacks an HTTP filter never receives.

usage: wasm-unexport.py IN OUT

The Rust SDK exports every callback of the ABI, so the module carries its dispatch code for
network filters, gRPC calls and streams, shared queues and foreign functions: handoff uses none
of them, and the host calls a callback only when the module exports it. Without the exports,
wasm-opt drops the code that only they reached (about 6 KB). Python's standard library only.
"""

import sys

# Callbacks of the proxy-wasm ABI 0.2.1 that an HTTP filter making no gRPC calls, registering
# no shared queue and calling no foreign function is never sent.
UNUSED = {
    "proxy_on_new_connection",
    "proxy_on_downstream_data",
    "proxy_on_upstream_data",
    "proxy_on_downstream_connection_close",
    "proxy_on_upstream_connection_close",
    "proxy_on_grpc_receive_initial_metadata",
    "proxy_on_grpc_receive",
    "proxy_on_grpc_receive_trailing_metadata",
    "proxy_on_grpc_close",
    "proxy_on_queue_ready",
    "proxy_on_foreign_function",
}

EXPORT_SECTION = 7


def leb(data, i):
    """An unsigned LEB128 at i: (value, index after it)."""
    value = shift = 0
    while True:
        byte = data[i]
        i += 1
        value |= (byte & 0x7F) << shift
        shift += 7
        if byte < 0x80:
            return value, i


def to_leb(n):
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def without_exports(data, names):
    if data[:4] != b"\0asm":
        sys.exit("wasm-unexport: not a wasm module")
    out, pos = bytearray(data[:8]), 8
    while pos < len(data):
        section = data[pos]
        size, start = leb(data, pos + 1)
        end = start + size
        if section == EXPORT_SECTION:
            count, i = leb(data, start)
            kept = []
            for _ in range(count):
                entry = i
                length, i = leb(data, i)
                name = data[i:i + length].decode()
                i += length + 1  # the name, then the kind byte
                _, i = leb(data, i)  # the index
                if name not in names:
                    kept.append(data[entry:i])
            body = to_leb(len(kept)) + b"".join(kept)
            out += bytes([EXPORT_SECTION]) + to_leb(len(body)) + body
        else:
            out += data[pos:end]
        pos = end
    return bytes(out)


def main():
    if len(sys.argv) != 3:
        sys.exit(__doc__.strip().splitlines()[2])
    with open(sys.argv[1], "rb") as f:
        data = f.read()
    with open(sys.argv[2], "wb") as f:
        f.write(without_exports(data, UNUSED))


if __name__ == "__main__":
    main()
