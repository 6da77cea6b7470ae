#!/bin/sh
# deploy/smoke.sh: the steps of docs/deploy.md, scripted, except Postfix and systemd.
#
# Installs listserv into a fresh venv from this checkout, writes a production-style
# config (LMTP in, SMTP out to a relay), makes the DKIM key, creates a list, adds
# members, starts the server, posts as Postfix would (LMTP), checks that every
# member's copy reached the relay, shows `listserv status`, takes a backup, and
# stops the server with SIGTERM.  Postfix is played by a small aiosmtpd server that
# stores what it gets in a Maildir.  Only 127.0.0.1 and free high ports are used.
#
#   deploy/smoke.sh [WORKDIR]        (default: a new folder under $TMPDIR or /tmp)
#
# Environment:
#   PYTHON        Python 3.11+ used to make the venv (default: python3)
#   LISTSERV      an installed listserv command; skips the venv step
#                 (e.g. LISTSERV=".venv/bin/listserv", or "python3 -m listserv")
#   SMOKE_PYTHON  a Python with aiosmtpd for the stand-in relay and the test post
#                 (default: the venv's)
#
# Exit status 0 and a last line "smoke: OK" mean a working list.
set -eu

CHECKOUT=$(cd "$(dirname "$0")/.." && pwd)
WORK=${1:-$(mktemp -d "${TMPDIR:-/tmp}/listserv-smoke.XXXXXX")}
mkdir -p "$WORK"
WORK=$(cd "$WORK" && pwd)
SERVE_PID=""
RELAY_PID=""

say() { printf 'smoke: %s\n' "$*"; }
fail() { printf 'smoke: FAILED: %s\n' "$*" >&2; [ -f "$WORK/serve.log" ] && tail -n 30 "$WORK/serve.log" >&2; exit 1; }

cleanup() {
    for pid in $SERVE_PID $RELAY_PID; do
        kill "$pid" 2>/dev/null || true
    done
    for pid in $SERVE_PID $RELAY_PID; do
        wait "$pid" 2>/dev/null || true
    done
}
trap cleanup EXIT
trap 'exit 1' INT TERM

# -- step 1: install ------------------------------------------------------------------------
if [ -z "${LISTSERV:-}" ]; then
    say "installing listserv from $CHECKOUT into $WORK/venv"
    "${PYTHON:-python3}" -m venv "$WORK/venv"
    "$WORK/venv/bin/pip" install --quiet "$CHECKOUT"
    LISTSERV="$WORK/venv/bin/listserv"
    SMOKE_PYTHON=${SMOKE_PYTHON:-$WORK/venv/bin/python}
fi
SMOKE_PYTHON=${SMOKE_PYTHON:-python3}
$LISTSERV --version

free_port() {
    "$SMOKE_PYTHON" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}
LMTP_PORT=${LMTP_PORT:-$(free_port)}
RELAY_PORT=${RELAY_PORT:-$(free_port)}

# -- step 2: the config (docs/deploy.md step 2, with paths under $WORK) ------------------------
mkdir -p "$WORK/etc" "$WORK/state" "$WORK/backup"
CONFIG="$WORK/etc/config.toml"
cat > "$CONFIG" <<EOF
[server]
domain = "lists.example.org"
listen = "127.0.0.1:$LMTP_PORT"
protocol = "lmtp"
state_dir = "$WORK/state"
log_level = "info"

[delivery]
mode = "smtp"
relay = "127.0.0.1:$RELAY_PORT"

[dkim]
selector = "listserv"
private_key = "$WORK/state/dkim.key"

[archive]
dir = "$WORK/archive"
base_url = ""

# The smoke test runs offline: no resolver to ask (posts stay "unverified").
[dns]
nameservers = ["127.0.0.1:9"]
timeout = 0.5
EOF
say "wrote $CONFIG"
export LISTSERV_CONFIG="$CONFIG"

# -- step 3: the DKIM key and its DNS record -------------------------------------------------------
$LISTSERV dkim keygen > "$WORK/dkim-record.txt"
grep -q 'v=DKIM1' "$WORK/dkim-record.txt" || fail "no DKIM record printed"
say "DKIM record to publish: $WORK/dkim-record.txt"

