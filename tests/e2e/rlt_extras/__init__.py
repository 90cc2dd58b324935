"""Shipped to the test cluster with runtime_env.py_modules, as a user's own code would be."""
