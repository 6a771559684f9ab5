"""Helpers shared by the test suite (import as ``support``: pytest puts tests/ on sys.path)."""

from .broker import BrokerError, TestBroker

__all__ = ["BrokerError", "TestBroker"]
