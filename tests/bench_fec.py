#!/usr/bin/env python3
"""FEC codec throughput on one core: ours against the erasure-code libraries around.

A group is 10 data shards of 1400 bytes and 3 parity shards. encode = the 3 parity shards
from the 10 data shards; decode = the 3 lost data shards rebuilt from the 7 left and the
3 parity shards (the worst case at 10+3). MB/s count the group's data (14000 bytes), as
ISA-L and zfec report theirs, so the rows compare directly.

Rows:
  polevpn.kcp.gf256 avx2/ssse3/scalar  our C kernels through the Python API fec.py uses
                                   (matmul with the cached coefficient matrices)
  polevpn.kcp.gf256 python             the pure-Python fallback (no C compiler)
  FecSession                       the whole FEC layer: send() of 10 payloads of 1386
                                   bytes (a 1400-byte budget) and receive() of the 10
                                   shards left after losing 3 data shards; MB/s of payload
  pyeclib isa_l_rs_vand, liberasurecode_rs_vand, zfec, numpy tables, reedsolo
                                   when importable; measuring only, not dependencies

Not a pytest test (pytest collects only test_*.py). `python tests/bench_fec.py [--json]`;
`run()` returns the numbers for tests/bench.py.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from polevpn.kcp import fec, gf256

K, M, SHARD = 10, 3, 1400
LOST = (0, 4, 7)  # data shards lost in the decode runs
GROUP_BYTES = K * SHARD


def rate(fn: Callable[[], object], group_bytes: int, seconds: float) -> float:
    """MB/s of `fn`, one group per call: best of three runs of about seconds/3 each."""
    fn()  # warm caches (coefficient matrices, tables)
    n = 1
    while True:  # calibrate
        t = time.perf_counter()
        for _ in range(n):
            fn()
        dt = time.perf_counter() - t
        if dt > 0.02:
            break
        n *= 4
    per_run = max(1, int(n * (seconds / 3) / dt))
    best = float("inf")
    for _ in range(3):
        t = time.perf_counter()
        for _ in range(per_run):
            fn()
        best = min(best, time.perf_counter() - t)
    return per_run * group_bytes / best / 1e6


def ours(level: int | None, data: list[bytes], seconds: float) -> dict:
    if level is None:
        matmul = gf256.py_matmul
    else:
        gf256.set_simd(level)
        matmul = gf256.matmul
    parity = [bytearray(SHARD) for _ in range(M)]

    def encode() -> None:
        matmul(gf256.parity_matrix(K, M), M, data, parity, SHARD)

    encode()
    assert parity == gf256.encode(data, M)
    rows = tuple(range(len(LOST)))
    srcs = [parity[j] for j in rows] + [d for i, d in enumerate(data) if i not in LOST]
    out = [bytearray(SHARD) for _ in LOST]

    def decode() -> None:
        matmul(gf256.decode_matrix(K, LOST, rows), len(LOST), srcs, out, SHARD)

    decode()
    assert [bytes(o) for o in out] == [data[i] for i in LOST]
    return {
        "encode": rate(encode, GROUP_BYTES, seconds),
        "decode": rate(decode, GROUP_BYTES, seconds),
    }


def session(level: int, seconds: float) -> dict:
    """FecSession send and receive, per group of 10 payloads with 3 data shards lost."""
    gf256.set_simd(level)
    size = fec.max_payload(SHARD)
    payloads = [os.urandom(size) for _ in range(K)]
    cfg = fec.FecConfig(data_shards=K, parity_shards=M)
    tx = fec.FecSession(cfg)
    batches = []
    for _ in range(64):  # distinct groups: the receiver keeps state per group id
        out = [s for p in payloads for s in tx.send(p, 0.0)]
        batches.append([s for i, s in enumerate(out) if i not in LOST])
    sender = fec.FecSession(cfg)
    receiver = fec.FecSession(cfg)
    replay = 0

    def send() -> None:
        for p in payloads:
            sender.send(p, 0.0)

    def receive() -> None:
        nonlocal receiver, replay
        if replay == len(batches):  # replay the groups into a fresh receiver
            receiver = fec.FecSession(cfg)
            replay = 0
        n = 0
        for s in batches[replay]:
            n += len(receiver.receive(s, 0.0))
        assert n == K
        replay += 1

    group = K * size
    r_send = rate(send, group, seconds)
    r_recv = rate(receive, group, seconds)
    return {
        "send": r_send,
        "receive": r_recv,
        "send+receive": 1 / (1 / r_send + 1 / r_recv),
    }


def pyeclib_backend(name: str, data: list[bytes], seconds: float) -> dict | None:
    try:
        from pyeclib.ec_iface import ECDriver

        driver = ECDriver(k=K, m=M, ec_type=name)
    except Exception:
        return None
    blob = b"".join(data)
    frags = driver.encode(blob)
    left = [f for i, f in enumerate(frags) if i not in LOST]
    assert driver.decode(left) == blob
    return {
        "encode": rate(lambda: driver.encode(blob), GROUP_BYTES, seconds),
        "decode": rate(lambda: driver.decode(left), GROUP_BYTES, seconds),
    }


def zfec_codec(data: list[bytes], seconds: float) -> dict | None:
    try:
        import zfec
    except ImportError:
        return None
    enc, dec = zfec.Encoder(K, K + M), zfec.Decoder(K, K + M)
    parity_ids = list(range(K, K + M))
    parity = enc.encode(data, parity_ids)
    nums = [i for i in range(K) if i not in LOST] + parity_ids
    shares = [data[i] for i in nums[: K - len(LOST)]] + list(parity)
    assert [bytes(b) for b in dec.decode(shares, nums)] == data
    return {
        "encode": rate(lambda: enc.encode(data, parity_ids), GROUP_BYTES, seconds),
        "decode": rate(lambda: dec.decode(shares, nums), GROUP_BYTES, seconds),
    }


def numpy_tables(data: list[bytes], seconds: float) -> dict | None:
    """The obvious numpy version: one 256-entry table gather per coefficient."""
    try:
        import numpy as np
    except ImportError:
        return None
    tables = np.array([[gf256.mul(c, x) for x in range(256)] for c in range(256)], np.uint8)
    arr = np.frombuffer(b"".join(data), np.uint8).reshape(K, SHARD)

    def product(coefs: bytes, rows: int, srcs: np.ndarray) -> np.ndarray:
        cols = srcs.shape[0]
        out = np.zeros((rows, SHARD), np.uint8)
        for r in range(rows):
            for c in range(cols):
                out[r] ^= tables[coefs[r * cols + c]][srcs[c]]
        return out

    parity = product(gf256.parity_matrix(K, M), M, arr)
    assert [bytes(p) for p in parity] == [bytes(p) for p in gf256.encode(data, M)]
    rows = tuple(range(len(LOST)))
    srcs = np.concatenate([parity, np.delete(arr, LOST, axis=0)])
    dm = gf256.decode_matrix(K, LOST, rows)
    assert [bytes(r) for r in product(dm, len(LOST), srcs)] == [data[i] for i in LOST]
    return {
        "encode": rate(lambda: product(gf256.parity_matrix(K, M), M, arr), GROUP_BYTES, seconds),
        "decode": rate(lambda: product(dm, len(LOST), srcs), GROUP_BYTES, seconds),
    }


def reedsolo_codec(data: list[bytes], seconds: float) -> dict | None:
    """reedsolo codes one codeword at a time: one per byte column of the group (slow, so
    measured on a short run)."""
    try:
        from reedsolo import RSCodec
    except ImportError:
        return None
    rs = RSCodec(M)
    columns = [bytes(d[i] for d in data) for i in range(SHARD)]
    words = [rs.encode(c) for c in columns]
    damaged = []
    for w in words:
        w = bytearray(w)
        for i in LOST:
            w[i] = 0
        damaged.append(w)
    assert rs.decode(damaged[0], erase_pos=list(LOST))[0] == columns[0]

    def encode() -> None:
        for c in columns:
            rs.encode(c)

    def decode() -> None:
        for w in damaged:
            rs.decode(w, erase_pos=list(LOST))

    seconds = min(seconds, 0.5)
    return {
        "encode": rate(encode, GROUP_BYTES, seconds),
        "decode": rate(decode, GROUP_BYTES, seconds),
    }


def run(seconds: float = 0.6) -> dict:
    """Encode/decode MB/s per codec (None where a library is missing), and FecSession's."""
    data = [os.urandom(SHARD) for _ in range(K)]
    before = gf256.get_simd()
    codecs: dict[str, dict | None] = {}
    try:
        for level in reversed(gf256.simd_levels()):
            codecs[f"polevpn.kcp.gf256 {gf256.KERNELS[level]}"] = ours(level, data, seconds)
        codecs["polevpn.kcp.gf256 python"] = ours(None, data, seconds / 3)
        codecs["pyeclib isa_l_rs_vand"] = pyeclib_backend("isa_l_rs_vand", data, seconds)
        codecs["pyeclib liberasurecode_rs_vand"] = pyeclib_backend(
            "liberasurecode_rs_vand", data, seconds
        )
        codecs["zfec"] = zfec_codec(data, seconds)
        codecs["numpy tables"] = numpy_tables(data, seconds / 3)
        codecs["reedsolo"] = reedsolo_codec(data, seconds)
        sessions = {
            f"FecSession {gf256.KERNELS[level]}": session(level, seconds)
            for level in reversed(gf256.simd_levels())
        }
    finally:
        if before >= 0:
            gf256.set_simd(before)
    return {
        "group": f"{K}+{M} x {SHARD} B, decode rebuilds {len(LOST)} data shards",
        "unit": "MB/s of data",
        "codecs": codecs,
        "fec_session": sessions,
    }


def _fmt(mb_s: float) -> str:
    return f"{mb_s:9.0f}" if mb_s >= 10 else f"{mb_s:9.2f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seconds", type=float, default=0.6, help="per measurement")
    ap.add_argument("--json", action="store_true", help="print the numbers as JSON")
    args = ap.parse_args()
    res = run(args.seconds)
    if args.json:
        print(json.dumps(res, indent=2))
        return
    print(f"{res['group']}, one core, {res['unit']}")
    print(f"{'codec':34s} {'encode':>9s} {'decode':>9s}")
    for name, r in res["codecs"].items():
        if r is None:
            print(f"{name:34s} {'-':>9s} {'-':>9s}   (not installed)")
        else:
            print(f"{name:34s} {_fmt(r['encode'])} {_fmt(r['decode'])}")
    print()
    print(f"{'FEC layer (payload MB/s)':34s} {'send':>9s} {'receive':>9s} {'both':>9s}")
    for name, r in res["fec_session"].items():
        print(f"{name:34s} {r['send']:9.0f} {r['receive']:9.0f} {r['send+receive']:9.0f}")


if __name__ == "__main__":
    main()
