#!/bin/sh
# Starts MLflow's tracking server behind its basic-auth app (mlflow server --app-name basic-auth):
# every request but /health needs HTTP basic credentials, so nobody without them can read runs or
# move the registry alias. The MLflow Deployment (mlflow.yaml) runs this file from ConfigMap
# embsum-mlflow:
#
#   sh /etc/mlflow/start.sh --host=0.0.0.0 --port=5000 ...       (the rest: mlflow server options)
#
# From the environment (Secrets, never the pod spec or the process arguments):
#   MLFLOW_BACKEND_STORE_URI        the backend store; the auth app keeps its users there too
#   MLFLOW_AUTH_ADMIN_USERNAME/PASSWORD   the admin the auth app creates on first start (Secret
#                                   mlflow-auth, the same keys every client reads as
#                                   MLFLOW_TRACKING_USERNAME/PASSWORD)
#   MLFLOW_FLASK_SERVER_SECRET_KEY  CSRF key, equal on every replica (Secret mlflow-db)
# The admin is created once: changing the Secret later does not change the stored password
# (rotate it with MLflow's update-password API, then update the Secret).
set -eu
: "${MLFLOW_BACKEND_STORE_URI:?set MLFLOW_BACKEND_STORE_URI}"
: "${MLFLOW_AUTH_ADMIN_USERNAME:?set MLFLOW_AUTH_ADMIN_USERNAME (Secret mlflow-auth)}"
: "${MLFLOW_AUTH_ADMIN_PASSWORD:?set MLFLOW_AUTH_ADMIN_PASSWORD (Secret mlflow-auth)}"
: "${MLFLOW_FLASK_SERVER_SECRET_KEY:?set MLFLOW_FLASK_SERVER_SECRET_KEY (Secret mlflow-db)}"

MLFLOW_AUTH_CONFIG_PATH="${MLFLOW_AUTH_CONFIG_PATH:-/tmp/mlflow-auth/basic_auth.ini}"
export MLFLOW_AUTH_CONFIG_PATH
mkdir -p "$(dirname "$MLFLOW_AUTH_CONFIG_PATH")"
umask 077
# No default permission for users the admin creates later; only the admin exists at first.
cat > "$MLFLOW_AUTH_CONFIG_PATH" <<INI
[mlflow]
default_permission = NO_PERMISSIONS
database_uri = ${MLFLOW_BACKEND_STORE_URI}
authorization_function = mlflow.server.auth:authenticate_request_basic_auth
INI
exec mlflow server --app-name basic-auth "$@"
