"""The worker: consumers, delivery handling, task execution and process supervision."""

from .worker import Worker

__all__ = ["Worker"]
