"""Built-in families; importing this package registers them. `user` loads families from the user's own code."""
from npas_serve.families import cnn2d, resnet1d, wrn  # noqa: F401
