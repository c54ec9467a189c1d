#!/usr/bin/env bash
# Run one Molecule scenario's full sequence — create, prepare, converge, idempotence, a
# `--check --diff` run that must report nothing to change, verify — and always destroy.
#
#   molecule/resources/test-scenario.sh SCENARIO
#
# `molecule test` runs the same steps but only prints the check run; this asserts on it.
set -euo pipefail
scenario=${1:?usage: test-scenario.sh SCENARIO}
log_dir=${MOLECULE_LOG_DIR:-.cache/molecule}
mkdir -p "$log_dir"
started=$(date +%s)

cleanup() { molecule destroy -s "$scenario" >"$log_dir/$scenario.destroy.log" 2>&1 || cat "$log_dir/$scenario.destroy.log"; }
trap cleanup EXIT

molecule destroy -s "$scenario" >"$log_dir/$scenario.destroy.log" 2>&1
for step in create prepare converge idempotence; do
    echo "== $scenario: $step"
    molecule "$step" -s "$scenario"
done

echo "== $scenario: check (--check --diff must change nothing)"
ANSIBLE_DIFF_ALWAYS=true molecule check -s "$scenario" 2>&1 | tee "$log_dir/$scenario.check.log"
if grep -qE 'changed=[1-9]' "$log_dir/$scenario.check.log"; then
    echo "FAIL: --check --diff after converge reports changes:" >&2
    grep -E '^(changed|TASK)|changed=' "$log_dir/$scenario.check.log" | grep -B1 '^changed' >&2 || true
    exit 1
fi
grep -q 'PLAY RECAP' "$log_dir/$scenario.check.log" || { echo "FAIL: the check run printed no recap" >&2; exit 1; }

echo "== $scenario: verify"
molecule verify -s "$scenario"
echo "== $scenario: passed in $(( $(date +%s) - started )) s"
