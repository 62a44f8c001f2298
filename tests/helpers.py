"""Small helpers shared by the tests (pytest puts this folder on sys.path)."""

import torch

import multihead_nb as mh


def make_ws(**kw):
    """A CPU float32 workspace with small pages, engine inline (deterministic stepping)."""
    kw.setdefault("device", "cpu")
    kw.setdefault("dtype", "float32")
    kw.setdefault("pool", "8MiB")
    kw.setdefault("page_bytes", "8KiB")
    kw.setdefault("background", False)
    return mh.Workspace(**kw)


def tight_pool(model_path, kv_pages, page_bytes=4096):
    """A pool size holding the model's float32 weights plus `kv_pages` pages of K/V."""
    from multihead_nb.backends.native import read_spec

    w = read_spec(model_path).weight_bytes(torch.float32)
    return (-(-w // page_bytes) + kv_pages) * page_bytes


def neon_build(isa: str, driver):
    """(qemu, executable): C `driver` (it includes cpu_decode.c) built for aarch64 with `isa`'s flags ("neon+dotprod"
    or "neon") and OpenMP, as the library is built, by Debian's cross compiler, to run under qemu-user; skips the
    test where those are missing (.ci/run installs them)."""
    import shutil

    import pytest

    from multihead_nb.backends.native.cpu_isa import isa_flags
    from multihead_nb.backends.native.cpu_kernel import COMMON_FLAGS, CSRC, compile_c

    cc = shutil.which("aarch64-linux-gnu-gcc")
    qemu = shutil.which("qemu-aarch64-static") or shutil.which("qemu-aarch64")
    if not cc or not qemu:
        pytest.skip("no aarch64 cross compiler or qemu-user (apt-get install gcc-aarch64-linux-gnu qemu-user-static)")
    feats = frozenset({"asimd", "asimddp"} if isa == "neon+dotprod" else {"asimd"})
    flags = COMMON_FLAGS + isa_flags("neon", "aarch64", feats) + ("-fopenmp", "-static", f"-I{CSRC}")
    return qemu, compile_c(flags, f"{driver.stem}-{isa}", cc=cc, sources=(driver,))
