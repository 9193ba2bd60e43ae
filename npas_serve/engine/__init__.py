"""The engine decides; servers translate. See engine.py."""
from npas_serve.engine.engine import Engine, EngineConfig
from npas_serve.engine.memory import ResidentBytes
from npas_serve.engine.run import Observation

__all__ = ["Engine", "EngineConfig", "Observation", "ResidentBytes"]
