#!/usr/bin/env bash
# Relay on loopback: a private redis-server, N relay nodes and a load balancer across
# them: nginx with deploy/nginx/relay.conf.template (the default), or HAProxy with
# deploy/haproxy/relay.cfg.template. For development, demos and the multi-node tests
# (tests/cluster drives this very script). Needs no root: every file it writes (config,
# pids, logs, balancer temp files, Redis data) lives in --dir.
set -euo pipefail
shopt -u patsub_replacement 2>/dev/null || true # `&` in a ${x//a/b} replacement is literal

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(dirname "$HERE")"

usage() {
    cat <<'EOF'
usage: deploy/local-cluster.sh COMMAND [options]

  start [-n N] [--base-port P] [--dir D] [--redis-url URL] [--redis single|cluster]
        [--balancer nginx|haproxy]
        start redis-server (unless --redis-url), N relay nodes and the balancer (nginx
        unless told otherwise), wait until all are ready, print the URLs and return;
        everything keeps running in the background. --redis cluster starts a Redis
        Cluster of 6 redis-servers (3 masters, 3 replicas) instead of one Redis
  run   [same options]    start, then stop everything on Ctrl-C (what `make cluster` does)
  stop   [--dir D]        stop the balancer, then the nodes (SIGTERM: they drain), then Redis
  status [--dir D]        show every process, its port and its readiness
  stop-node K [--kill] [--dir D]   SIGTERM (or SIGKILL) node K and print its exit code
  start-node K [--dir D]           start node K again with the cluster's settings
  stop-redis [--kill] [--dir D]    SIGTERM (Redis writes its AOF and exits) or SIGKILL Redis
  start-redis [--dir D]            start the cluster's Redis again (same port, same data)

Ports: the balancer on P (default 8080), Redis on P+1, node K (1..N) on P+1+K; all
127.0.0.1. A Redis Cluster's servers listen on P+101…P+106 (their cluster bus on
those + 10000). The directory (default $TMPDIR/relay-cluster-$UID) holds cluster.env, *.pid,
node K's exit code in nodeK.exit, logs/ and the rendered balancer config.

Nodes are `relay serve --host 127.0.0.1 --port … --redis-url … --node-id nodeK` and read
every other setting from RELAY_* variables in the environment (RELAY_AUTH_SECRET,
RELAY_DRAIN_GRACE, RELAY_HEARTBEAT, RELAY_LOG_FORMAT, …). Without RELAY_AUTH_SECRET they
run with --allow-anonymous (demo only). RELAY_API_KEY defaults to "dev-key".
Binaries: RELAY_BIN (default .venv/bin/relay, else relay on PATH), NGINX_BIN, HAPROXY_BIN,
REDIS_BIN. NGINX_SERVER_PARAMS replaces the parameters of each nginx `server` line
(default `max_fails=0`; only for comparing settings, see docs/operations.md).
EOF
}

die() {
    echo "local-cluster: $*" >&2
    exit 1
}

# -- arguments ------------------------------------------------------------------------------

COMMAND=${1:-}
[ $# -gt 0 ] && shift
NODE=""
case "$COMMAND" in
start-node | stop-node)
    NODE=${1:-}
    [[ "$NODE" =~ ^[1-9][0-9]*$ ]] || die "$COMMAND needs a node number (1..N)"
    shift
    ;;
esac
NODES=3
BASE_PORT=8080
DIR=${RELAY_CLUSTER_DIR:-${TMPDIR:-/tmp}/relay-cluster-$(id -u)}
EXTERNAL_REDIS=""
REDIS_KIND=single
BALANCER=nginx
KILL=0
while [ $# -gt 0 ]; do
    case "$1" in
    -n | --nodes) NODES=${2:?}; shift 2 ;;
    --base-port) BASE_PORT=${2:?}; shift 2 ;;
    --dir) DIR=${2:?}; shift 2 ;;
    --redis-url) EXTERNAL_REDIS=${2:?}; shift 2 ;;
    --redis) REDIS_KIND=${2:?}; shift 2 ;;
    --balancer) BALANCER=${2:?}; shift 2 ;;
    --kill) KILL=1; shift ;;
    -h | --help) usage; exit 0 ;;
    *) usage >&2; die "unknown argument: $1" ;;
    esac
