"""Sum a CSV column chunk by chunk: `memoplane run examples/sum_column.py --over-chunks rows
--combine combine --input rows=@table.csv --input column=1`. `main` sees whole rows of one
chunk (the header only in the first); `combine` merges two partial results, associatively."""


def main(rows, column):
    total = count = 0
    for line in rows.split(b"\n"):
        if line[:1].isdigit():  # skips the header and the empty tail
            total += int(line.split(b",")[column])
            count += 1
    return {"sum": total, "count": count}


def combine(a, b):
    return {"sum": a["sum"] + b["sum"], "count": a["count"] + b["count"]}
