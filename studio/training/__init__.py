"""Training: the lifecycle (trainer.py) and the server's background job (job.py)."""

from studio.training.job import Job, JobManager, failure_message, run_training
from studio.training.trainer import Trainer, TrainingStopped

__all__ = ["Job", "JobManager", "Trainer", "TrainingStopped", "failure_message", "run_training"]
