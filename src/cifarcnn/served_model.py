"""The served model as code (MLflow's models-from-code): MLflow runs this file to build the
model it serves, instead of unpickling an object (which can run any code, and which MLflow warns
about on every log). The logged model carries the cifarcnn package (``code_paths``), so the
import below works without the repository. The model itself is cifarcnn.serving.ImageClassifier.
"""
import mlflow

from cifarcnn.serving import ImageClassifier

mlflow.models.set_model(ImageClassifier())
