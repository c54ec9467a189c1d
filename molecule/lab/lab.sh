#!/usr/bin/env bash
# The lab: the whole estate on this machine, for a newcomer without a Raspberry Pi or a spare
# server (README.md, docs/lab.md). Run through make, which first installs what it needs:
#
#   make lab [ANSIBLE_ARGS=…]   molecule/lab/lab.sh up [ansible-playbook arguments]
#   make lab-shell HOST=server  molecule/lab/lab.sh shell server|pi
#   make lab-status             molecule/lab/lab.sh status
#   make lab-down               molecule/lab/lab.sh down
#   (no make target)            molecule/lab/lab.sh images: only choose the service images
#
# The Molecule scenario molecule/lab (shared create/prepare with every scenario) makes two
# containers and one network named after the lab (HOMEIOT_LAB_NAME, default homeiot-lab:
# homeiot-lab-server, homeiot-lab-pi, network homeiot-lab); Molecule's state, the generated
# secrets, the CA and the logs live in .cache/<lab name>/. `down` removes exactly those names and
# that directory, nothing else. HOMEIOT_LAB_IMAGES=auto|real|standin picks the service images
# (auto: the upstream ones when this machine can pull them, else the offline stand-ins).
set -euo pipefail
cd "$(dirname "$0")/../.."
repo=$(pwd)
export PATH="$repo/.venv/bin:$PATH"

lab=${HOMEIOT_LAB_NAME:-homeiot-lab}
# The name must contain "lab": its state lives in .cache/<name>, beside .cache/facts, images, …
if ! [[ $lab =~ ^[a-z0-9][a-z0-9_.-]{0,39}$ ]] || [[ $lab == homeiot-molecule* ]] || [[ $lab != *lab* ]]; then
    echo "lab: HOMEIOT_LAB_NAME=$lab is not a lab name (a-z 0-9 _ . -, containing 'lab', not homeiot-molecule*)" >&2
    exit 2
fi
state=$repo/.cache/$lab
server=$lab-server
pi=$lab-pi
sources=(meter1)   # molecule/lab/molecule.yml: the Pi's homeiot_publisher_source
export HOMEIOT_LAB_NAME=$lab MOLECULE_EPHEMERAL_DIRECTORY=$state
export HOMEIOT_LAB_API_PORT=${HOMEIOT_LAB_API_PORT:-18000}
export HOMEIOT_LAB_GRAFANA_PORT=${HOMEIOT_LAB_GRAFANA_PORT:-13000}
export ANSIBLE_NOCOLOR=1 ANSIBLE_FORCE_COLOR=0 NO_COLOR=1 PY_COLORS=0
# The upstream images site.yml runs in production (the roles' pinned defaults, InfluxDB 1.x).
# HOMEIOT_LAB_UPSTREAM_* name others (the tests: images that cannot be pulled, or are present).
real_mosquitto=${HOMEIOT_LAB_UPSTREAM_MOSQUITTO:-eclipse-mosquitto:2.0.22}
real_influxdb=${HOMEIOT_LAB_UPSTREAM_INFLUXDB:-influxdb:1.11.8}
real_grafana=${HOMEIOT_LAB_UPSTREAM_GRAFANA:-grafana/grafana-oss:12.2.1}

started=${HOMEIOT_LAB_STARTED:-$(date +%s)}
elapsed() { echo $(( $(date +%s) - started )); }

# Is this container the lab's: the name we chose and the label our create gave it?
ours() {
    [ "$(docker inspect --format '{{ index .Config.Labels "homeiot.molecule" }}' "$1" 2>/dev/null)" = lab ]
}
running() { [ "$(docker inspect --format '{{.State.Running}}' "$1" 2>/dev/null)" = true ]; }

# Run one long step in the background with a progress line every 15 s (elapsed seconds and the
# task it is on); on failure the log's tail and where the whole log is.
step_pid=
trap '[ -z "$step_pid" ] || kill "$step_pid" 2>/dev/null || true' EXIT
step() {
    local name=$1 log=$state/logs/$1.log begin ticks=0 rc=0
    shift
    mkdir -p "$state/logs"
    begin=$(date +%s)
    echo "lab: $name …"
    "$@" >"$log" 2>&1 &
    step_pid=$!
    while kill -0 "$step_pid" 2>/dev/null; do
        sleep 1
        ticks=$((ticks + 1))
        if [ $((ticks % 15)) -eq 0 ]; then
            task=$(grep -oE '^(TASK|PLAY) \[[^]]*\]' "$log" | tail -1 || true)
            echo "  $name: $(( $(date +%s) - begin )) s${task:+  $task}"
        fi
    done
    wait "$step_pid" || rc=$?
    step_pid=
    if [ "$rc" -ne 0 ]; then
        tail -40 "$log" >&2
        echo "lab: $name failed (exit $rc) after $(( $(date +%s) - begin )) s; whole log: $log" >&2
        exit 1
    fi
    echo "lab: $name done in $(( $(date +%s) - begin )) s (total $(elapsed) s)"
}

