"""Does TLS record crypto scale across threads here? (``make bench`` section "second core").

OpenSSL runs without the GIL inside ``SSLObject.read``/``write``, so crypto on a worker
thread could use the second core. This measures what that could buy at best: TLS records of
64 KiB writes encrypted and decrypted through memory BIOs, in one thread and then split over
two, with nothing else in the way.
"""

from __future__ import annotations

import contextlib
import ssl
import sys
import tempfile
import threading
import time
from pathlib import Path

CHUNK = b"x" * 65536


def _contexts(keys) -> tuple[ssl.SSLContext, ssl.SSLContext]:
    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server.load_cert_chain(keys.server_cert, keys.server_key)
    client = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    client.check_hostname = False
    client.verify_mode = ssl.CERT_NONE
    return server, client


def _pair(server: ssl.SSLContext, client: ssl.SSLContext):
    c_in, c_out, s_in, s_out = (ssl.MemoryBIO() for _ in range(4))
    c = client.wrap_bio(c_in, c_out)
    s = server.wrap_bio(s_in, s_out, server_side=True)
    for _ in range(10):
        for end in (c, s):
            with contextlib.suppress(ssl.SSLWantReadError):
                end.do_handshake()
        s_in.write(c_out.read())
        c_in.write(s_out.read())
    return c, c_out, s, s_in


def _work(
    server: ssl.SSLContext, client: ssl.SSLContext, total: int, out: list | None = None
) -> None:
    c, c_out, s, s_in = _pair(server, client)
    if out is not None:
        out.append(f"{c.version()} {c.cipher()[0]}")
    done = 0
    while done < total:
        c.write(CHUNK)
        s_in.write(c_out.read())
        while True:
            try:
                s.read(1 << 18)
            except ssl.SSLWantReadError:
                break
        done += len(CHUNK)


def _once(server: ssl.SSLContext, client: ssl.SSLContext, total: int, cipher: list) -> tuple:
    t0 = time.perf_counter()
    _work(server, client, total, cipher)
    one = time.perf_counter() - t0
    threads = [threading.Thread(target=_work, args=(server, client, total // 2)) for _ in range(2)]
    t0 = time.perf_counter()
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    return one, time.perf_counter() - t0


def run(total: int = 256 << 20, repeat: int = 3) -> dict:
    """Median of ``repeat`` trials: one thread, then the same bytes over two threads."""
    from polevpn.keygen import generate

    keys = generate(Path(tempfile.mkdtemp(prefix="polevpn-crypto-")))
    server, client = _contexts(keys)
    cipher: list[str] = []
    trials = sorted(
        (_once(server, client, total, cipher) for _ in range(repeat)), key=lambda t: t[0] / t[1]
    )
    one, two = trials[len(trials) // 2]
    return {
        "cipher": cipher[0],
        "one_thread_mb_s": round(total / one / 1e6),
        "two_threads_mb_s": round(total / two / 1e6),
        "speedup": round(one / two, 2),
        "trials": [round(a / b, 2) for a, b in trials],
    }


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    print(run())
