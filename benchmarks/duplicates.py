"""How often a global batch repeats a text, with and without ``data.no_duplicates``.

On the built-in InsuranceQA training rows (a question with several answers is several rows; the
negatives come from the questions' candidate pools), one epoch of gist-ray's global batches is
planned both ways (``gist_ray.data.batches.GlobalBatches``, what training uses) and every batch is
counted:

- repeated texts: text slots (anchor, positive, negative of every row) whose text already
  appears in the batch, as a share of all slots;
- batches with any repeat;
- rows with a false negative: rows whose positive text is also another candidate of the batch
  (another row's positive, anchor or negative). The guide cannot mask it: its guide similarity
  equals the row's threshold, and masking needs a strictly higher one.

Usage: python benchmarks/duplicates.py [--batch 2048] [--rows 0] [--out FILE.json]
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import platform
import time
from collections import Counter
from pathlib import Path

import numpy as np


def false_negative_rows(ids: np.ndarray) -> int:
    """Rows whose positive id appears elsewhere among the batch's candidates."""
    counts = Counter(ids.reshape(-1).tolist())
    return int(sum(counts[p] > 1 for p in ids[:, 1].tolist()))


def measure(texts: list[list[str]], batch: int, no_duplicates: bool, seed: int) -> dict:
    from gist_ray.data.batches import GlobalBatches, ListSource, duplicates, text_ids

    t0 = time.perf_counter()
    source = ListSource("insuranceqa", texts)
    gb = GlobalBatches([source], batch, seed, no_duplicates=no_duplicates)
    plan = gb.plan(0)
    seconds = time.perf_counter() - t0
    ids = text_ids(texts)
    per = [ids[list(b.rows)] for b in plan]
    dups = [duplicates(x) for x in per]
    fneg = [false_negative_rows(x) for x in per]
    slots = batch * len(texts)
    return {
        "no_duplicates": no_duplicates,
        "batches": len(plan),
        "repeated_text_share": sum(dups) / (slots * len(plan)),
        "repeated_texts_per_batch": float(np.mean(dups)),
        "batches_with_a_repeat": sum(d > 0 for d in dups) / len(plan),
        "false_negative_rows_per_batch": float(np.mean(fneg)),
        "false_negative_row_share": sum(fneg) / (batch * len(plan)),
        "plan_seconds": round(seconds, 2),
        # rows an epoch trains on more than once (swapped in for a row that repeated a text)
        "rows_seen_twice_share": 1 - len({r for b in plan for r in b.rows}) / (batch * len(plan)),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=2048, help="global batch (default 2048)")
    p.add_argument("--rows", type=int, default=0, help="training rows; 0 = all 21,325")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--out", type=Path)
    a = p.parse_args()

    from gist_ray.data import insuranceqa

    rows = insuranceqa.train_rows(a.seed, a.rows or None)
    texts = [rows["anchor"], rows["positive"], rows["negative_1"]]
    result = {
        "date": dt.datetime.now().isoformat(timespec="seconds"),
        "machine": f"{platform.machine()}, {platform.processor() or 'cpu'}",
        "data": f"insuranceqa train, {len(texts[0])} rows x 3 columns, "
        f"{len(set(sum(texts, [])))} unique texts",
        "global_batch": a.batch,
        "runs": [measure(texts, a.batch, nd, a.seed) for nd in (False, True)],
    }
    print(f"{result['data']}; global batch {a.batch}; one epoch")
    print(
        f"{'no_duplicates':<14}{'batches':>8}{'repeated texts':>16}{'batches w/ repeat':>19}"
        f"{'false-neg rows':>16}{'plan s':>8}{'rows twice':>12}"
    )
    for r in result["runs"]:
        print(
            f"{str(r['no_duplicates']).lower():<14}{r['batches']:>8}"
            f"{r['repeated_text_share']:>15.2%} {r['batches_with_a_repeat']:>18.0%}"
            f"{r['false_negative_row_share']:>15.2%} {r['plan_seconds']:>7}"
            f"{r['rows_seen_twice_share']:>11.2%}"
        )
    if a.out:
        a.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
