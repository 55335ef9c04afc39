"""Markdown tables of the decoding benchmark records, one table per dtype."""

from __future__ import annotations

HEADER = ("| model | mode | N / K | this project tok/s | transformers tok/s | ratio | compile s | "
          "peak RSS GB (ours / transformers) | roofline tok/s | roofline fraction (ours / transformers) |")


def _f(x, digits=1):
    return "–" if x is None else f"{x:.{digits}f}"


SCALING_MODES = ("plain", "bon4", "bon16", "bon64")


def scaling_table(records: list[dict], dtype: str) -> list[str]:
    """Tokens/s against N (plain = N 1, best-of-N above): the shared prefill and the wider batch
    make each branch cheaper as N grows; the last column shows by how much, on each side."""
    out = []
    for model in dict.fromkeys(r["model"] for r in records):
        rows = [r for r in records if r["model"] == model and r["dtype"] == dtype and r["mode"] in SCALING_MODES]
        if len(rows) < 2:
            continue
        rows.sort(key=lambda r: r["n"])
        one = rows[0]
        out += ["", f"N-scaling, {model} ({dtype}, {one['prompts']} prompts):", "",
                "| N | rows | this project tok/s | transformers tok/s | ratio | tok/s vs N = "
                f"{one['n']} (ours / transformers) |", "|---|---|---|---|---|---|"]
        for r in rows:
            gain_b = (r["baseline_tokens_per_s"] / one["baseline_tokens_per_s"]
                      if r["baseline_tokens_per_s"] and one["baseline_tokens_per_s"] else None)
            out.append(f"| {r['n']} | {r['rows']} | {_f(r['tokens_per_s'])} | {_f(r['baseline_tokens_per_s'])} | "
                       f"{_f(r['ratio'], 2)} | {_f(r['tokens_per_s'] / one['tokens_per_s'], 2)} / "
                       f"{_f(gain_b, 2)} |")
    return out


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
        out += scaling_table(records, dtype)
        out.append("")
    return "\n".join(out)
