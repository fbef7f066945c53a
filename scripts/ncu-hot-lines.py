#!/usr/bin/env python3
"""Keeps what fits in a report of an Nsight Compute profile's CSV pages.

  ncu-hot-lines.py source <source.csv> [lines]
      The SASS lines with the most warp-stall samples per kernel (default 40), with their
      share of the kernel's samples: ncu's `--page source --print-source sass --csv` lists every
      line of every kernel, too large to bring back whole.
  ncu-hot-lines.py stalls <raw.csv>
      Per kernel, the warp-stall reasons (cycles per issued instruction) from `--page raw --csv`,
      largest first.
"""
import csv
import re
import sys


def source(path, keep):
    rows = list(csv.reader(open(path, newline="")))
    header, kernel = None, "?"
    sections = []
    for row in rows:
        if "Address" in row and "Source" in row:
            header = row
            sections.append((kernel, header, []))
        elif header is None or len(row) < len(header):
            kernel = " ".join(cell for cell in row if cell) or kernel
        else:
            sections[-1][2].append(row)
    if not sections:
        sys.exit(f"{path}: no table with Address and Source columns")
    # ncu prints a kernel's table twice (its source and SASS views agree): show each once.
    shown = set()
    for kernel, header, lines in sections:
        if (kernel, len(lines)) in shown:
            continue
        shown.add((kernel, len(lines)))
        sampled = [i for i, name in enumerate(header) if name.startswith("Warp Stall Sampling")]
        if not sampled:
            sys.exit(f"{path}: no Warp Stall Sampling column in {header}")
        total_col = sampled[0]
        value = lambda row: float(row[total_col].replace(",", "") or 0)
        total = sum(value(row) for row in lines) or 1.0
        print(f"== {kernel}: {len(lines)} SASS lines, {total:.0f} samples ({header[total_col]})")
        address, text = header.index("Address"), header.index("Source")
        for row in sorted(lines, key=value, reverse=True)[:keep]:
            extra = " ".join(f"{header[i]}={row[i]}" for i in sampled[1:])
            print(f"{row[address]:>8} {100 * value(row) / total:5.1f}%  {row[text]:<60} {extra}")


def stalls(path):
    rows = list(csv.reader(open(path, newline="")))
    if not rows or "Kernel Name" not in rows[0]:
        sys.exit(f"{path}: no raw page with a Kernel Name column")
    header = rows[0]
    pattern = re.compile(r"smsp__average_warps_issue_stalled_(\w+)_per_issue_active\.ratio$")
    columns = [(i, m.group(1)) for i, name in enumerate(header) if (m := pattern.match(name))]
    # How busy the tensor pipe and shared memory were, beside the stalls.
    busy = re.compile(r"^sm__pipe_(tensor|shared)_cycles_active\.avg\.pct_of_peak_sustained_active$")
    busy_columns = [(i, name) for i, name in enumerate(header) if busy.search(name)]
    name_col = header.index("Kernel Name")
    for row in rows[1:]:
        try:
            values = [(float(row[i].replace(",", "")), reason) for i, reason in columns]
        except ValueError:
            continue  # the units row
        values.sort(reverse=True)
        shown = ", ".join(f"{reason} {v:.2f}" for v, reason in values if v >= 0.05)
        print(f"{row[name_col]}: stalls per issued instruction: {shown}")
        for i, name in busy_columns:
            print(f"    {name} = {row[i]}")


if __name__ == "__main__":
    if len(sys.argv) < 3 or sys.argv[1] not in ("source", "stalls"):
        sys.exit(__doc__)
    if sys.argv[1] == "source":
        source(sys.argv[2], int(sys.argv[3]) if len(sys.argv) > 3 else 40)
    else:
        stalls(sys.argv[2])
