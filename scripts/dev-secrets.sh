#!/usr/bin/env sh
# Write ./secrets/* for a first run against the Midas simulator (docker compose --profile dev):
# the simulator's own fake Midas credentials (not secrets: worker/simulator/config.py), and
# random passwords for Postgres, Redis and Flower. Existing files are kept, so a real value
# written by hand is never overwritten. For a real game, write the real values instead
# (docs/operations.md, "Secrets").
set -eu
cd "$(dirname "$0")/.."
dir="${SECRETS_DIR:-secrets}"  # (tests write elsewhere)
mkdir -p "$dir"
# The folder is private on the host; the files inside are readable, because compose mounts
# each one into containers whose processes do not run as your user (the app's uid is 10001).
chmod 700 "$dir"
umask 022

random() { head -c 24 /dev/urandom | base64 | tr -d '/+=\n'; }

put() {  # put NAME VALUE: write secrets/NAME unless it exists
  if [ -e "$dir/$1" ]; then
    echo "$dir/$1: kept"
  else
    printf '%s' "$2" > "$dir/$1"
    echo "$dir/$1: written"
  fi
}

put postgres_password "$(random)"
put redis_password "$(random)"
put midas_app_key "sim-sandbox-appkey"
put midas_app_secret "sim-app-secret"
# A Fernet key: 32 random bytes, URL-safe base64.
put session_key_encryption_key "$(head -c 32 /dev/urandom | base64 | tr '+/' '-_' | tr -d '\n')"
# The game server's key for sealing session keys in record_login (worker/intake.py).
put session_key_transport_key "$(head -c 32 /dev/urandom | base64 | tr '+/' '-_' | tr -d '\n')"
put alert_webhooks ""
put web_session_secret "$(random)$(random)"
put flower_basic_auth "admin:$(random)"
