"""
bench/tok_parts_bench.py: where our BPE trainer's time goes, counting and merging timed apart, and how
the counting window (tok.WINDOW_CHARS) changes the counting time (prints figures; not a test).

    python bench/tok_parts_bench.py                                  # 10 and 100 MB, windows 8M, 4M, 2M
    python bench/tok_parts_bench.py --sizes 100 --windows 2 --repeats 3

The same slices as bench/tok_bench.py (whole documents in file order, the last 813 held out). For each
size: tok.count_chunks (split and count, on all cores' worker processes) once per window size, best of
--repeats, then tok.bpe_merges on the counts (32512 merges, as tok_bench trains), each of --repeats
runs shown. Wall-clock seconds, in this one process. Ends with one JSON line of the figures.
"""
import argparse, json, os, sys, time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import tok
from tok_bench import DEFAULT_CORPUS, VOCAB, load  # noqa: E402 (bench/ is on sys.path as the script's folder)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--corpus", default=str(DEFAULT_CORPUS))
    ap.add_argument("--sizes", type=float, nargs="+", default=[10, 100], help="slices, MB")
    ap.add_argument("--windows", type=float, nargs="+", default=[8, 4, 2], help="tok.WINDOW_CHARS, millions of characters")
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()
    default_window = tok.WINDOW_CHARS
    print(f"{os.cpu_count()} cores; tok.WINDOW_CHARS is {default_window:,} in tok.py")
    figures = []
    for mb in args.sizes:
        docs, _, nbytes = load(args.corpus, mb)
        row = {"mb": round(nbytes / 1e6, 2), "count_s": {}}
        for w in args.windows:
            tok.WINDOW_CHARS = int(w * 1e6)
            best = float("inf")
            for _ in range(args.repeats):
                t0 = time.perf_counter()
                data, lens, counts = tok.count_chunks(docs)
                best = min(best, time.perf_counter() - t0)
            row["count_s"][f"{w:g}M"] = round(best, 2)
            print(f"{row['mb']:7.2f} MB  count_chunks, {w:g}M-character windows: {best:.2f} s (best of {args.repeats})", flush=True)
        tok.WINDOW_CHARS = default_window
        data, lens, counts = tok.count_chunks(docs)
        merges = []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            tok.bpe_merges(data.copy(), lens.copy(), counts.copy(), VOCAB - 256)
            merges.append(round(time.perf_counter() - t0, 2))
        row["merge_s"] = merges
        print(f"{row['mb']:7.2f} MB  bpe_merges, {VOCAB - 256} merges: {', '.join(f'{s:.2f}' for s in merges)} s", flush=True)
        figures.append(row)
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
