"""Data: image files in and out, the tasks (input from target, output to RGB), datasets, scene layouts.

Never imports the model: a dataset knows images, not towers.
"""

from .dataset import ImageDataset, TensorPairs
from .imageio import ImageError, list_images, load_image, save_image
from .tasks import TASKS, Task, make_task

__all__ = [
    "ImageDataset",
    "TensorPairs",
    "ImageError",
    "list_images",
    "load_image",
    "save_image",
    "TASKS",
    "Task",
    "make_task",
]
