#!/usr/bin/env bash
# Start the cluster's MLflow tracking server: PostgreSQL backend store, proxied artifact store, a
# Host-header allow-list and users with permissions (MLflow's basic-auth app). Closed by default: every
# request needs a user and password, and a new user sees nothing until granted (NO_PERMISSIONS).
# Configured only through environment variables (the systemd unit reads them from /etc/stence/mlflow.env,
# mode 600; the Kubernetes Deployment from a Secret). No secret is ever put on a command line: the
# database URIs reach mlflow through its environment, which only its own user can read.
#
#   MLFLOW_BACKEND_STORE_URI      required  postgresql+psycopg2://mlflow@db-host:5432/mlflow
#                                 The password may be in the URI (it stays in the environment), or left
#                                 out and given by MLFLOW_DB_PASSWORD_FILE, PGPASSFILE or ~/.pgpass.
#   MLFLOW_DB_PASSWORD_FILE       file holding the database password (mode 600 or stricter); exported as
#                                 PGPASSWORD for both databases when their URIs carry no password
#   MLFLOW_ARTIFACTS_DESTINATION  required  s3://bucket/mlflow-artifacts or a shared folder (/shared/mlflow)
#   MLFLOW_AUTH_DATABASE_URI      required  a SEPARATE database for users and permissions, e.g.
#                                 postgresql+psycopg2://mlflow@db-host:5432/mlflow_auth
#   MLFLOW_AUTH_ADMIN_PASSWORD    the first admin's password, needed on the first start only (creates the
#   MLFLOW_AUTH_ADMIN_PASSWORD_FILE  admin user; ignored once it exists); or a file holding it
#   MLFLOW_AUTH_ADMIN_USERNAME    default admin
#   MLFLOW_AUTH_DEFAULT_PERMISSION default NO_PERMISSIONS: a user reads or changes only what was granted
#                                 to them (or what they created). READ lets every user read everything.
#   MLFLOW_AUTH_CACHE_TTL_S       default 0: every request's password is checked (PBKDF2, ~0.1-0.5 s of
#                                 CPU). N > 0 caches a good check N seconds per worker; a password change
#                                 or deleted user then takes up to N s to reach the other workers.
#   MLFLOW_FLASK_SERVER_SECRET_KEY CSRF key of the auth app; the same on every replica. Unset: one is
#                                 generated once and kept in MLFLOW_STATE_DIR (fine for one server)
#   MLFLOW_HOST                   default 127.0.0.1 (set 0.0.0.0 or a private address for cluster nodes)
#   MLFLOW_PORT                   default 5000
#   MLFLOW_PUBLIC_HOST            DNS name the nodes use (e.g. mlflow.internal); added to the allow-list
#   MLFLOW_ALLOWED_HOSTS          extra comma-separated Host patterns (e.g. 10.0.*); "*" disables the check.
#                                 This is DNS-rebinding protection, not access control: a client sets
#                                 the Host header freely. Access control is the users and permissions.
#   MLFLOW_WORKERS                default 2 server worker processes
#   MLFLOW_STATE_DIR              where the generated auth config lives (default /var/lib/stence-mlflow)
#   MLFLOW_BIN                    mlflow executable (default: mlflow on PATH)
#   MLFLOW_SERVER_EXTRA_ARGS      appended to the command line, word-split (no store URIs or credentials)
#   MLFLOW_BASIC_AUTH=0           opt out of authentication: refused unless MLFLOW_HOST is a loopback
#                                 address (a single-user machine); never for a server the nodes reach
#
# Add users with `stence cluster user add NAME` (see README, "Run on a cluster"). Clients then use
# MLFLOW_TRACKING_URI=http://<MLFLOW_PUBLIC_HOST>:<MLFLOW_PORT> with MLFLOW_TRACKING_USERNAME and
# MLFLOW_TRACKING_PASSWORD. Artifacts go through this server (mlflow-artifacts:/), under the same
# permissions, so Ray workers need no S3 credentials; only this server does.
set -euo pipefail

die() { echo "serve.sh: $*" >&2; exit 2; }

