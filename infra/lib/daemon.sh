# Sourced by the scripts that run one local server in the background from a pid file
# (infra/kafka/kafka.sh, infra/seaweedfs/seaweedfs.sh, infra/jaeger/jaeger.sh); not run by itself.
#
#   running                      the process of $pidfile is alive
#   daemon_wait WHAT LOG READY   after a start: wait until the function READY succeeds (up to $timeout_s),
#                                failing at once, with the last lines of LOG (one or more files), when
#                                the process exits meanwhile; on a timeout, stop it and fail
#   stop                         SIGTERM, up to 30 s for a clean stop, then SIGKILL
#
# Needs: $pidfile, $timeout_s, and log (each script's own prefix on its lines).

running() { [[ -f "$pidfile" ]] && kill -0 "$(cat "$pidfile")" 2>/dev/null; }

daemon_wait() {
  local what=$1 logs=$2 ready=$3 t0=$SECONDS
  while (( SECONDS - t0 < timeout_s )); do
    if ! running; then
      log "$what exited during start; last lines of $logs:"
      # shellcheck disable=SC2086  # LOG may name several files
      tail -n 30 $logs >&2 || true
      return 1
    fi
    if "$ready"; then log "up after $((SECONDS - t0)) s"; return 0; fi
    sleep 0.5
  done
  log "no answer within ${timeout_s}s; last lines of $logs:"
  # shellcheck disable=SC2086
  tail -n 30 $logs >&2 || true
  stop
  return 1
}

stop() {
  if ! running; then rm -f "$pidfile"; log "not running"; return 0; fi
  local pid; pid="$(cat "$pidfile")"
  log "stopping pid $pid"
  kill -TERM "$pid"
  for _ in $(seq 1 60); do kill -0 "$pid" 2>/dev/null || { rm -f "$pidfile"; log "stopped"; return 0; }; sleep 0.5; done
  log "no clean stop within 30 s, killing"; kill -KILL "$pid" 2>/dev/null || true; rm -f "$pidfile"
}
