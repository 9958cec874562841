#!/bin/bash
# summarize.sh OURS PEER1 [PEER2] -- LOG...: reads `BENCH row target value` lines from the
# console logs of several boots and prints, per row, the median value of each target and the
# median [min-max] of the per-boot ratios ours/peer (ratios are computed within one boot;
# several passes over a row in one boot are averaged first).
ours=$1; shift
peers=()
while [ "$1" != -- ]; do peers+=("$1"); shift; done
shift
awk -v ours="$ours" -v peers="${peers[*]}" '
function median(arr, n,   i, j, t, a) {
  for (i = 1; i <= n; i++) a[i] = arr[i]
  for (i = 1; i <= n; i++) for (j = i + 1; j <= n; j++) if (a[j] < a[i]) { t = a[i]; a[i] = a[j]; a[j] = t }
  if (n % 2) return a[(n + 1) / 2]
  return (a[n / 2] + a[n / 2 + 1]) / 2
}
FNR == 1 { boot++ }
/^BENCH / { v[$2, $3, boot] = ($2, $3, boot) in v ? (v[$2, $3, boot] * c[$2, $3, boot] + $4) / (c[$2, $3, boot] + 1) : $4
  c[$2, $3, boot]++; if (!($2 in seen)) { seen[$2] = 1; rows[++nr] = $2 } }
END {
  np = split(peers, P, " ")
  printf "%-28s %5s %10s", "row", "boots", ours
  for (p = 1; p <= np; p++) printf " %10s", P[p]
  for (p = 1; p <= np; p++) printf "  %-24s", ours "/" P[p] " median [min-max]"
  printf "\n"
  for (r = 1; r <= nr; r++) {
    row = rows[r]; n = 0
    for (b = 1; b <= boot; b++) if ((row, ours, b) in v) { n++; o[n] = v[row, ours, b] }
    printf "%-28s %5d %10.0f", row, n, median(o, n)
    for (p = 1; p <= np; p++) {
      m = 0
      for (b = 1; b <= boot; b++) if ((row, P[p], b) in v) { m++; x[m] = v[row, P[p], b] }
      printf " %10.0f", m ? median(x, m) : 0
    }
    for (p = 1; p <= np; p++) {
      m = 0; lo = 1e9; hi = 0
      for (b = 1; b <= boot; b++) if ((row, ours, b) in v && (row, P[p], b) in v && v[row, P[p], b] > 0) {
        q = v[row, ours, b] / v[row, P[p], b]; m++; rr[m] = q
        if (q < lo) lo = q; if (q > hi) hi = q
      }
      if (m) printf "  %5.2fx [%4.2f-%4.2f]        ", median(rr, m), lo, hi
      else printf "  %-24s", "n/a"
    }
    printf "\n"
  }
}' "$@"
