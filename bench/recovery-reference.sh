#!/bin/sh
# The full-length USER_RECOVERY reference scenario (from the ublk recovery patch series, run there with the
# C server): `add -t null -d 4 -i 1`; fio reads /dev/ublkb0 for RUNTIME; KILLS times: read the daemon pid
# from `list -n 0` (7th field of the line containing "pid"), kill -9 it, wait 6 s, `recover -n 0`, wait 6 s;
# then `del -n 0`; ROUNDS rounds with `modprobe -r ublk_drv; modprobe ublk_drv` between them.
# Expected: fio ends with no I/O error, every recover succeeds, the module unloads cleanly each round.
#
#   npm run vm -- sh bench/recovery-reference.sh            # 10 kills × 4 rounds, 140 s fio: about 10 min (TCG)
#   sh bench/recovery-reference.sh 3 1 45                    # on a ublk host, shorter
set -u
KILLS=${1:-10}
ROUNDS=${2:-4}
RUNTIME=${3:-140}
UBLK="bun $(dirname "$0")/../bin/ublk-bun.ts"
failures=0
now_ms() { awk '{ printf "%d", $1 * 1000 }' /proc/uptime; }  # busybox date has no %N
for round in $(seq 1 "$ROUNDS"); do
  $UBLK add -t null -d 4 -i 1 -n 0 >/dev/null || { echo "round $round: add failed"; exit 1; }
  fio --bs=4k --filename=/dev/ublkb0 --runtime="${RUNTIME}s" --rw=read --name=ref --output-format=json > /tmp/recovery-ref-fio.json 2>&1 &
  fio_pid=$!
  for kill in $(seq 1 "$KILLS"); do
    pid=$($UBLK list -n 0 | grep pid | awk '{print $7}')
    kill -9 "$pid"
    sleep 6
    start=$(now_ms)
    if $UBLK recover -n 0 >/dev/null; then
      echo "round $round kill $kill: daemon $pid killed; recover took $(( $(now_ms) - start )) ms"
    else
      echo "round $round kill $kill: recover FAILED"; failures=$((failures + 1))
    fi
    sleep 6
  done
  wait $fio_pid; fio_status=$?
  errors=$(grep -o '"error" : [0-9]*' /tmp/recovery-ref-fio.json | awk '{s += $3} END {print s + 0}')
  echo "round $round: fio exit $fio_status, errors $errors"
  [ "$fio_status" -eq 0 ] && [ "$errors" -eq 0 ] || failures=$((failures + 1))
  $UBLK del -n 0 || failures=$((failures + 1))
  if [ "$round" -lt "$ROUNDS" ]; then
    modprobe -r ublk_drv && modprobe ublk_drv || { echo "round $round: ublk_drv did not reload"; failures=$((failures + 1)); }
  fi
done
echo "recovery reference: $KILLS kills x $ROUNDS rounds, $failures failures"
[ "$failures" -eq 0 ]
