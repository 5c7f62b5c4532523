"""The application on top of the library: recipes, datasets, the model registry, the run
folder, the trainer and its stages, reports, and the post-training command. Nothing in the
library imports it."""
