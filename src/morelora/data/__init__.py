"""Tasks, data loading, collators and multi-task sampling (see docs/DESIGN.md, "Data interface")."""

from morelora.data.offline import OFFLINE_SUITE
from morelora.data.tasks import TaskFileError, TaskSpec, get_task, list_tasks, register_task
from morelora.errors import UnknownTaskError

__all__ = ["OFFLINE_SUITE", "TaskFileError", "TaskSpec", "UnknownTaskError", "get_task", "list_tasks", "register_task"]
