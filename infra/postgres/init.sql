-- One database each for MLflow's and Prefect's state.
CREATE DATABASE mlflow;
CREATE DATABASE prefect;
