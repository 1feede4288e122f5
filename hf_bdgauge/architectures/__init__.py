"""Role maps of the supported model families, one JSON file each (see :mod:`hf_bdgauge.roles`)."""
