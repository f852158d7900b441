"""The registered model's code (MLflow's models-from-code): logged as a file, nothing pickled."""

from mlflow.models import set_model

from charlm.tracking import CharLMPyfunc

set_model(CharLMPyfunc())
