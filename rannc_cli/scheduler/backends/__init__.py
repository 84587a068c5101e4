"""Scheduler backends, one module each; every module registers its class with
``rannc_cli.scheduler.backend.register`` and is found by listing this package.

    from rannc_cli.scheduler.backend import backend_class
    backend_class("slurm").submit_command      # "sbatch"
"""
