"""Thin glue between moeify and other libraries, one module per library, imported on use:

from moeify.integrations.accelerate import prepare, register_state
"""
