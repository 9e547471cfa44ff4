"""Adapter methods: one package or file per method, all on `base.TaskAdapterModel`."""
