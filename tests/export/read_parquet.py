"""Reads a clearhouse Parquet archive with pyarrow (a third-party reader) and prints, as JSON,
per file: its metadata, row count, sequence range, and per kind and currency the row count and
the sum of `amount` (decimal(38,0), summed by pyarrow, printed as a string).

    python read_parquet.py ARCHIVE_DIR
"""
import json
import os
import sys

import pyarrow.compute as pc
import pyarrow.parquet as pq


def main(directory):
    out = []
    for name in sorted(os.listdir(directory)):
        if not (name.startswith("window-") and name.endswith(".parquet")):
            continue
        path = os.path.join(directory, name)
        parquet = pq.ParquetFile(path)
        metadata = {k.decode(): v.decode() for k, v in (parquet.metadata.metadata or {}).items()
                    if k.decode().startswith("clearhouse.")}
        table = parquet.read()
        seqs = table.column("seq").to_pylist()
        sums = {}
        kinds = table.column("kind")
        for kind in set(kinds.to_pylist()):
            rows = table.filter(pc.equal(kinds, kind))
            for currency in set(rows.column("currency").to_pylist()):
                mask = pc.is_null(rows.column("currency")) if currency is None \
                    else pc.equal(rows.column("currency"), currency)
                picked = rows.filter(mask)
                total = pc.sum(picked.column("amount")).as_py()
                sums[f"{kind}/{currency}"] = {
                    "rows": picked.num_rows,
                    "amount": None if total is None else str(int(total)),
                }
        out.append({
            "file": name,
            "metadata": metadata,
            "rows": table.num_rows,
            "first_seq": min(seqs),
            "last_seq": max(seqs),
            "contiguous": seqs == list(range(min(seqs), max(seqs) + 1)),
            "schema": [f"{f.name}:{f.type}" for f in table.schema],
            "by_kind_currency": sums,
            "payment_ids": sorted(
                p for p, k in zip(table.column("payment_id").to_pylist(), kinds.to_pylist())
                if k in ("payment_settled", "payment_rejected")),
        })
    print(json.dumps(out))


if __name__ == "__main__":
    main(sys.argv[1])