done
[[ "$NODES" =~ ^[1-9][0-9]*$ ]] || die "-n wants a positive number"
[[ "$BALANCER" =~ ^(nginx|haproxy)$ ]] || die "--balancer wants nginx or haproxy"
[[ "$REDIS_KIND" =~ ^(single|cluster)$ ]] || die "--redis wants single or cluster"
[[ "$BASE_PORT" =~ ^[0-9]+$ ]] && [ "$BASE_PORT" -ge 1024 ] && [ $((BASE_PORT + NODES + 1)) -le 65535 ] ||
    die "--base-port wants a port from 1024 that leaves room for $((NODES + 1)) more"
mkdir -p "$DIR"
DIR="$(cd "$DIR" && pwd)"
STATE="$DIR/cluster.env"

if [ -z "${RELAY_BIN:-}" ]; then
    if [ -x "$ROOT/.venv/bin/relay" ]; then RELAY_BIN="$ROOT/.venv/bin/relay"; else RELAY_BIN="$(command -v relay || true)"; fi
fi
NGINX_BIN=${NGINX_BIN:-$(command -v nginx || echo /usr/sbin/nginx)}
HAPROXY_BIN=${HAPROXY_BIN:-$(command -v haproxy || echo /usr/sbin/haproxy)}
# No passive failure accounting: see the header of deploy/nginx/relay.conf.template.
NGINX_SERVER_PARAMS=${NGINX_SERVER_PARAMS-max_fails=0}
REDIS_BIN=${REDIS_BIN:-$(command -v redis-server || echo /usr/bin/redis-server)}
REDIS_CLI=${REDIS_CLI:-$(command -v redis-cli || echo /usr/bin/redis-cli)}
export RELAY_API_KEY=${RELAY_API_KEY:-dev-key}

# -- helpers --------------------------------------------------------------------------------

