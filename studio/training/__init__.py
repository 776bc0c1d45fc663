"""Training: one run's loop (trainer.py), its lifecycle as a recipe (recipe.py), saving and
restoring it (checkpoint.py), failures as sentences (failures.py), and the server's background
job and queue (job.py)."""

from studio.training.failures import failure_message
from studio.training.job import Job, JobManager
from studio.training.recipe import run_training
from studio.training.trainer import Trainer, TrainingStopped

__all__ = ["Job", "JobManager", "Trainer", "TrainingStopped", "failure_message", "run_training"]
