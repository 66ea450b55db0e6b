"""The trainer: recipes, data, jitted data-parallel steps and the training loop."""
