#!/bin/sh
# Long forms of the stress and failure tests (CI runs them at scale 1): SCALE × 50 add/del cycles with 2 queues,
# a SCALE × 3-round soak checking fd count and RSS, 8 devices with SCALE × 3 s of fio each, plus the del-under-fio,
# kill-during-add, orphan, no-server and fault-target tests. Same pass/fail rules as `npm test`.
#
#   sudo sh bench/stress.sh        # on a host with ublk_drv; elsewhere it boots the test VM (scale 4: ~12 min TCG)
#   sudo sh bench/stress.sh 10     # longer
set -eu
cd "$(dirname "$0")/.."
SCALE=${1:-4}
FILES="tests/kernel/stress.test.ts tests/kernel/no-server.test.ts tests/kernel/fault.test.ts"
if [ -e /dev/ublk-control ]; then
  UBLK_BUN_STRESS_SCALE=$SCALE KERNEL_TESTS="$FILES" exec node_modules/.bin/bun tests/run.ts --kernel
fi
exec bash tests/vm/vm.sh --env "UBLK_BUN_STRESS_SCALE=$SCALE" --env "KERNEL_TESTS=$FILES" -- "bun tests/run.ts --kernel"
