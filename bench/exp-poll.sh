#!/bin/sh
S=${S:-8}
cd /ublk-bun
cpu() { awk '{print $14+$15}' /proc/$1/stat; }
for round in 1 2; do
for p in 0 100 1000; do
  addout=$(UBLK_BUN_POLL_US=$p bun bin/ublk-bun.ts add -t null -n 0 -q 1 -d 128) || exit 1
  pid=$(echo "$addout" | sed -n 's/.*daemon pid \([0-9]*\).*/\1/p')
  for qd in 1 64 1; do
    t0=$(cpu $pid)
    out=$(fio --name=b --filename=/dev/ublkb0 --rw=randread --bs=4k --iodepth=$qd --size=1g --direct=1 --ioengine=io_uring --time_based --runtime=$S --ramp_time=1 --output-format=terse --terse-version=3 2>&1)
    iops=$(echo "$out" | tail -1 | cut -d';' -f8)
    echo "RESULT poll=$p qd=$qd iops=$iops $(awk -v a=$t0 -v b=$(cpu $pid) -v i=$iops -v s=$S 'BEGIN{printf "%.1f us/io", (b-a)*10000/(i*(s+1))}')"
  done
  bun bin/ublk-bun.ts del -n 0
done
done
