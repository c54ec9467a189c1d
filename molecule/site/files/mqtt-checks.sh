#!/usr/bin/env bash
# MQTT checks run from the LAN client against the server's broker (molecule verify).
#
#   mqtt-checks.sh DIR
#
# DIR holds ca.crt and, per identity (gateway, meter1, meter2, wrongpw), DIR/<identity>/mosquitto_pub and
# mosquitto_sub option files with the host, port, CA and credentials — credentials never go on a
# command line. Prints PASS/FAIL per check; exits 1 when any check failed.
set -uo pipefail
dir=${1:?usage: mqtt-checks.sh DIR}
host=mqtt.home.test
topic=home/power
failures=0
pass() { echo "PASS $1"; }
fail() { echo "FAIL $1: $2"; failures=$((failures + 1)); }
as() { local who=$1; shift; XDG_CONFIG_HOME="$dir/$who" "$@"; }
token() { echo "verify-$RANDOM-$RANDOM-$1"; }

# Subscribe as $1 to $2 for at most $3 s, waiting for one message; its output goes to $4.
# The scenario's Pi publishes its live readings as ${PI_SOURCE} all along: filtered out (-T), so
# the one message awaited is the check's own.
PI_SOURCE=${PI_SOURCE:-meter3}
subscribe() { as "$1" mosquitto_sub -V mqttv311 -t "$2" -T "$topic/$PI_SOURCE" -q 1 -C 1 -W "$3" >"$4" 2>&1 & sleep 1; }

# 1. The right credentials and CA: meter1 publishes its own topic, the gateway receives it.
msg=$(token own)
subscribe gateway "$topic/#" 10 "$dir/own.out"
sub=$!
if as meter1 mosquitto_pub -t "$topic/meter1" -q 1 -m "$msg" 2>"$dir/own.err"; then
    wait "$sub"
    if grep -qx "$msg" "$dir/own.out"; then pass "meter1 -> $topic/meter1 reaches the gateway over TLS"
    else fail "own topic" "the gateway did not receive it: $(cat "$dir/own.out")"; fi
else
    wait "$sub"; fail "own topic" "mosquitto_pub failed: $(cat "$dir/own.err")"
fi

# 2. Refusals at connect time: each must fail and say why.
refused() {  # name, expected error pattern, command...
    local name=$1 pattern=$2; shift 2
    local out
    if out=$("$@" -t "$topic/meter1" -q 1 -m refused 2>&1); then
        fail "$name" "was accepted"
    elif grep -qiE "$pattern" <<<"$out"; then pass "$name is refused ($(head -1 <<<"$out"))"
    else fail "$name" "failed for another reason: $out"; fi
}
refused "an anonymous client" "not authori[sz]ed" \
    mosquitto_pub -h "$host" -p 8883 --cafile "$dir/ca.crt"
refused "a wrong password" "not authori[sz]ed" as wrongpw mosquitto_pub
refused "a CA that did not sign the broker" "certificate verify failed|tls|protocol error" \
    as meter1 mosquitto_pub --cafile /etc/ssl/certs/ca-certificates.crt
refused "a host name not in the certificate" "certificate verify failed|hostname|tls|protocol error" \
    as meter1 mosquitto_pub -h other.home.test
# mosquitto_pub turns TLS on by itself for port 8883, so plaintext is spoken by hand: an MQTT 3.1.1
# CONNECT over bare TCP must never be answered with a CONNACK (0x20).
plain=$(python3 - "$host" <<'PY'
import socket, sys
s = socket.create_connection((sys.argv[1], 8883), timeout=5)
s.sendall(bytes([0x10, 12, 0, 4]) + b"MQTT" + bytes([4, 2, 0, 60, 0, 0]))
try:
    reply = s.recv(4)
    print(reply[:1].hex() or "closed")
except OSError as exc:
    print(type(exc).__name__)
PY
)
if [ "$plain" = 20 ]; then fail "plaintext MQTT on 8883" "the broker answered with a CONNACK"
else pass "plaintext MQTT on 8883 gets no CONNACK ($plain)"; fi

