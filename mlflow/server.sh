#!/usr/bin/env bash
# The team's MLflow tracking server. Defaults: the SQLite store and artifact folder beside this
# script, bound to 127.0.0.1:5000. Point jobs at it with MLFLOW_TRACKING_URI=http://HOST:PORT.
#   MLFLOW_BACKEND_URI  sqlite:///... (default) or postgresql://user:pass@host/db
#   MLFLOW_ARTIFACTS    where artifacts live (default: mlflow/artifacts beside this script)
#   MLFLOW_HOST / MLFLOW_PORT   bind address (127.0.0.1 unless you mean to expose it) and port
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
bin="${MLFLOW_BIN:-$here/../.venv/bin/mlflow}"
exec "$bin" server \
  --backend-store-uri "${MLFLOW_BACKEND_URI:-sqlite:///$here/mlflow.db}" \
  --artifacts-destination "${MLFLOW_ARTIFACTS:-$here/artifacts}" \
  --host "${MLFLOW_HOST:-127.0.0.1}" --port "${MLFLOW_PORT:-5000}" "$@"
