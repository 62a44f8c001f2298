"""A live page map: an anywidget drawing every page of the pool as a coloured cell (owner head, weights, shared,
cached, free), with a hover title per cell.

Owns: the compact wire format of a pages frame (columns of small ints plus a label table), the widget's browser
code, and `.data` (the frame back, equal to `ws.pages()` after `refresh()`). Knows nothing of threads or the
engine: whoever owns the widget calls `refresh()` (the dashboard does, ~10 times a second).
"""

from __future__ import annotations

import anywidget
import pandas as pd
import traitlets

from .figures import STATE_COLORS, head_colors

COLUMNS = ["page", "state", "owner", "holders", "model", "tokens", "shared"]
_LABELLED = ("state", "owner", "holders", "model")  # string columns sent as indices into `labels`

_ESM = r"""
function render({ model, el }) {
  const root = document.createElement("div");
  root.className = "mh-page-map";
  const legend = document.createElement("div");
  legend.className = "mh-legend";
  const grid = document.createElement("div");
  grid.className = "mh-grid";
  root.append(legend, grid);
  el.appendChild(root);
  const seen = new Set();  // heads seen holding K/V pages since this view opened
  function draw() {
    const p = model.get("pages"), labels = model.get("labels"), colors = model.get("colors");
    const cols = model.get("columns"), n = (p.page || []).length;
    grid.style.gridTemplateColumns = `repeat(${cols}, 12px)`;
    while (grid.children.length > n) grid.removeChild(grid.lastChild);
    while (grid.children.length < n) { const c = document.createElement("div"); c.className = "mh-page"; grid.appendChild(c); }
    const counts = {};
    for (let i = 0; i < n; i++) {
      const c = grid.children[i], state = labels[p.state[i]], owner = p.owner[i] == null ? "" : labels[p.owner[i]];
      const shared = p.shared[i] > 1, key = state === "kv" ? owner : state;
      c.dataset.page = p.page[i]; c.dataset.state = state; c.dataset.owner = owner; c.dataset.shared = shared ? "1" : "0";
      c.style.background = colors[key] || "#999";
      c.style.outline = shared ? "2px solid #000" : "none";
      const model_ = p.model[i] == null ? "-" : labels[p.model[i]];
      c.title = `page ${p.page[i]} · ${state} · head ${owner || "-"} · model ${model_} · tokens ${p.tokens[i]}` +
        (shared ? ` · shared by ${p.shared[i]}` : "");
      counts[key] = (counts[key] || 0) + 1;
      if (state === "kv" && owner) seen.add(owner);
    }
    legend.innerHTML = "";
    for (const [k, v] of Object.entries(counts)) {
      const s = document.createElement("span");
      s.className = "mh-legend-item"; s.dataset.key = k; s.dataset.count = v;
      s.innerHTML = `<i style="background:${colors[k] || "#999"}"></i>${k}: ${v}`;
      legend.appendChild(s);
    }
    root.dataset.pages = n;
    root.dataset.seenOwners = [...seen].sort().join(",");
  }
  model.on("change:pages", draw);
  model.on("change:colors", draw);
  model.on("change:columns", draw);
  draw();
}
export default { render };
"""

_CSS = """
.mh-page-map { font: 12px sans-serif; }
.mh-grid { display: grid; gap: 1px; }
.mh-page { width: 12px; height: 12px; border-radius: 2px; outline-offset: -2px; }
.mh-legend { margin-bottom: 4px; }
.mh-legend-item { margin-right: 10px; white-space: nowrap; }
.mh-legend-item i { display: inline-block; width: 10px; height: 10px; margin-right: 3px; border-radius: 2px; }
"""


def encode_pages(df: pd.DataFrame) -> tuple[dict, list]:
    """A pages frame -> ({column: list}, labels): string columns become indices into `labels` (None stays None)."""
    labels: list = []
    index: dict = {}
    cols = {}
    for c in COLUMNS:
        values = df[c].tolist() if c in df else [None] * len(df)
        if c in _LABELLED:
            out = []
            for v in values:
                if v is None or (isinstance(v, float) and v != v):
                    out.append(None)
                    continue
                if v not in index:
                    index[v] = len(labels)
                    labels.append(v)
                out.append(index[v])
            values = out
        else:
            values = [int(v) for v in values]
        cols[c] = values
    return cols, labels


def decode_pages(cols: dict, labels: list) -> pd.DataFrame:
    data = {c: [None if v is None else labels[v] for v in cols.get(c, [])] if c in _LABELLED else list(cols.get(c, []))
            for c in COLUMNS}
    return pd.DataFrame(data, columns=COLUMNS)


class PageMap(anywidget.AnyWidget):
    """`PageMap(ws)`; `refresh()` reads `ws.pages()`; `.data` is the frame it shows."""

    _esm = _ESM
    _css = _CSS
    pages = traitlets.Dict().tag(sync=True)
    labels = traitlets.List().tag(sync=True)
    colors = traitlets.Dict().tag(sync=True)
    columns = traitlets.Int(32).tag(sync=True)

    def __init__(self, ws=None, columns: int | None = None, **kwargs):
        super().__init__(**kwargs)
        self._ws = ws
        if columns:
            self.columns = columns
        if ws is not None:
            self.refresh()

    def refresh(self, pages_df: pd.DataFrame | None = None) -> bool:
        """Show `pages_df` (default: the workspace's pages now); returns whether anything changed."""
        df = self._ws.pages() if pages_df is None else pages_df
        cols, labels = encode_pages(df)
        if cols == self.pages and labels == self.labels:
            return False
        owners = list(self._ws.heads) if self._ws is not None else [o for o in df["owner"].tolist() if o != "weights"]
        colors = {**STATE_COLORS, "kv": "#999999", **head_colors(owners)}
        if not self.columns or len(df) > self.columns * 64:
            self.columns = max(32, min(128, len(df) // 48))
        with self.hold_sync():
            self.labels = labels
            self.pages = cols
            if colors != self.colors:
                self.colors = colors
        return True

    @property
    def data(self) -> pd.DataFrame:
        """The pages frame this widget shows (same columns and values as `ws.pages()`)."""
        return decode_pages(self.pages, self.labels)
