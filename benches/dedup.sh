#!/usr/bin/env bash
# Benchmark (not a test): the dedup write path of the thin pool (thin/benches/dedup.rs, its
# "write" section: 4 KiB writes into RAM devices, one request at a time) run RUNS times; prints
# the median of each row, with the range over the runs, as a Markdown table for BENCHMARKS.md.
# Ratios are taken within each run (dedup row / plain thin row of the same run), then the
# median of those. The machine's other load moves every figure: compare ratios, not rates.
#
#   bash benches/dedup.sh
#   RUNS=7 bash benches/dedup.sh
#   CARGO_BENCH_FLAGS="--profile myprofile" bash benches/dedup.sh
#   DEDUP_BENCH_BIN=/path/to/dedup-HASH bash benches/dedup.sh   (an already built bench binary)
set -euo pipefail
cd "$(dirname "$0")/.."
RUNS=${RUNS:-5}
OUT=$(mktemp -d /tmp/dedupbench.XXXXXX)
trap 'rm -rf "$OUT"' EXIT
export DEDUP_BENCH_SECTIONS=write
run_once() {
  if [ -n "${DEDUP_BENCH_BIN:-}" ]; then
    "$DEDUP_BENCH_BIN" --bench
  else
    # shellcheck disable=SC2086
    cargo bench ${CARGO_BENCH_FLAGS:-} -q -p thin --bench dedup 2>/dev/null
  fi
}
if [ -z "${DEDUP_BENCH_BIN:-}" ]; then
  # shellcheck disable=SC2086
  cargo bench ${CARGO_BENCH_FLAGS:-} -p thin --bench dedup --no-run
fi
for i in $(seq 1 "$RUNS"); do
  run_once >"$OUT/run$i.txt"
  echo "run $i/$RUNS done" >&2
done
python3 - "$OUT" "$RUNS" <<'PY'
import re, statistics, sys
out, runs = sys.argv[1], int(sys.argv[2])
rows = {}      # name -> [rate per run]
of_hash = []   # dedup unique / BLAKE3, per run
for i in range(1, runs + 1):
    for line in open(f"{out}/run{i}.txt"):
        m = re.match(r"\s+(.+?)\s+(\d+)/s\s", line)
        if m and not m.group(1).startswith("plain thin again"):
            rows.setdefault(m.group(1), []).append(float(m.group(2)))
        h = re.search(r"dedup unique = ([\d.]+)x of it", line)
        if h:
            of_hash.append(float(h.group(1)))
plain = rows.get("plain thin (4 KiB blocks)")
if not plain or len(plain) != runs:
    sys.exit("no plain thin row in every run: see the bench's output")
med = statistics.median
print(f"4 KiB writes, RAM devices, one request at a time; median of {runs} runs (range)\n")
print("| row | writes/s | MiB/s | x plain thin |")
print("| --- | ---: | ---: | ---: |")
for name, rates in rows.items():
    ratios = [r / p for r, p in zip(rates, plain)]
    print(f"| {name} | {med(rates):,.0f} ({min(rates):,.0f}-{max(rates):,.0f}) | "
          f"{med(rates) * 4096 / 2**20:,.0f} | {med(ratios):.2f} ({min(ratios):.2f}-{max(ratios):.2f}) |")
if of_hash:
    print(f"\ndedup unique / BLAKE3 in memory: {med(of_hash):.2f}x "
          f"({min(of_hash):.2f}-{max(of_hash):.2f})")
PY
