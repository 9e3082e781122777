#!/usr/bin/env bash
# The team's MLflow tracking server. Defaults: the SQLite store and artifact folder beside this
# script, bound to 127.0.0.1:5000. Point jobs at it with MLFLOW_TRACKING_URI=http://HOST:PORT.
#   MLFLOW_BACKEND_URI  sqlite:///... (default) or postgresql+psycopg2://user:pass@host/db (pip install psycopg2-binary)
#   MLFLOW_ARTIFACTS    where artifacts live (default: mlflow/artifacts beside this script); the
#                       server proxies them, so jobs need only the HTTP URI
#   MLFLOW_HOST / MLFLOW_PORT   bind address (127.0.0.1 unless you mean to expose it) and port
#   MLFLOW_ALLOWED_HOSTS  Host headers the server accepts (--allowed-hosts; fnmatch patterns, port
#                       included). Replaces MLflow's default (localhost and private IPs), so name
#                       them all: mlflow.example.org:*,localhost:*,127.0.0.1:*,10.*
#   MLFLOW_WORKERS      uvicorn worker processes (MLflow's default: 4)
# Basic auth (MLflow's basic-auth app; every request then needs a user and password):
#   MLFLOW_AUTH=1       turn it on
#   MLFLOW_AUTH_ADMIN_PASSWORD  the admin's password (>= 12 characters), required until the admin
#                       exists in the auth database; MLFLOW_AUTH_ADMIN_USERNAME (default: admin)
#   MLFLOW_AUTH_DB_URI  users and permissions (default: sqlite:///mlflow/basic_auth.db beside this script)
#   MLFLOW_AUTH_DEFAULT_PERMISSION  what a signed-in user may do on others' experiments (default READ)
#   MLFLOW_AUTH_CONFIG_PATH  your own basic_auth.ini instead of the one written from the variables above
#   MLFLOW_FLASK_SERVER_SECRET_KEY  CSRF key of the sign-up form (default: random per start; set it
#                       when several servers share one auth database)
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
bin="${MLFLOW_BIN:-$here/../.venv/bin/mlflow}"
host="${MLFLOW_HOST:-127.0.0.1}"
args=(--backend-store-uri "${MLFLOW_BACKEND_URI:-sqlite:///$here/mlflow.db}"
      --artifacts-destination "${MLFLOW_ARTIFACTS:-$here/artifacts}"
      --host "$host" --port "${MLFLOW_PORT:-5000}")
[ -n "${MLFLOW_ALLOWED_HOSTS:-}" ] && args+=(--allowed-hosts "$MLFLOW_ALLOWED_HOSTS")
[ -n "${MLFLOW_WORKERS:-}" ] && args+=(--workers "$MLFLOW_WORKERS")

if [ "${MLFLOW_AUTH:-0}" = 1 ]; then
  auth_db="${MLFLOW_AUTH_DB_URI:-sqlite:///$here/basic_auth.db}"
  admin_user="${MLFLOW_AUTH_ADMIN_USERNAME:-admin}"
  if [ -z "${MLFLOW_AUTH_ADMIN_PASSWORD:-}" ]; then
    db_file="${auth_db#sqlite:///}"
    # only a SQLite auth store can be seen to hold the admin already; any other one needs the password
    if [[ "$auth_db" != sqlite:///* ]] || [ ! -s "$db_file" ] || [ -n "${MLFLOW_AUTH_CONFIG_PATH:-}" ]; then
      echo "mlflow/server.sh: MLFLOW_AUTH=1 needs MLFLOW_AUTH_ADMIN_PASSWORD (12 characters or more) to create" \
           "the admin user '$admin_user' in $auth_db; no default password ships with this repository." >&2
      exit 2
    fi
  elif [ "${#MLFLOW_AUTH_ADMIN_PASSWORD}" -lt 12 ]; then
    echo "mlflow/server.sh: MLFLOW_AUTH_ADMIN_PASSWORD must be at least 12 characters (MLflow's password rule)." >&2
    exit 2
  fi
  if [ -z "${MLFLOW_AUTH_CONFIG_PATH:-}" ]; then
    # the ini holds no secret: MLflow reads the admin password from the environment
    MLFLOW_AUTH_CONFIG_PATH="$(mktemp --suffix=.ini "${TMPDIR:-/tmp}/mlflow-basic-auth.XXXXXX")"
    cat > "$MLFLOW_AUTH_CONFIG_PATH" <<EOF
[mlflow]
default_permission = ${MLFLOW_AUTH_DEFAULT_PERMISSION:-READ}
database_uri = $auth_db
admin_username = $admin_user
authorization_function = mlflow.server.auth:authenticate_request_basic_auth
EOF
    export MLFLOW_AUTH_CONFIG_PATH
  fi
  if [ -z "${MLFLOW_FLASK_SERVER_SECRET_KEY:-}" ]; then
    MLFLOW_FLASK_SERVER_SECRET_KEY="$(od -An -N32 -tx1 /dev/urandom | tr -d ' \n')"
    export MLFLOW_FLASK_SERVER_SECRET_KEY
  fi
  args+=(--app-name basic-auth)
  echo "mlflow/server.sh: basic auth on (users in $auth_db, admin '$admin_user')" >&2
elif [ "$host" != 127.0.0.1 ] && [ "$host" != localhost ] && [ "$host" != ::1 ]; then
  echo "mlflow/server.sh: WARNING: serving on $host without authentication: anyone who reaches it can" \
       "read and delete runs. Set MLFLOW_AUTH=1 (see mlflow/README.md)." >&2
fi
exec "$bin" server "${args[@]}" "$@"
