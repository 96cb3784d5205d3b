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
        ),
    ],
)
