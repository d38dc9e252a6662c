-- Run once by the postgres image on an empty volume (docker-compose.yaml): MLflow's database beside Prefect's.
CREATE DATABASE mlflow OWNER alignflow;
