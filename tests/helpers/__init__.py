"""Shared test helpers, imported as ``helpers.<module>`` (pytest puts ``tests/`` on the path).

- ``builders``: small datasets, configs and toy scenes several test modules train on;
- ``project_env``: the environment of a pipeline subprocess in a throwaway project;
- ``archive_server``: local archives and a guarded ``urlopen`` for the download tests.
"""
