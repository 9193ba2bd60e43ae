"""The engine decides; servers translate. See engine.py."""
from npas_serve.engine.engine import Engine, EngineConfig
from npas_serve.engine.memory import ResidentBytes
from npas_serve.engine.run import Cancelled, DeadlineExceeded, Observation, ResourceExhausted

__all__ = ["Cancelled", "DeadlineExceeded", "Engine", "EngineConfig", "Observation", "ResidentBytes", "ResourceExhausted"]
