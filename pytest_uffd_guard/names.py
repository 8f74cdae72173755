"""The package's vocabulary: names every layer shares.

This module imports nothing of the package (and nothing heavy), so the
plugin's option parsing, the engines and the doctor can all use it.
"""

from __future__ import annotations

#: Engines a user can ask for; "auto" lets engines.choose_engine decide.
ENGINES = ("auto", "sync", "async", "hybrid", "diff")

#: Kinds of memory a guarded buffer can be made of.
BACKINGS = ("anonymous", "shmem", "hugetlb")
