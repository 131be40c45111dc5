"""Integrations with training frameworks.

Each submodule imports its framework itself, so ``import ckptkit`` never pulls in DeepSpeed,
transformers or Lightning. Import the one you use, e.g. ``from ckptkit.integrations import deepspeed``.
"""
