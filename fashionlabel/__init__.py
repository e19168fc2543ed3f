"""fashionlabel: label fashion product catalogs at scale (shard → train → label → report) on Ray."""

__version__ = "0.1.0"
