export UBLK_BUN_DEBUG=1
U="bun bin/ublk-bun.ts"
$U add -t null -d 4 -i 1 
fio --name=r --filename=/dev/ublkb0 --rw=read --bs=4k --direct=1 --ioengine=psync --runtime=20 --time_based --output-format=terse > /tmp/fio.out 2>&1 &
for i in 1 2 3; do
  sleep 2
  pid=$($U list -n 0 | grep pid | awk '{print $7}')
  echo "killing $pid"; kill -9 $pid
  sleep 1
  $U list -n 0 | head -2
  time $U recover -n 0 || { echo recover failed; tail -20 /run/ublk-bun/daemon.log; }
  $U list -n 0 | head -2
done
wait
cut -d';' -f 5-9 /tmp/fio.out
$U del -n 0; echo del=$?
tail -30 /run/ublk-bun/daemon.log
ls /dev/ublk* /run/ublk-bun
