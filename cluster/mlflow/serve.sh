#!/usr/bin/env bash
# Start the cluster's MLflow tracking server: PostgreSQL backend store, proxied artifact store,
# a Host-header allow-list and, optionally, basic auth. Configured only through environment variables
# (the systemd unit reads them from /etc/stence/mlflow.env, the Kubernetes Deployment from a Secret):
#
#   MLFLOW_BACKEND_STORE_URI      required  postgresql://mlflow:PASSWORD@db-host:5432/mlflow
#   MLFLOW_ARTIFACTS_DESTINATION  required  s3://bucket/mlflow-artifacts or a shared folder (/shared/mlflow)
#   MLFLOW_HOST                   default 127.0.0.1 (set 0.0.0.0 or a private address for cluster nodes)
#   MLFLOW_PORT                   default 5000
#   MLFLOW_PUBLIC_HOST            DNS name the nodes use (e.g. mlflow.internal); added to the allow-list
#   MLFLOW_ALLOWED_HOSTS          extra comma-separated Host patterns (e.g. 10.0.*); "*" disables the check
#   MLFLOW_WORKERS                default 2 server worker processes
#   MLFLOW_BASIC_AUTH             1 = `--app-name basic-auth` (users and permissions)
#   MLFLOW_AUTH_DATABASE_URI      required with basic auth: a SEPARATE database for users, e.g.
#                                 postgresql://mlflow:PASSWORD@db-host:5432/mlflow_auth
#   MLFLOW_AUTH_ADMIN_PASSWORD    required with basic auth on first start (creates the admin user)
#   MLFLOW_AUTH_ADMIN_USERNAME    default admin
#   MLFLOW_AUTH_DEFAULT_PERMISSION default READ
#   MLFLOW_FLASK_SERVER_SECRET_KEY CSRF key of the auth app; the same on every replica. Unset: one is
#                                 generated once and kept in MLFLOW_STATE_DIR (fine for one server)
#   MLFLOW_STATE_DIR              where the generated basic_auth.ini lives (default /var/lib/stence-mlflow)
#   MLFLOW_BIN                    mlflow executable (default: mlflow on PATH)
#   MLFLOW_SERVER_EXTRA_ARGS      appended to the command line, word-split
#
# Clients then use MLFLOW_TRACKING_URI=http://<MLFLOW_PUBLIC_HOST>:<MLFLOW_PORT> (and, with basic auth,
# MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD). Artifacts go through this server
# (mlflow-artifacts:/), so Ray workers need no S3 credentials; only this server does.
set -euo pipefail

die() { echo "serve.sh: $*" >&2; exit 2; }

: "${MLFLOW_BACKEND_STORE_URI:?serve.sh: set MLFLOW_BACKEND_STORE_URI (postgresql://user:pass@host:5432/mlflow)}"
: "${MLFLOW_ARTIFACTS_DESTINATION:?serve.sh: set MLFLOW_ARTIFACTS_DESTINATION (s3://bucket/prefix or /shared/path)}"
case "$MLFLOW_BACKEND_STORE_URI" in
  postgresql://*|postgresql+psycopg2://*) ;;
  sqlite:*) die "SQLite is for a single machine; a cluster needs PostgreSQL (many writers lock SQLite)" ;;
  *) die "MLFLOW_BACKEND_STORE_URI must be a postgresql:// URI" ;;
esac

host="${MLFLOW_HOST:-127.0.0.1}"
port="${MLFLOW_PORT:-5000}"
workers="${MLFLOW_WORKERS:-2}"
mlflow_bin="${MLFLOW_BIN:-mlflow}"
export MLFLOW_DISABLE_TELEMETRY="${MLFLOW_DISABLE_TELEMETRY:-true}"

allowed="localhost,localhost:*,127.0.0.1,127.0.0.1:*"
if [[ -n "${MLFLOW_PUBLIC_HOST:-}" ]]; then
  allowed="$allowed,${MLFLOW_PUBLIC_HOST},${MLFLOW_PUBLIC_HOST}:*"
fi
if [[ -n "${MLFLOW_ALLOWED_HOSTS:-}" ]]; then
  allowed="$allowed,${MLFLOW_ALLOWED_HOSTS}"
fi

case "$MLFLOW_ARTIFACTS_DESTINATION" in
  s3://*|gs://*|wasbs://*|abfss://*) ;;
  /*) mkdir -p "$MLFLOW_ARTIFACTS_DESTINATION" ;;
  *) die "MLFLOW_ARTIFACTS_DESTINATION must be an object-store URI or an absolute path" ;;
esac

args=(server
  --backend-store-uri "$MLFLOW_BACKEND_STORE_URI"
  --artifacts-destination "$MLFLOW_ARTIFACTS_DESTINATION"
  --serve-artifacts
  --host "$host" --port "$port" --workers "$workers"
  --allowed-hosts "$allowed")

if [[ "${MLFLOW_BASIC_AUTH:-0}" == "1" ]]; then
  : "${MLFLOW_AUTH_DATABASE_URI:?serve.sh: basic auth needs MLFLOW_AUTH_DATABASE_URI (a separate database)}"
  [[ "$MLFLOW_AUTH_DATABASE_URI" != "$MLFLOW_BACKEND_STORE_URI" ]] \
    || die "MLFLOW_AUTH_DATABASE_URI must differ from the tracking database"
  state_dir="${MLFLOW_STATE_DIR:-/var/lib/stence-mlflow}"
  mkdir -p "$state_dir"
  ini="$state_dir/basic_auth.ini"
  (umask 077; cat > "$ini") <<INI
[mlflow]
default_permission = ${MLFLOW_AUTH_DEFAULT_PERMISSION:-READ}
database_uri = ${MLFLOW_AUTH_DATABASE_URI}
admin_username = ${MLFLOW_AUTH_ADMIN_USERNAME:-admin}
authorization_function = mlflow.server.auth:authenticate_request_basic_auth
INI
  export MLFLOW_AUTH_CONFIG_PATH="$ini"
  if [[ -z "${MLFLOW_FLASK_SERVER_SECRET_KEY:-}" ]]; then
    key_file="$state_dir/flask_secret_key"
    [[ -s "$key_file" ]] || (umask 077; od -An -tx1 -N32 /dev/urandom | tr -d ' \n' > "$key_file")
    MLFLOW_FLASK_SERVER_SECRET_KEY="$(cat "$key_file")"
    export MLFLOW_FLASK_SERVER_SECRET_KEY
  fi
  args+=(--app-name basic-auth)
fi

# shellcheck disable=SC2206  # word splitting of the extra arguments is intended
extra=(${MLFLOW_SERVER_EXTRA_ARGS:-})
echo "serve.sh: mlflow server on ${host}:${port}, artifacts -> ${MLFLOW_ARTIFACTS_DESTINATION}, allowed hosts ${allowed}" >&2
exec "$mlflow_bin" "${args[@]}" "${extra[@]}"
