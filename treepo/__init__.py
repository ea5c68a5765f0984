"""The `treepo` command and what every role shares beside the protocol: the CLI (`cli.py`), the one-machine
launcher (`up.py`), `replay.py`, `keys.py`, model materialisation (`models.py`), prompt sources
(`prompts.py`) and the metrics sink (`telemetry.py`). Kept free of imports here: roles import its modules."""
