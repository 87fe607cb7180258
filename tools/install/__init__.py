"""The set-up behind `./launch.sh setup` and `./launch.sh bundle` (standard library only: it runs before anything
is installed, with the interpreter of the new .venv or the base one).

    plan.py       what to install: the requirement lines of pyproject.toml, the torch and DALI builds for this
                  machine (train/system/builds.py), and how to tell pip
    installer.py  runs pip (online, or offline from a bundle), writes the set-up stamp
    bundle.py     wheelhouses for machines without internet: download, manifest with sha256s, parts, checks

launch.sh keeps what must work without Python: the cheap stamp check of every command, the .venv health check and
rebuild, and the lock that serialises concurrent first runs.
"""
