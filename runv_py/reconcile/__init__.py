"""The reconciler: find what a crash of the whole host side left behind (processes, mounts,
VM directories, cgroups, network state, hyperctl records and image data) and remove what no
live owner holds. One module per kind of object, each with a finder that returns frozen
dataclasses and their remover; `reconciler.py` runs them in order. docs/design.md, The
reconciler, says what owns what and how ownership is proved."""
