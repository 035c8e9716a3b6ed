"""Draw docs/img/async-throughput.svg from the figures of docs/performance.md.

    python3 docs/img/make_charts.py

No dependency: the chart is a few SVG rectangles. When you re-run the benchmark,
put its "ops/s" medians below and run this again.
"""

from __future__ import annotations

from pathlib import Path

#: ops/s medians of `benchmarks/bench_async.py` (5 rounds of 1.5 s), by concurrency.
FIGURES: dict[str, dict[int, float]] = {
    "raw asyncpg: acquire + fetchrow": {1: 3293, 32: 4921},
    "pool.connection()": {1: 2918, 32: 5170},
    "session_scope(readonly=True)": {1: 1662, 32: 3877},
    "session_scope()": {1: 851, 32: 1418},
    "bare AsyncSession + begin()": {1: 835, 32: 937},
}
COLOURS = {1: "#8ab4f8", 32: "#1a73e8"}
OURS = {"pool.connection()", "session_scope(readonly=True)", "session_scope()"}


def chart() -> str:
    """Return the SVG: one pair of horizontal bars per variant, ops/s at c=1 and c=32."""
    left, top, bar, gap, width = 270, 56, 16, 18, 420
    top_value = max(v for by_c in FIGURES.values() for v in by_c.values())
    height = top + len(FIGURES) * (2 * bar + gap) + 4
    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{left + width + 90}" height="{height}"'
        f' viewBox="0 0 {left + width + 90} {height}" font-family="sans-serif" font-size="13">',
        "<title>Async pool throughput: primary-key lookups per second</title>",
        f'<rect width="{left + width + 90}" height="{height}" fill="#ffffff"/>',
        '<text x="10" y="22" font-weight="bold">Primary-key lookups per second'
        " (higher is better)</text>",
    ]
    for i, c in enumerate(COLOURS):
        x = left + i * 150
        out.append(f'<rect x="{x}" y="31" width="12" height="12" fill="{COLOURS[c]}"/>')
        out.append(f'<text x="{x + 18}" y="42">{c} task{"s" if c > 1 else ""}</text>')
    y = top
    for name, by_c in FIGURES.items():
        weight = ' font-weight="bold"' if name in OURS else ""
        out.append(
            f'<text x="{left - 8}" y="{y + bar + 5}" text-anchor="end"{weight}>{name}</text>'
        )
        for c, value in by_c.items():
            w = value / top_value * width
            out.append(
                f'<rect x="{left}" y="{y}" width="{w:.1f}" height="{bar}" fill="{COLOURS[c]}"/>'
            )
            out.append(
                f'<text x="{left + w + 5:.1f}" y="{y + bar - 3}" font-size="12">{value:,.0f}</text>'
            )
            y += bar
        y += gap
    out.append(f'<line x1="{left}" y1="{top - 4}" x2="{left}" y2="{y - gap + 4}" stroke="#444"/>')
    out.append("</svg>")
    return "\n".join(out) + "\n"


if __name__ == "__main__":
    target = Path(__file__).with_name("async-throughput.svg")
    target.write_text(chart())
    print(f"wrote {target}")
