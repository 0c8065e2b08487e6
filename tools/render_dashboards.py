#!/usr/bin/env python3
"""Draws dlpipe's Grafana dashboards as PNG from a real Prometheus, panel by panel.

Every panel of grafana/dashboards/*.json is queried over the last --minutes through Prometheus'
HTTP API (query_range for time series, an instant query for stat panels) with the Grafana
variables set as in tests/observability.rs, and drawn in the dashboard's own grid layout. It is
what Grafana would show, for a README or a report, with no Grafana installed:

    scripts/prometheus start          # scraping dlpipe's /metrics (127.0.0.1:9898)
    make demo                         # or any `dlpipe run`
    .venv/bin/python tools/render_dashboards.py --minutes 10 --out docs/images

Panels marked "requires GPU" are drawn empty on a machine without one, and say so.
"""
import argparse
import json
import re
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
VARIABLES = {"$__rate_interval": "1m", "$instance": ".*"}


def query(base: str, path: str, params: dict) -> list:
    url = f"{base}/api/v1/{path}?{urllib.parse.urlencode(params)}"
    with urllib.request.urlopen(url, timeout=30) as r:
        answer = json.load(r)
    if answer.get("status") != "success":
        raise RuntimeError(f"{url}: {answer}")
    return answer["data"]["result"]


def legend(fmt: str, labels: dict) -> str:
    text = re.sub(r"\{\{\s*(\w+)\s*\}\}", lambda m: labels.get(m.group(1), ""), fmt or "")
    return text or ",".join(f"{k}={v}" for k, v in labels.items() if k not in ("__name__", "job", "instance")) or "value"


def substitute(expr: str) -> str:
    for name, value in VARIABLES.items():
        expr = expr.replace(name, value)
    return expr


def render(dashboard_path: Path, base: str, minutes: float, out: Path) -> Path:
    dashboard = json.loads(dashboard_path.read_text())
    panels = [p for p in dashboard["panels"] if p.get("targets")]
    end = time.time()
    start = end - minutes * 60
    step = max(1.0, minutes * 60 / 300)
    rows = max(p["gridPos"]["y"] + p["gridPos"]["h"] for p in panels)
    # Grafana's grid: 24 columns, rows of 30 px.
    fig = plt.figure(figsize=(18, rows * 0.42 + 1.0), dpi=80)
    fig.suptitle(f"{dashboard['title']}: the last {minutes:g} minutes (x axis: minutes ago) from {base}", fontsize=14)
    grid = fig.add_gridspec(rows, 24, hspace=4.0, wspace=1.5, top=1 - 0.9 / (rows * 0.42 + 1.0), bottom=0.03)
    for panel in panels:
        g = panel["gridPos"]
        ax = fig.add_subplot(grid[g["y"] : g["y"] + g["h"], g["x"] : g["x"] + g["w"]])
        unit = panel.get("fieldConfig", {}).get("defaults", {}).get("unit", "")
        ax.set_title(panel["title"] + (f"  [{unit}]" if unit and unit != "short" else ""), fontsize=10, loc="left")
        ax.tick_params(labelsize=7)
        gpu_only = "requires gpu" in panel.get("description", "").lower()
        drew = False
        if panel["type"] == "stat":
            ax.set_axis_off()
            texts = []
            for t in panel["targets"]:
                for series in query(base, "query", {"query": substitute(t["expr"]), "time": end}):
                    texts.append(f"{float(series['value'][1]):.4g}  {legend(t.get('legendFormat', ''), series['metric'])}")
            if texts:
                drew = True
                ax.text(0.02, 0.5, "\n".join(texts[:4]), fontsize=16 if len(texts) == 1 else 10, va="center", transform=ax.transAxes)
        else:
            for t in panel["targets"]:
                params = {"query": substitute(t["expr"]), "start": start, "end": end, "step": step}
                for series in query(base, "query_range", params):
                    xs = [(float(v[0]) - end) / 60 for v in series["values"]]
                    ys = [float(v[1]) for v in series["values"]]
                    ax.plot(xs, ys, linewidth=1.2, label=legend(t.get("legendFormat", ""), series["metric"]))
                    drew = True
            ax.set_xlim(-minutes, 0)
            ax.grid(alpha=0.3)
            if drew:
                handles, labels = ax.get_legend_handles_labels()
                ax.legend(handles[:8], labels[:8], fontsize=6, loc="upper left")
        if not drew:
            ax.text(0.5, 0.5, "no data (requires GPU)" if gpu_only else "no data", ha="center", va="center",
                    transform=ax.transAxes, color="gray")
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"dashboard-{dashboard['uid']}.png"
    fig.savefig(path)
    plt.close(fig)
    return path


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prometheus", default="http://127.0.0.1:9090")
    ap.add_argument("--minutes", type=float, default=15)
    ap.add_argument("--out", type=Path, default=ROOT / "docs/images")
    ap.add_argument("dashboards", nargs="*", type=Path)
    args = ap.parse_args()
    paths = args.dashboards or sorted((ROOT / "grafana/dashboards").glob("*.json"))
    for path in paths:
        print(render(path, args.prometheus.rstrip("/"), args.minutes, args.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