# The status code of `GET path` on 127.0.0.1:port, or 000; bash's /dev/tcp, so no curl needed.
http_status() {
    local line
    line=$(timeout 3 bash -c 'exec 3<>"/dev/tcp/127.0.0.1/$0" &&
        printf "GET %s HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n" "$1" >&3 && head -n1 <&3' "$1" "$2" 2>/dev/null) ||
        true
    set -- $line
    echo "${2:-000}"
}

alive() { [ -n "${1:-}" ] && kill -0 "$1" 2>/dev/null; }
pid_of() { [ -s "$1" ] && cat "$1" || true; }
port_free() { ! (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

# Wait until pid $1 is gone, at most $2 seconds; non-zero if it is still there.
wait_gone() {
    local pid=$1 deadline=$((SECONDS + $2))
    while alive "$pid"; do
        [ $SECONDS -ge $deadline ] && return 1
        sleep 0.1
    done
}

load_state() {
    [ -f "$STATE" ] || die "no cluster in $DIR (start one first, or pass --dir)"
    # shellcheck disable=SC1090
    . "$STATE"
}

node_port() { echo $((BASE_PORT + 1 + $1)); }

# -- redis ----------------------------------------------------------------------------------

# redis-server on port $1 named $2 (its pid file, log and data directory), plus options.
launch_redis() {
    local port=$1 name=$2
    shift 2
    port_free "$port" || die "port $port ($name) is taken"
    mkdir -p "$DIR/$name"
    "$REDIS_BIN" "$HERE/redis/redis.conf" --port "$port" --bind 127.0.0.1 --dir "$DIR/$name" \
        --daemonize yes --pidfile "$DIR/$name.pid" --logfile "$DIR/logs/$name.log" "$@" \
        </dev/null >/dev/null 2>>"$DIR/logs/$name.log" || die "redis-server failed: see $DIR/logs/$name.log"
    local deadline=$((SECONDS + 10))
    until [ "$(timeout 2 bash -c 'exec 3<>"/dev/tcp/127.0.0.1/$0" && printf "PING\r\n" >&3 && head -c5 <&3' "$port" 2>/dev/null)" = "+PONG" ]; do
        [ $SECONDS -ge $deadline ] && die "redis-server did not answer on $port: see $DIR/logs/$name.log"
        sleep 0.05
    done
}

start_redis() { launch_redis $((BASE_PORT + 1)) redis; }

cluster_ports() { seq $((BASE_PORT + 101)) $((BASE_PORT + 106)); }

# Six cluster-enabled redis-servers joined by `redis-cli --cluster create` (3 masters with
# a replica each), as an operator would; returns once every node says cluster_state:ok.
start_redis_cluster() {
    local port addresses=()
    for port in $(cluster_ports); do
        rm -rf "${DIR:?}/redis-$port" # a fresh cluster: an old nodes.conf would refuse to join
        port_free $((port + 10000)) || die "port $((port + 10000)) (cluster bus of redis-$port) is taken"
        launch_redis "$port" "redis-$port" --cluster-enabled yes --cluster-config-file nodes.conf \
            --cluster-node-timeout 2000
        addresses+=("127.0.0.1:$port")
    done
    "$REDIS_CLI" --cluster create "${addresses[@]}" --cluster-replicas 1 --cluster-yes \
        </dev/null >>"$DIR/logs/redis-cluster-create.log" 2>&1 ||
        die "redis-cli --cluster create failed: see $DIR/logs/redis-cluster-create.log"
    local deadline=$((SECONDS + 30))
    for port in $(cluster_ports); do
        until "$REDIS_CLI" -p "$port" cluster info 2>/dev/null | grep -q '^cluster_state:ok'; do
            [ $SECONDS -ge $deadline ] && die "the Redis Cluster did not come up: see $DIR/logs"
            sleep 0.1
        done
    done
}

# The pid files of the Redis this script started: one server or a cluster's six.
own_redis_pidfiles() {
    local port
    if [ "${REDIS_KIND:-single}" = cluster ]; then
        for port in $(cluster_ports); do echo "$DIR/redis-$port.pid"; done
    else
        echo "$DIR/redis.pid"
    fi
}

# -- nodes ----------------------------------------------------------------------------------

# Start node $1 under a small supervisor subshell that records its exit code in nodeK.exit.
launch_node() {
    local k=$1 port
    port=$(node_port "$k")
    port_free "$port" || die "port $port (node$k) is taken"
    rm -f "$DIR/node$k.pid" "$DIR/node$k.exit"
    local auth=()
    [ -n "${RELAY_AUTH_SECRET:-}" ] || auth=(--allow-anonymous)
    (
        set +e
        "$RELAY_BIN" serve --host 127.0.0.1 --port "$port" --redis-url "$REDIS_URL" \
            --node-id "node$k" "${auth[@]}" </dev/null >>"$DIR/logs/node$k.log" 2>&1 &
        child=$!
        echo "$child" >"$DIR/node$k.pid.tmp" && mv "$DIR/node$k.pid.tmp" "$DIR/node$k.pid"
        wait "$child"
        echo $? >"$DIR/node$k.exit"
    ) </dev/null >/dev/null 2>&1 &
}

# Wait until node $1 answers /readyz with 200; fail with its log's tail if it dies.
wait_node_ready() {
    local k=$1 port pid deadline=$((SECONDS + 30))
    port=$(node_port "$k")
    while :; do
        pid=$(pid_of "$DIR/node$k.pid")
        if [ -f "$DIR/node$k.exit" ]; then
            tail -n 20 "$DIR/logs/node$k.log" >&2
            die "node$k exited with code $(cat "$DIR/node$k.exit")"
        fi
        [ -n "$pid" ] && [ "$(http_status "$port" /readyz)" = 200 ] && return 0
        if [ $SECONDS -ge $deadline ]; then
            tail -n 20 "$DIR/logs/node$k.log" >&2
            die "node$k is not ready after 30 s"
        fi
        sleep 0.1
    done
}

# Send signal $2 (none if empty) to node $1 and wait for it to exit; SIGKILL if it hangs.
# One SIGTERM only: a node that is draining needs no second one.
stop_node() {
    local k=$1 signal=${2:-} pid grace
    pid=$(pid_of "$DIR/node$k.pid")
    alive "$pid" || return 0
    [ -n "$signal" ] && kill -"$signal" "$pid" 2>/dev/null || true
    grace=${RELAY_DRAIN_GRACE:-10}
    if ! wait_gone "$pid" $((${grace%.*} + 15)); then
        echo "node$k did not stop in time: SIGKILL" >&2
        kill -KILL "$pid" 2>/dev/null || true
        wait_gone "$pid" 5 || true
    fi
    # The supervisor writes the exit code a moment after the node is gone.
    local deadline=$((SECONDS + 5))
    while [ ! -f "$DIR/node$k.exit" ] && [ $SECONDS -lt $deadline ]; do sleep 0.05; done
}

# -- balancers -----------------------------------------------------------------------------

# Render balancer template $1 into $2: the listen address, and placeholder $3 replaced by
# one line per node made by `server_line K PORT`, indented as the template wants.
render_balancer() {
    local lines="" k conf
    for k in $(seq 1 "$NODES"); do
        [ -n "$lines" ] && lines+=$'\n    '
        lines+=$(server_line "$k" "$(node_port "$k")")
    done
    conf=$(<"$1")
    conf=${conf//@@RELAY_LISTEN@@/127.0.0.1:$BASE_PORT}
    conf=${conf//@@$3@@/$lines}
    printf '%s\n' "$conf" >"$2"
}

# Wait until the balancer ($1) on BASE_PORT answers path $2 with 200.
wait_balancer() {
    local deadline=$((SECONDS + 10))
    until [ "$(http_status "$BASE_PORT" "$2")" = 200 ]; do
        [ $SECONDS -ge $deadline ] && die "$1 does not pass $2 through on $BASE_PORT"
        sleep 0.05
    done
}

nginx_cmd() {
    "$NGINX_BIN" -p "$DIR/nginx/" -c "$DIR/nginx/nginx.conf" -e "$DIR/logs/nginx-error.log" "$@"
}

start_nginx() {
    [ -x "$NGINX_BIN" ] || die "nginx not found (set NGINX_BIN, or apt-get install nginx-light)"
    port_free "$BASE_PORT" || die "port $BASE_PORT (nginx) is taken"
    server_line() { echo "server 127.0.0.1:$2${NGINX_SERVER_PARAMS:+ $NGINX_SERVER_PARAMS};"; }
    mkdir -p "$DIR/nginx/tmp"
    render_balancer "$HERE/nginx/relay.conf.template" "$DIR/nginx/relay.conf" RELAY_UPSTREAMS
    local conf
    conf=$(<"$HERE/nginx/nginx-local.conf.template")
    conf=${conf//@@CLUSTER_DIR@@/$DIR}
    printf '%s\n' "$conf" >"$DIR/nginx/nginx.conf"
    nginx_cmd -q -t </dev/null >/dev/null 2>>"$DIR/logs/nginx-error.log" ||
        die "nginx rejected its config: see $DIR/logs/nginx-error.log"
    nginx_cmd </dev/null >/dev/null 2>>"$DIR/logs/nginx-error.log" ||
        die "nginx failed to start: see $DIR/logs/nginx-error.log"
    wait_balancer nginx /healthz
}

haproxy_cmd() {
    "$HAPROXY_BIN" -f "$DIR/haproxy/global.cfg" -f "$DIR/haproxy/relay.cfg" "$@"
}

start_haproxy() {
    [ -x "$HAPROXY_BIN" ] || die "haproxy not found (set HAPROXY_BIN, or apt-get install haproxy)"
    port_free "$BASE_PORT" || die "port $BASE_PORT (haproxy) is taken"
    server_line() { echo "server node$1 127.0.0.1:$2 check"; }
    mkdir -p "$DIR/haproxy"
    render_balancer "$HERE/haproxy/relay.cfg.template" "$DIR/haproxy/relay.cfg" RELAY_SERVERS
    cp "$HERE/haproxy/haproxy-local.cfg.template" "$DIR/haproxy/global.cfg"
    haproxy_cmd -c -q </dev/null >/dev/null 2>>"$DIR/logs/haproxy.log" ||
        die "haproxy rejected its config: see $DIR/logs/haproxy.log"
    haproxy_cmd -D -p "$DIR/haproxy/haproxy.pid" </dev/null >/dev/null 2>>"$DIR/logs/haproxy.log" ||
        die "haproxy failed to start: see $DIR/logs/haproxy.log"
    # Every server starts up for HAProxy; /readyz passes once the first check went through.
    wait_balancer haproxy /readyz
}

balancer_pidfile() {
    if [ "$BALANCER" = haproxy ]; then echo "$DIR/haproxy/haproxy.pid"; else echo "$DIR/nginx/nginx.pid"; fi
}

# -- commands -------------------------------------------------------------------------------

cmd_start() {
    if [ -f "$STATE" ]; then
        (
            load_state
            for f in "$DIR"/nginx/nginx.pid "$DIR"/haproxy/haproxy.pid "$DIR"/redis*.pid "$DIR"/node*.pid; do
                alive "$(pid_of "$f")" && exit 1
            done
            exit 0
        ) || die "a cluster is already running in $DIR: stop it first"
    fi
    [ -n "$RELAY_BIN" ] && [ -x "$RELAY_BIN" ] || die "relay not found (make setup, or set RELAY_BIN)"
    rm -f "$DIR"/*.pid "$DIR"/*.exit "$DIR/nginx/nginx.pid" "$DIR/haproxy/haproxy.pid"
    mkdir -p "$DIR/logs"
    local own_redis=1
    if [ -n "$EXTERNAL_REDIS" ]; then
        REDIS_URL=$EXTERNAL_REDIS
        own_redis=0
    elif [ "$REDIS_KIND" = cluster ]; then
        REDIS_URL="redis+cluster://127.0.0.1:$((BASE_PORT + 101)),127.0.0.1:$((BASE_PORT + 102)),127.0.0.1:$((BASE_PORT + 103))"
    else
        REDIS_URL="redis://127.0.0.1:$((BASE_PORT + 1))/0"
    fi
    cat >"$STATE" <<EOF
NODES=$NODES
BASE_PORT=$BASE_PORT
REDIS_URL='$REDIS_URL'
REDIS_KIND=$REDIS_KIND
OWN_REDIS=$own_redis
BALANCER=$BALANCER
EOF
    # Whatever fails from here (die exits), stop what was started.
    trap 'echo "local-cluster: start failed; stopping what was started" >&2; cmd_stop >/dev/null 2>&1 || true' EXIT
    if [ "$own_redis" = 1 ]; then
        if [ "$REDIS_KIND" = cluster ]; then start_redis_cluster; else start_redis; fi
    fi
    local k
    for k in $(seq 1 "$NODES"); do launch_node "$k"; done
    for k in $(seq 1 "$NODES"); do wait_node_ready "$k"; done
    if [ "$BALANCER" = haproxy ]; then start_haproxy; else start_nginx; fi
    trap - EXIT
    echo "Relay local cluster: $NODES nodes behind $BALANCER (state and logs in $DIR)"
    echo "  balancer   http://127.0.0.1:$BASE_PORT    ws://127.0.0.1:$BASE_PORT/ws/<client_id>"
    for k in $(seq 1 "$NODES"); do
        echo "  node$k      http://127.0.0.1:$(node_port "$k")"
    done
    echo "  redis      $REDIS_URL"
    if [ -n "${RELAY_AUTH_SECRET:-}" ]; then
        echo "  auth       tokens signed with RELAY_AUTH_SECRET"
    else
        echo "  auth       ANONYMOUS (--allow-anonymous: demo only)"
    fi
    echo "  API key    $RELAY_API_KEY"
    echo ""
    echo "  watch:     $RELAY_BIN tail demo --url ws://127.0.0.1:$BASE_PORT --api-key $RELAY_API_KEY"
    echo "  publish:   $RELAY_BIN publish demo label.created '{\"id\": 1}' --redis-url $REDIS_URL"
    echo "  nodes:     $RELAY_BIN nodes --redis-url $REDIS_URL"
    echo "  stop:      $0 stop --dir $DIR"
}

cmd_stop() {
    load_state
    local pid k
    pid=$(pid_of "$(balancer_pidfile)")
    if alive "$pid"; then
        kill -TERM "$pid" 2>/dev/null || true
        wait_gone "$pid" 10 || kill -KILL "$pid" 2>/dev/null || true
    fi
    # All nodes drain at once: nothing is left to take their clients over.
    for k in $(seq 1 "$NODES"); do
        pid=$(pid_of "$DIR/node$k.pid")
        alive "$pid" && kill -TERM "$pid" 2>/dev/null || true
    done
    for k in $(seq 1 "$NODES"); do
        stop_node "$k"
        [ -f "$DIR/node$k.exit" ] && echo "node$k exited with code $(cat "$DIR/node$k.exit")"
    done
    if [ "$OWN_REDIS" = 1 ]; then
        local pidfile
        for pidfile in $(own_redis_pidfiles); do
            pid=$(pid_of "$pidfile")
            if alive "$pid"; then
                kill -TERM "$pid" 2>/dev/null || true
                wait_gone "$pid" 10 || kill -KILL "$pid" 2>/dev/null || true
            fi
            rm -f "$pidfile"
        done
    fi
    rm -f "$DIR"/node*.pid "$DIR/redis.pid" "$DIR/nginx/nginx.pid" "$DIR/haproxy/haproxy.pid"
    echo "stopped the cluster in $DIR"
}

cmd_status() {
    load_state
    local pid k state running=0
    describe() { # name pid port readiness-path
        if alive "$2"; then
            running=$((running + 1))
            state="running  pid $2"
            [ -n "$4" ] && state+="  $4 $(http_status "$3" "$4")"
        else
            state="stopped"
        fi
        printf '  %-8s %-6s %s\n' "$1" "$3" "$state"
    }
    echo "Relay local cluster in $DIR"
    describe "$BALANCER" "$(pid_of "$(balancer_pidfile)")" "$BASE_PORT" /healthz
    for k in $(seq 1 "$NODES"); do
        describe "node$k" "$(pid_of "$DIR/node$k.pid")" "$(node_port "$k")" /readyz
        if [ -f "$DIR/node$k.exit" ]; then echo "           exited with code $(cat "$DIR/node$k.exit")"; fi
    done
    if [ "$OWN_REDIS" = 1 ] && [ "${REDIS_KIND:-single}" = cluster ]; then
        local port
        for port in $(cluster_ports); do describe redis "$(pid_of "$DIR/redis-$port.pid")" "$port" ""; done
    elif [ "$OWN_REDIS" = 1 ]; then
        describe redis "$(pid_of "$DIR/redis.pid")" $((BASE_PORT + 1)) ""
    else
        echo "  redis    external  $REDIS_URL"
    fi
    [ "$running" -gt 0 ]
}

cmd_stop_node() {
    load_state
    [ "$NODE" -le "$NODES" ] || die "no node$NODE in a cluster of $NODES"
    local pid
    pid=$(pid_of "$DIR/node$NODE.pid")
    alive "$pid" || die "node$NODE is not running"
    if [ "$KILL" = 1 ]; then stop_node "$NODE" KILL; else stop_node "$NODE" TERM; fi
    echo "node$NODE exited with code $(cat "$DIR/node$NODE.exit" 2>/dev/null || echo '?')"
}

cmd_start_node() {
    load_state
    [ "$NODE" -le "$NODES" ] || die "no node$NODE in a cluster of $NODES"
    alive "$(pid_of "$DIR/node$NODE.pid")" && die "node$NODE is already running"
    launch_node "$NODE"
    wait_node_ready "$NODE"
    echo "node$NODE ready on http://127.0.0.1:$(node_port "$NODE")"
}

own_redis_only() {
    load_state
    [ "$OWN_REDIS" = 1 ] || die "this cluster uses an external Redis ($REDIS_URL)"
    [ "${REDIS_KIND:-single}" = single ] ||
        die "stop-redis/start-redis act on one Redis; stop a cluster node with redis-cli -p PORT shutdown"
}

cmd_stop_redis() {
    own_redis_only
    local pid
    pid=$(pid_of "$DIR/redis.pid")
    alive "$pid" || die "redis is not running"
    if [ "$KILL" = 1 ]; then kill -KILL "$pid"; else kill -TERM "$pid"; fi
    wait_gone "$pid" 20 || die "redis did not stop"
    rm -f "$DIR/redis.pid"
    echo "redis stopped"
}

cmd_start_redis() {
    own_redis_only
    alive "$(pid_of "$DIR/redis.pid")" && die "redis is already running"
    start_redis
    echo "redis ready on $REDIS_URL"
}

cmd_run() {
    cmd_start
    echo ""
    echo "Ctrl-C stops the cluster."
    trap 'echo ""; cmd_stop; exit 0' INT TERM
    while :; do sleep 1; done
}

case "$COMMAND" in
start) cmd_start ;;
run) cmd_run ;;
stop) cmd_stop ;;
status) cmd_status ;;
stop-node) cmd_stop_node ;;
start-node) cmd_start_node ;;
stop-redis) cmd_stop_redis ;;
start-redis) cmd_start_redis ;;
"" | -h | --help | help) usage ;;
*) usage >&2; die "unknown command: $COMMAND" ;;
esac
