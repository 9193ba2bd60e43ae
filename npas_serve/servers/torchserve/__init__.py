"""The TorchServe adapter: everything npas-serve needs to run under TorchServe, in one place.

- `archive`: `npas-serve archive` packs a checkpoint into a .mar (and `serve` unpacks one);
- `handler`: the worker-side adapter from TorchServe's requests to the engine;
- `npas_handler`: the file the .mar names as its handler (a subclass TorchServe can find);
- `launcher`: `npas-serve torchserve start|stop|status`, config.properties and the metrics YAML;
- `keys`: the token keys TorchServe writes into key_file.json;
- `processes`: the live processes of TorchServe's process group.
"""
