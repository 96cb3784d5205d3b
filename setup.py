"""Declares the C extensions only; the package metadata lives in setup.cfg."""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "polevpn._gf256",
            sources=["polevpn/_gf256.c"],
            # portable build: the SSSE3/AVX2 kernels are chosen at run time, not by -march
            extra_compile_args=["-O3", "-std=c11"],
            # no compiler: polevpn.gf256 falls back to pure Python (slow, but it works)
            optional=True,
        ),
        Extension(
            # KCP (ikcp.c, vendored under polevpn/vendor/kcp, MIT) with a small wrapper.
            # Required: kcp:// has no pure-Python ARQ to fall back on.
            "polevpn._ikcp",
            sources=["polevpn/_ikcp.c"],
            depends=["polevpn/vendor/kcp/ikcp.c", "polevpn/vendor/kcp/ikcp.h"],
            extra_compile_args=["-O2", "-std=gnu11"],
        ),
    ],
)