# -- step 4: a list and its members -------------------------------------------------------------------
$LISTSERV list create seap-planning --title "Planowanie SEAP" --owner koordynator@pnec.example.pl
$LISTSERV members add seap-planning anna@gmina.example.pl jan@um.example.pl ewa@energia.example.org
$LISTSERV lists

# -- the relay (Postfix's place) ------------------------------------------------------------------------
"$SMOKE_PYTHON" -m aiosmtpd -n -l "127.0.0.1:$RELAY_PORT" -c aiosmtpd.handlers.Mailbox "$WORK/relay-maildir" \
    > "$WORK/relay.log" 2>&1 &
RELAY_PID=$!

# -- step 5: start the server ------------------------------------------------------------------------------
$LISTSERV serve > "$WORK/serve.log" 2>&1 &
SERVE_PID=$!
tries=0
until $LISTSERV status > "$WORK/status.txt" 2>&1; do
    kill -0 "$SERVE_PID" 2>/dev/null || fail "listserv serve exited"
    tries=$((tries + 1))
    [ "$tries" -lt 300 ] || fail "listserv did not come up"
    sleep 0.2
done
say "server is up: $(head -n 1 "$WORK/status.txt")"

# -- step 6: a post, handed over as Postfix hands it (LMTP) ---------------------------------------------------
MESSAGE_ID="smoke-$$-$(date +%s)@gmina.example.pl"
"$SMOKE_PYTHON" - "$LMTP_PORT" "$MESSAGE_ID" <<'EOF'
import smtplib, sys
from email.message import EmailMessage
m = EmailMessage()
m["From"] = "Anna Kowalska <anna@gmina.example.pl>"
m["To"] = "seap-planning@lists.example.org"
m["Subject"] = "Harmonogram prac nad SEAP — prośba o uwagi"
m["Message-ID"] = f"<{sys.argv[2]}>"
m.set_content("Dzień dobry,\nprzesyłam harmonogram. Proszę o uwagi do piątku.\n")
with smtplib.LMTP("127.0.0.1", int(sys.argv[1])) as client:
    client.send_message(m, from_addr="anna@gmina.example.pl", to_addrs=["seap-planning@lists.example.org"])
EOF
say "posted <$MESSAGE_ID>"

# -- step 7: every member's copy reaches the relay ------------------------------------------------------------------
copies_for() {
    cat "$WORK"/relay-maildir/new/* 2>/dev/null | grep '^X-RcptTo:' | grep -c "$1" || true
}
tries=0
for rcpt in anna@gmina.example.pl jan@um.example.pl ewa@energia.example.org koordynator@pnec.example.pl; do
    until [ "$(copies_for "$rcpt")" -ge 1 ]; do
        tries=$((tries + 1))
        [ "$tries" -lt 300 ] || fail "no copy for $rcpt at the relay"
        sleep 0.2
    done
    [ "$(copies_for "$rcpt")" -eq 1 ] || fail "$rcpt got $(copies_for "$rcpt") copies"
    say "delivered to $rcpt"
done
grep -q "DKIM-Signature:" "$WORK"/relay-maildir/new/* || fail "copies are not DKIM-signed"

# -- step 8: what an operator looks at -------------------------------------------------------------------------------
$LISTSERV status
say "the log's story of <$MESSAGE_ID>:"
grep -F "$MESSAGE_ID" "$WORK/serve.log"
grep -F "$MESSAGE_ID" "$WORK/serve.log" | grep -q " delivered " || fail "no 'delivered' line for <$MESSAGE_ID>"
$LISTSERV backup "$WORK/backup/listserv-$(date +%Y%m%d-%H%M%S).sqlite3"

# -- step 9: stop gracefully ----------------------------------------------------------------------------------------------
kill -TERM "$SERVE_PID"
wait "$SERVE_PID" || fail "listserv serve exited with $? after SIGTERM"
SERVE_PID=""
if $LISTSERV status > /dev/null 2>&1; then fail "status still says up after the stop"; fi
say "stopped; everything is in $WORK"
say OK