# The service images, chosen once per lab (kept in .cache/<lab>/images.env until `down`).
choose_images() {
    local mode=${HOMEIOT_LAB_IMAGES:-auto} image
    if [ -f "$state/images.env" ]; then
        # shellcheck source=/dev/null
        . "$state/images.env"
        echo "lab: images: kept from this lab's first run (.cache/$lab/images.env; make lab-down to choose again)"
    else
        case $mode in auto|real|standin) ;; *) echo "lab: HOMEIOT_LAB_IMAGES=auto|real|standin" >&2; exit 2;; esac
        HOMEIOT_LAB_MOSQUITTO_IMAGE=homeiot-standin/mosquitto:2.0.11
        HOMEIOT_LAB_INFLUXDB_IMAGE=homeiot-standin/influxdb:1.6.7
        HOMEIOT_LAB_GRAFANA_IMAGE=none
        local pulled=true
        if [ "$mode" != standin ]; then
            for image in "$real_mosquitto" "$real_influxdb" "$real_grafana"; do
                if docker image inspect "$image" >/dev/null 2>&1; then
                    echo "lab: upstream image $image: already on this machine"
                    continue
                fi
                echo "lab: pulling $image …"
                if ! timeout 900 docker pull --quiet "$image" >"$state/pull.log" 2>&1; then
                    echo "lab: cannot pull $image ($(tail -1 "$state/pull.log" | cut -c1-100))"
                    pulled=false
                    break
                fi
            done
        fi
        if [ "$mode" = real ] && [ "$pulled" = false ]; then
            echo "lab: HOMEIOT_LAB_IMAGES=real but the upstream images cannot be pulled" >&2
            exit 1
        fi
        if [ "$mode" != standin ] && [ "$pulled" = true ]; then
            HOMEIOT_LAB_MOSQUITTO_IMAGE=$real_mosquitto
            HOMEIOT_LAB_INFLUXDB_IMAGE=$real_influxdb
            HOMEIOT_LAB_GRAFANA_IMAGE=$real_grafana
        fi
        printf 'HOMEIOT_LAB_MOSQUITTO_IMAGE=%s\nHOMEIOT_LAB_INFLUXDB_IMAGE=%s\nHOMEIOT_LAB_GRAFANA_IMAGE=%s\n' \
            "$HOMEIOT_LAB_MOSQUITTO_IMAGE" "$HOMEIOT_LAB_INFLUXDB_IMAGE" "$HOMEIOT_LAB_GRAFANA_IMAGE" \
            >"$state/images.env"
    fi
    export HOMEIOT_LAB_MOSQUITTO_IMAGE HOMEIOT_LAB_INFLUXDB_IMAGE HOMEIOT_LAB_GRAFANA_IMAGE
    if [ "$HOMEIOT_LAB_GRAFANA_IMAGE" != none ]; then
        echo "lab: images: upstream $HOMEIOT_LAB_MOSQUITTO_IMAGE, $HOMEIOT_LAB_INFLUXDB_IMAGE, $HOMEIOT_LAB_GRAFANA_IMAGE." \
             "Skipped: the tunnel (a lab has no token: its configuration is rendered, not started)."
    else
        echo "lab: images: offline stand-ins ($HOMEIOT_LAB_MOSQUITTO_IMAGE, $HOMEIOT_LAB_INFLUXDB_IMAGE)." \
             "Skipped: Grafana (no stand-in: its provisioning is rendered, not started) and the tunnel."
    fi
}

api_url() {
    local port
    port=$(docker port "$server" 8000/tcp 2>/dev/null | grep -m1 '^127\.0\.0\.1:' | cut -d: -f2 || true)
    echo "http://127.0.0.1:${port:-$HOMEIOT_LAB_API_PORT}"
}

live() {
    local args=()
    for s in "${sources[@]}"; do args+=(--source "$s"); done
    python "$repo/molecule/lab/live.py" --url "$(api_url)" --token-file "$state/secrets/api_token" \
        "${args[@]}" "$@"
}

