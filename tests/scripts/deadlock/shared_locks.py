"""Locks shared through a module (imported by module_attr.py)."""
import threading

orders = threading.Lock()
inventory = threading.RLock()
