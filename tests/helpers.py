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