# 2b. TLS 1.2 offers only AEAD suites (Mozilla "intermediate"): an obsolete CBC suite gets no
#     handshake, a modern one does. Both over TLS 1.2 exactly, so TLS 1.3 cannot mask the answer.
tls12() {  # cipher -> prints "ok <cipher>" or the handshake error
    python3 - "$host" "$dir/ca.crt" "$1" <<'PY'
import socket, ssl, sys
host, ca, cipher = sys.argv[1:]
ctx = ssl.create_default_context(cafile=ca)
ctx.minimum_version = ctx.maximum_version = ssl.TLSVersion.TLSv1_2
ctx.set_ciphers(cipher)
try:
    with socket.create_connection((host, 8883), timeout=5) as raw:
        with ctx.wrap_socket(raw, server_hostname=host) as tls:
            print("ok", tls.cipher()[0])
except (ssl.SSLError, OSError) as exc:
    print("refused", type(exc).__name__, exc)
PY
}
for cipher in ECDHE-RSA-AES128-GCM-SHA256 ECDHE-RSA-CHACHA20-POLY1305; do
    out=$(tls12 "$cipher")
    if [[ $out == "ok $cipher" ]]; then pass "TLS 1.2 with $cipher is accepted"
    else fail "TLS 1.2 with $cipher" "$out"; fi
done
for cipher in ECDHE-RSA-AES128-SHA AES128-SHA AES256-SHA256 ECDHE-RSA-AES256-SHA384; do
    out=$(tls12 "$cipher")
    if [[ $out == refused* ]]; then pass "TLS 1.2 with CBC suite $cipher is refused"
    else fail "TLS 1.2 with CBC suite $cipher" "was accepted: $out"; fi
done

# 3. Forbidden writes are dropped. Each is followed by an allowed publish the gateway must
#    receive first, so a check cannot pass just because nothing was published at all.
forbidden_write() {  # name, identity, topic
    local forbidden allowed
    forbidden=$(token forbidden) allowed=$(token allowed)
    subscribe gateway "$topic/#" 10 "$dir/write.out"
    local sub=$!
    as "$2" mosquitto_pub -t "$3" -q 1 -m "$forbidden" >/dev/null 2>&1
    as meter1 mosquitto_pub -t "$topic/meter1" -q 1 -m "$allowed" >/dev/null 2>&1
    wait "$sub"
    if grep -qx "$allowed" "$dir/write.out"; then pass "$1"
    else fail "$1" "the gateway received: $(cat "$dir/write.out")"; fi
}
forbidden_write "meter1 cannot write $topic/meter2" meter1 "$topic/meter2"
forbidden_write "meter1 cannot write outside $topic" meter1 "other/topic"
forbidden_write "the gateway cannot publish" gateway "$topic/meter1"

# 4. A publisher reads nothing, not even its own topic: Mosquitto 2.0 grants the SUBSCRIBE but
#    delivers nothing the ACL does not let it read. The gateway, subscribed at the same time,
#    proves the message was there to be read.
for t in "$topic/#" "$topic/meter1" "#"; do
    msg=$(token read)
    subscribe gateway "$topic/#" 10 "$dir/read-gw.out"
    gw=$!
    subscribe meter1 "$t" 5 "$dir/read-meter1.out"
    m1=$!
    as meter1 mosquitto_pub -t "$topic/meter1" -q 1 -m "$msg" >/dev/null 2>&1
    wait "$gw" "$m1"
    if ! grep -qx "$msg" "$dir/read-gw.out"; then fail "read $t" "the gateway did not get the control message"
    elif grep -q "$msg" "$dir/read-meter1.out"; then fail "read $t" "meter1 read a message on $t"
    else pass "meter1 reads nothing on $t"; fi
done

# 5. Receipts (what InfluxDB stored): only the gateway writes them, only their source reads them.
#    meter1's forged receipt must be dropped, so the first one meter1 gets is the gateway's;
#    meter2, subscribed at the same time, gets nothing.
receipts=homeiot/receipts
forged=$(token forged) real=$(token receipt)
subscribe meter1 "$receipts/meter1" 10 "$dir/receipt-meter1.out"
m1=$!
subscribe meter2 "$receipts/#" 5 "$dir/receipt-meter2.out"
m2=$!
as meter1 mosquitto_pub -t "$receipts/meter1" -q 1 -m "$forged" >/dev/null 2>&1
as gateway mosquitto_pub -t "$receipts/meter1" -q 1 -m "$real" >/dev/null 2>&1
wait "$m1" "$m2"
if ! grep -qx "$real" "$dir/receipt-meter1.out"; then
    fail "receipts" "meter1 received: $(cat "$dir/receipt-meter1.out")"
elif grep -q "verify-" "$dir/receipt-meter2.out"; then
    fail "receipts" "meter2 read meter1's receipt: $(cat "$dir/receipt-meter2.out")"
else pass "only the gateway writes meter1's receipts and only meter1 reads them"; fi

[ "$failures" -eq 0 ] || { echo "$failures check(s) failed"; exit 1; }