# The contents of a secret file, refused when others may read it (as ssh does with keys).
read_secret_file() {
  local var="$1" path="$2" mode
  [[ -f "$path" && -r "$path" ]] || die "$var: cannot read $path"
  mode=$(stat -c %a "$path")
  (( (8#$mode & 8#077) == 0 )) || die "$var: $path is readable by others (mode $mode); chmod 600 $path"
  head -n 1 "$path" | tr -d '\r\n'
}

: "${MLFLOW_BACKEND_STORE_URI:?serve.sh: set MLFLOW_BACKEND_STORE_URI (postgresql+psycopg2://user@host:5432/mlflow)}"
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

if [[ -n "${MLFLOW_DB_PASSWORD_FILE:-}" ]]; then
  PGPASSWORD="$(read_secret_file MLFLOW_DB_PASSWORD_FILE "$MLFLOW_DB_PASSWORD_FILE")"
  export PGPASSWORD  # libpq's own variable: used for every connection whose URI has no password
fi

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

# shellcheck disable=SC2206  # word splitting of the extra arguments is intended
extra=(${MLFLOW_SERVER_EXTRA_ARGS:-})
for word in "${extra[@]}"; do
  case "$word" in
    --backend-store-uri*|--registry-store-uri*|--read-replica-backend-store-uri*|--app-name*)
      die "MLFLOW_SERVER_EXTRA_ARGS must not set $word: use the environment variables above" ;;
    *://*@*) die "MLFLOW_SERVER_EXTRA_ARGS holds a URI with credentials; they would be visible to every user in the process list" ;;
  esac
done

# The store URIs go to mlflow through its environment (its --backend-store-uri option reads
# MLFLOW_BACKEND_STORE_URI), never through argv, which every local user can read in /proc/*/cmdline.
export MLFLOW_BACKEND_STORE_URI
args=(server
  --artifacts-destination "$MLFLOW_ARTIFACTS_DESTINATION" --serve-artifacts
  --host "$host" --port "$port" --workers "$workers"
  --allowed-hosts "$allowed")

if [[ "${MLFLOW_BASIC_AUTH:-1}" == "0" ]]; then
  case "$host" in
    127.*|localhost|::1) ;;
    *) die "MLFLOW_BASIC_AUTH=0 on $host would let anyone who reaches it delete experiments and move @champion; authentication can only be turned off for a loopback MLFLOW_HOST" ;;
  esac
  echo "serve.sh: WARNING: authentication is OFF; every local user can read and change runs and models" >&2
else
  : "${MLFLOW_AUTH_DATABASE_URI:?serve.sh: set MLFLOW_AUTH_DATABASE_URI (a separate database for users and permissions; MLFLOW_BASIC_AUTH=0 only on a loopback host)}"
  [[ "$MLFLOW_AUTH_DATABASE_URI" != "$MLFLOW_BACKEND_STORE_URI" ]] \
    || die "MLFLOW_AUTH_DATABASE_URI must differ from the tracking database"
  permission="${MLFLOW_AUTH_DEFAULT_PERMISSION:-NO_PERMISSIONS}"
  case "$permission" in
    NO_PERMISSIONS|READ) ;;
    USE|EDIT|MANAGE) die "MLFLOW_AUTH_DEFAULT_PERMISSION=$permission would let every user change every model (and move @champion); use NO_PERMISSIONS and grant per model" ;;
    *) die "MLFLOW_AUTH_DEFAULT_PERMISSION must be NO_PERMISSIONS or READ" ;;
  esac
  if [[ -n "${MLFLOW_AUTH_ADMIN_PASSWORD_FILE:-}" ]]; then
    MLFLOW_AUTH_ADMIN_PASSWORD="$(read_secret_file MLFLOW_AUTH_ADMIN_PASSWORD_FILE "$MLFLOW_AUTH_ADMIN_PASSWORD_FILE")"
    export MLFLOW_AUTH_ADMIN_PASSWORD
  fi
  cache_ttl="${MLFLOW_AUTH_CACHE_TTL_S:-0}"
  [[ "$cache_ttl" =~ ^[0-9]+$ ]] || die "MLFLOW_AUTH_CACHE_TTL_S must be a whole number of seconds"
  state_dir="${MLFLOW_STATE_DIR:-/var/lib/stence-mlflow}"
  (umask 077; mkdir -p "$state_dir")
  ini="$state_dir/basic_auth.ini"
  # The auth database URI can only be given in this file (mode 600, like the env file it came from).
  (umask 077; rm -f "$ini"; cat > "$ini") <<INI
[mlflow]
default_permission = ${permission}
database_uri = ${MLFLOW_AUTH_DATABASE_URI}
admin_username = ${MLFLOW_AUTH_ADMIN_USERNAME:-admin}
authorization_function = mlflow.server.auth:authenticate_request_basic_auth
grant_default_workspace_access = false
auth_cache_ttl_seconds = ${cache_ttl}
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

auth_note="users and permissions (default ${permission:-none})"
[[ "${MLFLOW_BASIC_AUTH:-1}" == "0" ]] && auth_note="NO authentication"
echo "serve.sh: mlflow server on ${host}:${port}, ${auth_note}, artifacts -> ${MLFLOW_ARTIFACTS_DESTINATION}, allowed hosts ${allowed}" >&2
exec "$mlflow_bin" "${args[@]}" "${extra[@]}"
