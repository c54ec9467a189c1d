#!/usr/bin/env bash
# Run one Molecule scenario's full sequence — create, prepare, a `--check --diff` run on the
# fresh hosts that must run to the end (what a first run would do), converge, idempotence, a
# `--check --diff` run that must report nothing to change, verify — and always destroy.
#
#   molecule/resources/test-scenario.sh SCENARIO
#
# `molecule test` runs the same steps but only prints the check run; this asserts on it.
# HOMEIOT_KEEP_ON_FAILURE=1 leaves a failed scenario's containers up to look into (then run
# `molecule destroy -s SCENARIO`).
set -euo pipefail
scenario=${1:?usage: test-scenario.sh SCENARIO}
log_dir=${MOLECULE_LOG_DIR:-.cache/molecule}
mkdir -p "$log_dir"
started=$(date +%s)

cleanup() {
    local rc=$?
    if [ "$rc" -ne 0 ] && [ "${HOMEIOT_KEEP_ON_FAILURE:-0}" = 1 ]; then
        echo "== $scenario: failed (exit $rc); containers kept (HOMEIOT_KEEP_ON_FAILURE=1)" >&2
        return
    fi
    molecule destroy -s "$scenario" >"$log_dir/$scenario.destroy.log" 2>&1 || cat "$log_dir/$scenario.destroy.log"
}
trap cleanup EXIT

molecule destroy -s "$scenario" >"$log_dir/$scenario.destroy.log" 2>&1
step_started=$started
step_done() { echo "== $scenario: $1 took $(( $(date +%s) - step_started )) s"; step_started=$(date +%s); }

for step in create prepare; do
    echo "== $scenario: $step"
    molecule "$step" -s "$scenario"
done
step_done create+prepare

echo "== $scenario: check on fresh hosts (--check --diff must run to the end)"
ANSIBLE_DIFF_ALWAYS=true molecule check -s "$scenario" >"$log_dir/$scenario.check-fresh.log" 2>&1 || {
    tail -60 "$log_dir/$scenario.check-fresh.log" >&2
    echo "FAIL: --check --diff on fresh hosts stopped (log: $log_dir/$scenario.check-fresh.log)" >&2
    exit 1
}
grep -A3 'PLAY RECAP' "$log_dir/$scenario.check-fresh.log" | tail -n +2
step_done check-fresh

for step in converge idempotence; do
    echo "== $scenario: $step"
    molecule "$step" -s "$scenario"
    step_done "$step"
done

# Tagged runs the README promises (molecule/<scenario>/tagged-runs: one set of ansible-playbook
# arguments per line): each runs alone, touches only its host and changes nothing after converge.
if [ -f "molecule/$scenario/tagged-runs" ]; then
    while read -r args; do
        case "$args" in ''|'#'*) continue;; esac
        echo "== $scenario: converge $args (must change nothing)"
        # shellcheck disable=SC2086  # the line is a list of arguments
        molecule converge -s "$scenario" -- $args >"$log_dir/$scenario.tagged.log" 2>&1 || {
            tail -40 "$log_dir/$scenario.tagged.log" >&2; echo "FAIL: converge $args" >&2; exit 1; }
        recap=$(sed 's/\x1b\[[0-9;]*m//g' "$log_dir/$scenario.tagged.log" | grep -E '^\S.* : ok=|│ \S.* : ok=' || true)
        echo "$recap"
        if echo "$recap" | grep -qE 'changed=[1-9]|failed=[1-9]'; then
            echo "FAIL: converge $args changed something after converge" >&2; exit 1
        fi
        [ "$(echo "$recap" | grep -c 'ok=')" -eq 1 ] || { echo "FAIL: converge $args ran on more than one host" >&2; exit 1; }
    done <"molecule/$scenario/tagged-runs"
    step_done tagged-runs
fi

echo "== $scenario: check (--check --diff must change nothing)"
ANSIBLE_DIFF_ALWAYS=true molecule check -s "$scenario" 2>&1 | tee "$log_dir/$scenario.check.log"
if grep -qE 'changed=[1-9]' "$log_dir/$scenario.check.log"; then
    echo "FAIL: --check --diff after converge reports changes:" >&2
    grep -E '^(changed|TASK)|changed=' "$log_dir/$scenario.check.log" | grep -B1 '^changed' >&2 || true
    exit 1
fi
grep -q 'PLAY RECAP' "$log_dir/$scenario.check.log" || { echo "FAIL: the check run printed no recap" >&2; exit 1; }
step_done check

echo "== $scenario: verify"
molecule verify -s "$scenario"
step_done verify
echo "== $scenario: passed in $(( $(date +%s) - started )) s"
