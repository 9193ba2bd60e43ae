"""Built-in families; importing this package registers them."""
from npas_serve.families import cnn2d, resnet1d  # noqa: F401
