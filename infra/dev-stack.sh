#!/usr/bin/env bash
# Local dev stack on loopback: a Ray head (with dashboard, for `ray job submit`) and an S3 server (moto).
#   bash infra/dev-stack.sh up     start both; prints the addresses and the env to export
#   bash infra/dev-stack.sh down   stop the processes this script started (by their recorded pids)
# Then e.g.:
#   ray job submit --address http://127.0.0.1:8265 --runtime-env-json '{"env_vars":{"PYTHONPATH":"'$PWD'"}}' \
#     -- python -m jobs.memorize --corpus ../shared/data/harry_potter.txt --collection hp \
#        --store s3://memorag/dev --s3-endpoint http://127.0.0.1:5555
set -euo pipefail
cd "$(dirname "$0")/.."
STATE=${MEMORAG_DEV_STATE:-/tmp/memorag-dev}
RAY_PORT=${RAY_PORT:-6380}; DASH_PORT=${DASH_PORT:-8265}; S3_PORT=${S3_PORT:-5555}
mkdir -p "$STATE"
case "${1:-up}" in
  up)
    . .venv/bin/activate
    export RAY_TMPDIR="$STATE/ray"
    mkdir -p "$RAY_TMPDIR"
    nohup moto_server -H 127.0.0.1 -p "$S3_PORT" > "$STATE/moto.log" 2>&1 &
    echo $! > "$STATE/moto.pid"
    setsid nohup ray start --head --block --node-ip-address=127.0.0.1 --port="$RAY_PORT" \
      --include-dashboard=true --dashboard-host=127.0.0.1 --dashboard-port="$DASH_PORT" \
      --temp-dir="$RAY_TMPDIR" --disable-usage-stats > "$STATE/ray.log" 2>&1 &
    echo $! > "$STATE/ray.pid"
    python - "$S3_PORT" <<'PY'
import sys, time, httpx
for _ in range(120):
    try:
        httpx.put(f"http://127.0.0.1:{sys.argv[1]}/memorag"); break
    except httpx.HTTPError:
        time.sleep(0.5)
PY
    echo "S3:  http://127.0.0.1:$S3_PORT (bucket memorag)  export AWS_ACCESS_KEY_ID=dev AWS_SECRET_ACCESS_KEY=dev"
    echo "Ray: 127.0.0.1:$RAY_PORT  dashboard/jobs: http://127.0.0.1:$DASH_PORT"
    ;;
  down)
    for name in ray moto; do
      if [ -f "$STATE/$name.pid" ]; then
        pid=$(cat "$STATE/$name.pid")
        if [ "$name" = ray ]; then kill -TERM -- "-$pid" 2>/dev/null || true; else kill "$pid" 2>/dev/null || true; fi
        rm -f "$STATE/$name.pid"
      fi
    done
    ;;
  *) echo "usage: $0 up|down" >&2; exit 2 ;;
esac
