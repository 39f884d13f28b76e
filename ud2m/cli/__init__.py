"""Command-line jobs behind the entry-point scripts: :mod:`ud2m.cli.restore` is what ``sample.py`` runs.

This is the top layer of the package (like ``ud2m.training``): it may import every other layer and nothing imports
it. The scripts themselves stay thin (house-style K).
"""

from ud2m.cli.restore import Options, restore

__all__ = ["Options", "restore"]