up() {
    mkdir -p "$state"
    echo "lab: $lab (containers $server and $pi, network $lab; state in .cache/$lab)"
    choose_images
    # A lab whose containers went away (docker rm, a reboot) starts over; stopped ones restart.
    local need_prepare=false
    if [ -f "$state/state.yml" ] && grep -q '^created: true' "$state/state.yml"; then
        for c in "$server" "$pi"; do
            if ! docker inspect "$c" >/dev/null 2>&1; then
                echo "lab: $c is gone: recreating the lab's containers"
                step reset molecule destroy -s lab
                break
            elif ! running "$c"; then
                echo "lab: starting the stopped $c"
                docker start "$c" >/dev/null
                need_prepare=true
            fi
        done
    fi
    # `molecule create` runs the shared prepare too (once per lab); a restarted container is
    # prepared again (systemd booted, SSH up) before the converge.
    step create+prepare molecule create -s lab
    if [ "$need_prepare" = true ]; then
        step prepare molecule prepare -s lab --force
    fi
    step converge molecule converge -s lab -- "$@"
    echo "lab: converge: $(sed -nE 's/^([^ ]+) +: (ok=[0-9]+ +changed=[0-9]+).*/\1 \2/p' "$state/logs/converge.log" \
        | tr -s ' ' | paste -sd ';' | sed 's/;/; /g')"
    live --wait 300 --seconds "${HOMEIOT_LAB_VIEW_SECONDS:-20}" --started "$started"
    cat <<EOF

lab: up in $(elapsed) s. Generated on this machine (never in the repo):
  secrets      .cache/$lab/secrets/   (api_token, grafana_admin, influxdb_*, gateway, meter1, ca_passphrase)
  CA           .cache/$lab/pki/ca.crt (its key: .cache/$lab/pki/ca.key, encrypted with secrets/ca_passphrase)
  API          $(api_url) (bearer token; the description: /openapi.json), e.g.
               curl -H @<(printf 'Authorization: Bearer %s\\n' "\$(cat .cache/$lab/secrets/api_token)") $(api_url)/api/v1/latest
EOF
    if [ "$HOMEIOT_LAB_GRAFANA_IMAGE" != none ]; then
        echo "  Grafana      http://127.0.0.1:$HOMEIOT_LAB_GRAFANA_PORT (admin, password in .cache/$lab/secrets/grafana_admin)"
    else
        echo "  Grafana      skipped offline (no image): its provisioning is rendered on the server"
    fi
    cat <<EOF
Next:
  make lab-shell HOST=pi        a shell on the Pi     (journalctl -u homeiot-publisher -f)
  make lab-shell HOST=server    a shell on the server (cd /opt/homeiot && docker compose ps)
  make lab ANSIBLE_ARGS="--limit raspi --tags homeiot_publisher"   re-run one role on one host
  make lab-status               containers and a snapshot of the readings
  make lab-down                 remove the lab (containers, network, .cache/$lab)
EOF
}

shell() {
    local host=${1:-}
    case $host in
        server|homeserver|"$server") host=$server ;;
        pi|raspi|"$pi") host=$pi ;;
        *) echo "usage: make lab-shell HOST=server|pi" >&2; exit 2 ;;
    esac
    running "$host" || { echo "lab: $host is not running (make lab)" >&2; exit 1; }
    if [ -t 0 ]; then exec docker exec -it "$host" bash -l; fi
    exec docker exec -i "$host" bash -l
}

status() {
    local any=false
    for c in "$server" "$pi"; do
        if docker inspect "$c" >/dev/null 2>&1; then
            any=true
            echo "$c: $(docker inspect --format '{{.State.Status}} since {{.State.StartedAt}}' "$c")"
        else
            echo "$c: absent"
        fi
    done
    [ "$any" = true ] || { echo "no lab running (make lab)"; return 0; }
    running "$server" && [ -f "$state/secrets/api_token" ] && live --seconds 0
}

down() {
    local c
    for c in "$server" "$pi"; do
        if ! docker inspect "$c" >/dev/null 2>&1; then
            continue
        elif ours "$c"; then
            docker rm --force --volumes "$c" >/dev/null
            echo "lab-down: removed container $c"
        else
            echo "lab-down: $c was not made by the lab (no label homeiot.molecule=lab): left alone" >&2
        fi
    done
    if docker network inspect "$lab" >/dev/null 2>&1; then
        if [ "$(docker network inspect --format '{{ index .Labels "homeiot.molecule" }}' "$lab")" = lab ]; then
            docker network rm "$lab" >/dev/null
            echo "lab-down: removed network $lab"
        else
            echo "lab-down: network $lab was not made by the lab: left alone" >&2
        fi
    fi
    if [ -d "$state" ]; then
        rm -rf "$state"
        echo "lab-down: removed .cache/$lab (Molecule state, secrets, CA, logs)"
    fi
}

# Only the choice of service images (what `up` does first): the tests play it offline.
images() {
    mkdir -p "$state"
    choose_images
}

command=${1:-}
shift || true
case $command in
    up) up "$@" ;;
    images) images ;;
    shell) shell "$@" ;;
    status) status ;;
    down) down ;;
    *) echo "usage: lab.sh up|shell HOST|status|down|images" >&2; exit 2 ;;
esac
