"""The file MLflow executes to load a registered UniToken model (models-from-code: no pickle).

It is copied into every registered model; the code it imports is the installed ``unitoken``
package (our image, or ``pip install`` of this repository).
"""

from mlflow.models import set_model

from unitoken.registry.serving import UniTokenModel

set_model(UniTokenModel())
