"""The engine decides; servers translate. See engine.py."""
from npas_serve.engine.engine import Engine, EngineConfig, Observation, ResidentBytes

__all__ = ["Engine", "EngineConfig", "Observation", "ResidentBytes"]
