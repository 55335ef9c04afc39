"""Markdown tables of the decoding benchmark records, one table per dtype."""

from __future__ import annotations

HEADER = ("| model | mode | N / K | this project tok/s | transformers tok/s | ratio | compile s | "
          "peak RSS GB (ours / transformers) | roofline tok/s | roofline fraction (ours / transformers) |")


def _f(x, digits=1):
    return "–" if x is None else f"{x:.{digits}f}"


def tables(records: list[dict], machine_line: str) -> str:
    out = [machine_line, ""]
    for dtype in dict.fromkeys(r["dtype"] for r in records):
        out += [f"### {dtype}", "", HEADER, "|" + "---|" * HEADER.count(" | ") + "---|"]
        for r in (r for r in records if r["dtype"] == dtype):
            out.append(
                f"| {r['model']} | {r['mode']} | {r['n']} | {_f(r['tokens_per_s'])} | "
                f"{_f(r['baseline_tokens_per_s'])} | {_f(r['ratio'], 2)} | {_f(r['compile_s'])} | "
                f"{_f(r['peak_rss_gb'], 2)} / {_f(r.get('baseline_peak_rss_gb'), 2)} | "
                f"{_f(r.get('roofline_tokens_per_s'))} | {_f(r.get('roofline_fraction'), 2)} / "
                f"{_f(r.get('baseline_roofline_fraction'), 2)} |")
        blockwise = [r for r in records if r["dtype"] == dtype and r.get("vs_best_of_k") is not None]
        if blockwise:
            out.append("")
            for r in blockwise:
                out.append(f"Blockwise CD (K = {r['n']}, M = {r['block_size']}) on {r['model']} samples "
                           f"{_f(r['vs_best_of_k'] * 100, 0)}% of best-of-{r['n']}'s tokens/s.")
        out.append("")
    return "\n".join(out)
