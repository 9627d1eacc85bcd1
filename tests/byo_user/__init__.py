"""A user's own code, outside fedsec, for the bring-your-own tests.

Written as a Flower user would write it, knowing nothing of fedsec's model zoo
or loaders: a small CNN with BatchNorm (:mod:`byo_user.model`), a synthetic
image data set and a partitioner of its own (:mod:`byo_user.data`), and its
own training loop (:mod:`byo_user.train`). The tests name these by dotted
path (``"byo_user.model:build"``), which every process imports from
``sys.path`` (``tests/`` is on it: see ``conftest.py``).
"""
