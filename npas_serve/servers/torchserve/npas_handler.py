"""The handler file packed into every .mar: TorchServe imports it by file name from the unpacked archive.

The class is defined here, not only imported, because TorchServe takes the one class whose
`__module__` is this file. The code itself stays in the installed package (`handler.py`),
so a .mar carries no code of its own beyond these lines.
"""
from npas_serve.servers.torchserve.handler import NpasHandler as _PackagedHandler


class NpasHandler(_PackagedHandler):
    """`npas_serve.servers.torchserve.handler.NpasHandler`, under a module TorchServe loads by path."""
