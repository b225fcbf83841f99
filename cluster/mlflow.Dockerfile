# syntax=docker/dockerfile:1
#
# The MLflow tracking server image. The official MLflow image has neither a PostgreSQL driver nor
# boto3, and this deployment needs both (PostgreSQL backend store, S3 artifact store).
# The server's MLflow version is the client's (requirements/lock-cpu.txt: mlflow==3.17.2):
# tests/unit/test_manifests.py checks that they agree.
#
#   docker build -t REGISTRY/embsum-mlflow:3.17.2 - < cluster/mlflow.Dockerfile
#
FROM python:3.11-slim

ARG MLFLOW_VERSION=3.17.2

# mlflow[auth]: the basic-auth app (Flask-WTF for its CSRF protection) that mlflow-start.sh runs.
RUN pip install --no-cache-dir \
        "mlflow[auth]==${MLFLOW_VERSION}" \
        "psycopg2-binary>=2.9,<3" \
        "boto3>=1.34,<2" \
    && useradd --uid 1000 --create-home mlflow

ENV MLFLOW_DISABLE_TELEMETRY=true \
    DO_NOT_TRACK=true

USER 1000
WORKDIR /home/mlflow
EXPOSE 5000
ENTRYPOINT ["mlflow"]
CMD ["server", "--help"]
