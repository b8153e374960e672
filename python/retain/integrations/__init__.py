"""Patches that route other libraries' model code to retain's kernels (``retain.integrations.transformers``)."""
