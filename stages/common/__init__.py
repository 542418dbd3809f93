"""The ground floor every stage (and the launcher and the executors) stands on, importing nothing of theirs.

    errors.py  UserError: the one-line error naming the key, file or line and the fix
    io.py      atomic writes (temporary file or folder, then rename), so a killed job never leaves a file that
               looks complete
    entry.py   what every stage entry file shares: reading its resolved config, the distributed job environment,
               turning UserError into one line
    typed.py   ``typed``: a config node merged into a settings dataclass, a wrong type named by its key (the
               launcher's schemas and the executors' settings)

Import rule: ``stages/*`` import nothing from ``launcher/`` or ``cluster/``; those import from here.
"""
