"""Command-line entry points: ``polevpn-router`` and ``polevpn-gateway``.

Both accept PoleVPN's Go-style flags (``-configPath=FILE``, ``-config FILE``) as well as
``--config FILE``. A bad config ends start-up with one line and exit status 2.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
from collections.abc import Awaitable, Callable, Coroutine, Mapping
from typing import TYPE_CHECKING, Any, TypeVar

from polevpn import __version__
from polevpn.common.logfmt import kv
from polevpn.config import (
    ConfigError,
    GatewayConfig,
    RouterConfig,
    configure_logging,
    load_gateway_config,
    load_router_config,
)
from polevpn.config.reloading import ReloadError
from polevpn.host import privileges

if TYPE_CHECKING:
    from polevpn.gateway.gateway import Gateway
    from polevpn.ops.api import ApiServer
    from polevpn.ops.metrics import MetricsServer
    from polevpn.router.router import Router

EXIT_CONFIG = 2


def _parse(prog: str, argv: list[str] | None, default: str) -> str:
    parser = argparse.ArgumentParser(prog=prog, allow_abbrev=False)
    parser.add_argument(
        "-configPath",
        "-config",
        "--config",
        "--configPath",
        dest="config",
        default=default,
        metavar="FILE",
        help=f"configuration file (default: {default})",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    return parser.parse_args(argv).config


C = TypeVar("C", RouterConfig, GatewayConfig)


def _load(prog: str, argv: list[str] | None, default: str, loader: Callable[[str], C]) -> C | None:
    """Parse flags and config; on a bad config print one line and return None."""
    path = _parse(prog, argv, default)
    try:
        cfg = loader(path)
    except ConfigError as exc:
        print(f"{prog}: {exc}", file=sys.stderr)
        return None
    configure_logging(cfg.log_level)
    return cfg


# glibc malloc tunables, set in the daemon's own environment at start-up
MMAP_THRESHOLD = 4 << 20
TRIM_THRESHOLD = 32 << 20
MALLOC_TUNABLES = (
    f"glibc.malloc.mmap_threshold={MMAP_THRESHOLD}:glibc.malloc.trim_threshold={TRIM_THRESHOLD}"
)


def malloc_tunables(environ: Mapping[str, str], libc: str) -> str | None:
    """The GLIBC_TUNABLES value to start again with, or None to run as we are.

    Keeps the data path's 64 KiB-1 MiB buffers on the heap instead of fresh mmaps: glibc
    serves large allocations with mmap and gives them back at free, so every super-packet,
    join and TLS read paid page faults and page zeroing (measured: the tls:// tunnel went
    from about 1.7 to 2.5 Gbit/s). The trim threshold bounds the freed heap kept. Set
    through the environment at start-up (glibc reads it before the first allocation), not
    by ``mallopt`` at run time, which also retuned any process that ran the daemon's code
    in-process, the test suite's included. An operator's own malloc tunables win.
    """
    if libc != "glibc":
        return None
    current = environ.get("GLIBC_TUNABLES", "")
    if "glibc.malloc.mmap_threshold" in current or "glibc.malloc.trim_threshold" in current:
        return None
    return f"{current}:{MALLOC_TUNABLES}" if current else MALLOC_TUNABLES


def _start_tuned(which: str) -> None:
    """Start the daemon again, once, as ``python -m polevpn.cli WHICH ARGS`` with the malloc
    tunables in its environment (same PID, so a service manager sees nothing). The units
    under router/ and gateway/ set GLIBC_TUNABLES themselves, which skips this."""
    import platform

    value = malloc_tunables(os.environ, platform.libc_ver()[0])
    if value is None:
        return
    env = dict(os.environ, GLIBC_TUNABLES=value)
    # -P: never import from the working directory (the gateway runs as root)
    argv = [sys.executable, "-P", "-m", "polevpn.cli", which, *sys.argv[1:]]
    try:
        os.execve(sys.executable, argv, env)
    except OSError:  # run untuned rather than not at all
        return


def _run(main: Callable[[], Coroutine[Any, Any, int]]) -> int:
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency; keep running without it
        return asyncio.run(main())
    return uvloop.run(main())


def _install_stop(stop: Callable[[], None]) -> None:
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop)


def _install_reload(reload: Callable[[], Awaitable[object]], log: logging.Logger) -> None:
    """SIGHUP re-reads the config; a bad one is logged and the running one stays."""
    tasks: set[asyncio.Task] = set()

    async def run() -> None:
        try:
            await reload()
        except (ConfigError, ReloadError) as exc:
            log.error("reload failed, keeping the running config", extra=kv(error=exc))
        except Exception:
            log.exception("reload failed, keeping the running config")

    def on_hup() -> None:
        task = asyncio.get_running_loop().create_task(run())
        tasks.add(task)  # the loop keeps only a weak reference
        task.add_done_callback(tasks.discard)

    asyncio.get_running_loop().add_signal_handler(signal.SIGHUP, on_hup)


# -- the daemons with their operations servers: the only place that knows both


class RouterDaemon:
    """The router with its /metrics and REST API, which read it through its read model
    (``polevpn.router.view``) and reload it through the router's ``reload`` alone.

    The router opens them (``Router.start``'s services) once its listeners are up and
    before it drops privileges, and closes them when it stops.
    """

    def __init__(self, cfg: RouterConfig) -> None:
        from polevpn.router.router import Router

        self.router: Router = Router(cfg)
        self.metrics: MetricsServer | None = None
        self.api: ApiServer | None = None

    async def start(self) -> None:
        await self.router.start(services=(self,))

    async def stop(self) -> None:
        await self.router.stop()

    async def open(self) -> None:
        from polevpn.ops import api, metrics
        from polevpn.router import view

        router = self.router
        cfg = router.cfg

        def snapshot() -> view.RouterView:
            return view.snapshot(router)

        # the tokens of the moment: a reload that changes them applies at once
        if cfg.metrics_listen is not None:
            self.metrics = await metrics.serve(
                metrics.router_registry(snapshot),
                cfg.metrics_listen,
                lambda: router.cfg.metrics_token,
            )
        if cfg.api_listen is not None:
            self.api = await api.serve(
                snapshot, lambda: router.cfg.api_token, router, cfg.api_listen
            )

    def close(self) -> None:
        if self.metrics is not None:
            self.metrics.close()
        if self.api is not None:
            self.api.close()


class GatewayDaemon:
    """The gateway with its /metrics, which reads it through its read model
    (``polevpn.gateway.view``). The gateway opens it once the TUN and the host are set up,
    and closes it when it stops."""

    def __init__(self, cfg: GatewayConfig) -> None:
        from polevpn.gateway.gateway import Gateway

        self.gateway: Gateway = Gateway(cfg)
        self.metrics: MetricsServer | None = None

    async def run(self) -> None:
        await self.gateway.run(services=(self,))

    async def open(self) -> None:
        from polevpn.gateway import view
        from polevpn.ops import metrics

        gw = self.gateway
        if gw.cfg.metrics_listen is not None:
            self.metrics = await metrics.serve(
                metrics.gateway_registry(lambda: view.snapshot(gw)),
                gw.cfg.metrics_listen,
                lambda: gw.cfg.metrics_token,
            )

    def close(self) -> None:
        if self.metrics is not None:
            self.metrics.close()


def router_main(argv: list[str] | None = None) -> int:
    cfg = _load("polevpn-router", argv, "config.json", load_router_config)
    if cfg is None:
        return EXIT_CONFIG
    from polevpn.router.router import TunSetupError

    async def main() -> int:
        daemon = RouterDaemon(cfg)
        router = daemon.router
        done = asyncio.Event()
        try:
            await daemon.start()
        except TunSetupError as exc:
            logging.getLogger("polevpn.router").error("fatal", extra=kv(error=exc.strerror))
            return 1
        except OSError as exc:
            logging.getLogger("polevpn.router").error(
                "cannot listen", extra=kv(address=cfg.tls.address, error=exc.strerror or exc)
            )
            return 1
        _install_stop(done.set)

        async def reload() -> None:
            router.reload()

        _install_reload(reload, logging.getLogger("polevpn.router"))
        await done.wait()
        await daemon.stop()
        return 0

    return _run(main)


def gateway_main(argv: list[str] | None = None) -> int:
    cfg = _load("polevpn-gateway", argv, "gateway.json", load_gateway_config)
    if cfg is None:
        return EXIT_CONFIG
    from polevpn.gateway.gateway import FatalError

    log = logging.getLogger("polevpn.gateway")
    if os.geteuid() == 0:
        # before the event loop starts any thread: capabilities are per thread
        try:
            privileges.keep_only(privileges.CAP_NET_ADMIN)
        except OSError as exc:
            log.error("cannot drop capabilities", extra=kv(error=exc))
            return 1
        log.info("running as root with CAP_NET_ADMIN only")

    async def main() -> int:
        daemon = GatewayDaemon(cfg)
        gw = daemon.gateway
        _install_stop(gw.stop)
        _install_reload(gw.reload, log)
        try:
            await daemon.run()
        except FatalError as exc:
            log.error("fatal", extra=kv(error=exc))
            return 1
        return 0

    return _run(main)


def router_entry() -> None:
    _start_tuned("router")
    raise SystemExit(router_main())


def gateway_entry() -> None:
    _start_tuned("gateway")
    raise SystemExit(gateway_main())


def main() -> None:  # pragma: no cover - ``python -m polevpn.cli router|gateway``
    if len(sys.argv) < 2 or sys.argv[1] not in ("router", "gateway"):
        print("usage: python -m polevpn.cli router|gateway -configPath=FILE", file=sys.stderr)
        raise SystemExit(2)
    which = sys.argv.pop(1)
    _start_tuned(which)
    raise SystemExit(router_main() if which == "router" else gateway_main())


if __name__ == "__main__":
    main()
