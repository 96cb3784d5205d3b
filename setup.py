"""Declares the C extensions only; the package metadata lives in setup.cfg."""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "polevpn.kcp._gf256",
            sources=["polevpn/kcp/_gf256.c"],
            # portable build: the SSSE3/AVX2 kernels are chosen at run time, not by -march
            extra_compile_args=["-O3", "-std=c11"],
            # no compiler: polevpn.kcp.gf256 falls back to pure Python (slow, but it works)
            optional=True,
        ),
        Extension(
            # KCP (ikcp.c, vendored under polevpn/kcp/vendor/kcp, MIT) with a small wrapper.
            # Required: kcp:// has no pure-Python ARQ to fall back on.
            "polevpn.kcp._ikcp",
            sources=["polevpn/kcp/_ikcp.c"],
            depends=["polevpn/kcp/vendor/kcp/ikcp.c", "polevpn/kcp/vendor/kcp/ikcp.h"],
            extra_compile_args=["-O2", "-std=gnu11"],
            # A resent segment counts as skipped only by ACKs of segments sent after it (as
            # kcp-go does). ikcp's default counts every later ACK, so after a loss it resends
            # the same segment again every couple of ACKs up to fastlimit: on a rate-limited
            # line those copies took the place of new data (12.9 vs Go's 15.9 Mbit/s at 5%
            # loss on 30 Mbit/s, 1.8 wire bytes per payload byte; with this 17.3, 1.4 -- see
            # docs/interop.md). Nothing changes on the wire but when a resend goes out.
            define_macros=[("IKCP_FASTACK_CONSERVE", "1")],
        ),
    ],
)
